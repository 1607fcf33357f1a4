"""The plugin contract: every hook qpipe calls, what it receives and what it returns.

A plugin is a module or object with functions marked ``@qpipe.hookimpl`` whose names match
the specs below; it is found through the ``qpipe`` entry-point group (built-ins too).
Hooks are called with keyword arguments, and an implementation may accept fewer arguments
than the spec lists. Heavy libraries (TensorFlow, MLflow) are imported inside plugins at
first use, never here.

Component hooks (``qpipe_register_*``) are called once per plugin manager. Each receives a
``register`` callable; call it with a subclass of the matching base class from
``qpipe.components``::

    @qpipe.hookimpl
    def qpipe_register_quantizers(register):
        register(MyQuantizer)

Every hook is called through pluggy (``pm.hook.<name>(...)``): hookwrappers
(``@qpipe.hookimpl(wrapper=True)``) run around the others, an implementation's argument
with a default gets the hook's value, ``QPIPE_TRACE=1`` traces every call, and the plugin
registered last runs first (``tryfirst``/``trylast`` change that).

Lifecycle hooks run in every plugin that implements them; the tracking plugin (MLflow) is
built on them. Each plugin's implementation of a register or lifecycle hook is isolated:
an exception is reported naming the plugin and the other plugins' implementations still
run. Then an error in ``qpipe_pipeline_started`` or ``qpipe_variant_started`` stops the
run; in the other lifecycle hooks it is a warning and the run goes on. A register hook
that raises makes its plugin contribute nothing (listed by ``qpipe plugins``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import typer

    from qpipe.components import Artifact, Backend, Calibrator, Evaluator, Expects, LoadedModel, Quantizer
    from qpipe.schema import ModelSource
    from qpipe.results import PipelineResults, PipelineRun, VariantResult

hookspec = pluggy.HookspecMarker("qpipe")


# --------------------------------------------------------------------------- components


@hookspec
def qpipe_register_quantizers(register: Callable[[type[Quantizer]], None]) -> None:
    """Register quantizers: ``register(cls)`` for each ``Quantizer`` subclass.

    A quantizer turns the loaded model into an ``Artifact`` (``Quantizer.quantize``).
    """


@hookspec
def qpipe_register_calibrators(register: Callable[[type[Calibrator]], None]) -> None:
    """Register calibrators: ``register(cls)`` for each ``Calibrator`` subclass.

    A calibrator picks representative samples (and may estimate activation ranges) for
    quantizers with ``needs_calibration = True``.
    """


@hookspec
def qpipe_register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register backends: ``register(cls)`` for each ``Backend`` subclass.

    A backend loads an artifact of one of its ``formats`` into a ``Runner`` that predicts.
    """


@hookspec
def qpipe_register_evaluators(register: Callable[[type[Evaluator]], None]) -> None:
    """Register evaluators: ``register(cls)`` for each ``Evaluator`` subclass.

    An evaluator returns a ``dict`` of named float metrics for one variant.
    """


@hookspec(firstresult=True)
def qpipe_load_model(source: ModelSource, base_dir: Path) -> LoadedModel | None:
    """Load the pipeline's model; return ``None`` if this plugin does not handle ``source``.

    ``source`` is the validated ``model`` section; relative paths resolve against
    ``base_dir``. The first non-None result wins; the built-in Keras loader is ``trylast``
    so a plugin can take over any source.
    """


@hookspec
def qpipe_check_artifact(artifact: Artifact, expects: Expects) -> list[dict[str, str]] | None:
    """Check an artifact against what its quantizer meant it to be; return warnings.

    Called for every variant after evaluation, in every plugin that implements it. Return a
    list of ``{"code": ..., "message": ...}`` for each claim of ``expects`` the file breaks
    (weights left in float, float ops in a full-integer model), ``[]`` when it keeps them, or
    ``None`` when this plugin does not read ``artifact.format``. The host adds the warnings
    to the variant (``VariantResult.warnings``); ``strict`` turns them into a failure.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def qpipe_pipeline_started(run: PipelineRun) -> None:
    """Called once the pipeline is validated and its model is loaded, before any variant.

    Raise a ``qpipe.QpipeError`` to stop the run before any conversion (a tracker whose
    server is unreachable does this).
    """


@hookspec
def qpipe_variant_started(run: PipelineRun, variant: str) -> None:
    """Called when the variant named ``variant`` starts."""


@hookspec
def qpipe_variant_progress(run: PipelineRun, variant: str, message: str) -> None:
    """Called as a variant moves through its stages (``calibrating``, ``converting``, ...)."""


@hookspec
def qpipe_variant_metrics(
    run: PipelineRun, variant: str, metrics: dict[str, float], step: int | None
) -> None:
    """Called with intermediate metrics of a variant, e.g. per-epoch loss while training."""


@hookspec
def qpipe_variant_finished(run: PipelineRun, result: VariantResult) -> None:
    """Called when a variant finished with status ``ok``; ``result.metrics`` include deltas."""


@hookspec
def qpipe_variant_failed(run: PipelineRun, result: VariantResult, error: BaseException | None) -> None:
    """Called when a variant failed; ``result.error`` holds the message.

    ``error`` is the exception, or ``None`` when replaying a recorded run (``qpipe log``) or
    when ``strict`` failed the variant for its warnings.
    """


@hookspec
def qpipe_pipeline_finished(run: PipelineRun, results: PipelineResults) -> None:
    """Called after every variant ran and ``results.json`` is written."""


@hookspec
def qpipe_pipeline_failed(run: PipelineRun, error: BaseException, interrupted: bool) -> None:
    """Called when the run stops early: a crash, or Ctrl-C (``interrupted=True``).

    Trackers end their open runs here (FAILED or KILLED); nothing is left RUNNING.
    """


# --------------------------------------------------------------------------- CLI


@hookspec
def qpipe_add_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``qpipe`` command line (``@app.command()``)."""


def hook_names() -> list[str]:
    """Names of every hook in this contract (for docs and tests)."""
    return sorted(name for name, value in globals().items() if name.startswith("qpipe_"))


__all__: list[Any] = ["hookspec", "hook_names"]
