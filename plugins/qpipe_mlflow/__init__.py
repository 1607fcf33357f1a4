"""Built-in plugin: every ``qpipe run`` tracked in MLflow, and ``qpipe compare``.

A run is one parent MLflow run (named ``<pipeline>-<timestamp>``) in the experiment
``tracking.experiment`` (default: the pipeline's name), with one nested child run per variant
(params, final metrics at step 0, training curves, tags, the data as dataset inputs, the
``.tflite`` and the variant's results) and, per finished variant, an MLflow 3 logged model: a
pyfunc that runs the ``.tflite`` with LiteRT and needs no qpipe (see pyfunc.py).
``tracking.register`` registers one variant's model. ``qpipe log`` sends a run once.
``tracking: false`` or ``--no-tracking`` runs without MLflow, which is then never imported.
The tracker lives in ``run.state["mlflow"]`` for the length of one run.
"""

from __future__ import annotations

from typing import Any

import qpipe

STATE_KEY = "mlflow"


def _tracker(run: Any) -> Any:
    return run.state.get(STATE_KEY)


@qpipe.hookimpl
def qpipe_pipeline_started(run: Any) -> None:
    """Check the store, then open the parent run; an unreachable store stops the run here."""
    from qpipe_mlflow.target import target_for

    target = target_for(run)
    if target is None:
        return
    from qpipe_mlflow.tracker import Tracker

    register = run.config.tracking.register_model
    if register is not None:
        _check_register(run, register)
    tracker = Tracker.connect(target)
    if run.replay:  # qpipe log: a run the store already has complete is not sent twice
        from qpipe_mlflow.resend import logged_before
        from qpipe_mlflow.tracker import announce_existing, quiet_logs

        with quiet_logs():
            old = logged_before(tracker, run)
        if old is not None:
            announce_existing(tracker, old)
            return
    tracker.start(run)
    run.state[STATE_KEY] = tracker


@qpipe.hookimpl
def qpipe_variant_started(run: Any, variant: str) -> None:
    tracker = _tracker(run)
    if tracker is not None:
        tracker.variant_started(variant)


@qpipe.hookimpl
def qpipe_variant_metrics(run: Any, variant: str, metrics: dict, step: Any) -> None:
    tracker = _tracker(run)
    if tracker is not None:
        tracker.variant_metrics(variant, metrics, step)


@qpipe.hookimpl
def qpipe_variant_finished(run: Any, result: Any) -> None:
    tracker = _tracker(run)
    if tracker is not None:
        tracker.variant_ended(run, result)


@qpipe.hookimpl
def qpipe_variant_failed(run: Any, result: Any) -> None:
    tracker = _tracker(run)
    if tracker is not None:
        tracker.variant_ended(run, result)


@qpipe.hookimpl
def qpipe_pipeline_finished(run: Any, results: Any) -> None:
    tracker = run.state.pop(STATE_KEY, None)
    if tracker is None:
        return
    from qpipe_mlflow.tracker import announce

    try:
        tracker.finish(run, results)
    finally:
        tracker.close()
        if tracker.lost is None:
            announce(tracker)


@qpipe.hookimpl
def qpipe_pipeline_failed(run: Any, error: BaseException, interrupted: bool) -> None:
    tracker = run.state.pop(STATE_KEY, None)
    if tracker is not None:
        try:
            tracker.fail(run, error, interrupted)
        finally:
            tracker.close()


@qpipe.hookimpl
def qpipe_add_commands(app: Any) -> None:
    from qpipe_mlflow.compare import add_compare_command

    add_compare_command(app)


def _check_register(run: Any, register: Any) -> None:
    """``tracking.register.variant`` must name a variant of the pipeline (or one of its grid)."""
    names = [v.name for v in run.config.variants]
    wanted = register.variant
    if wanted in names or any(wanted.startswith(f"{n}-") for n in names):
        return
    raise qpipe.ConfigError("tracking.register.variant: " + qpipe.unknown_name_message("variant", wanted, names))
