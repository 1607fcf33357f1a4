"""Running one variant: calibrate, quantize, run the artifact with its backend, evaluate, check.

``VariantRunner.run`` takes a variant and the baseline it is compared with and returns an
``Outcome``; it never raises for a variant that fails (the outcome says ``failed``). The hooks
a variant calls while it runs (started, progress, metrics) go to ``emit``: fired live by the
run's ``Lifecycle`` in this process, recorded by an ``EventLog`` in a worker.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable


from qpipe.components import Artifact, Calibration, CalibrateContext, EvalContext, QuantizeContext
from qpipe.config import Bound, ResolvedPipeline, ResolvedVariant
from qpipe.errors import PluginError, QpipeError, short_error
from qpipe.inputs import Inputs
from qpipe.isolation import guard_model
from qpipe.lifecycle import Emit
from qpipe.heads import Predictions, name_outputs, output_names, prefixed
from qpipe.metrics import applicable
from qpipe.outcome import Baseline, Outcome, error_log_name, new_result, plain_options, with_deltas
from qpipe.plugins import QpipePluginManager
from qpipe.results import VariantResult
from qpipe.sanity import check_variant, warning


class VariantRunner:
    """Runs variants of one resolved pipeline on loaded inputs, in this process."""

    def __init__(self, pm: QpipePluginManager, resolved: ResolvedPipeline, inputs: Inputs, emit: Emit):
        self.pm = pm
        self.resolved = resolved
        self.inputs = inputs
        self.emit = emit
        self._calibrations: dict[str, Calibration] = {}  # one calibration per calibrator and options

    def run(self, rv: ResolvedVariant, baseline: Baseline | None, work_dir: Path) -> Outcome:
        """Run ``rv`` writing into ``work_dir``; an error in its stages fails this variant only.

        An error in a ``qpipe_variant_started`` hook is not the variant's: it stops the run.
        """
        result = new_result(rv)
        self.emit("qpipe_variant_started", variant=rv.config.name)
        started = time.perf_counter()
        outcome = Outcome(result=result, live=True)
        try:
            _Stages(self, rv, result, work_dir, baseline).run(outcome)
        except Exception as exc:  # the variant fails; the others still run
            result.status = "failed"
            result.error = short_error(exc)
            if not isinstance(exc, QpipeError) or exc.__cause__ is not None:  # a cut third-party error
                result.error += f" (full error: {error_log_name(rv.config.name)})"
            result.metadata["traceback"] = traceback.format_exc()
            outcome.error = exc
        result.seconds = round(time.perf_counter() - started, 3)
        return outcome

    def remeasure(self, rv: ResolvedVariant, artifact: Artifact, outputs: Predictions | None,
                  result: VariantResult, work_dir: Path) -> dict[str, float]:
        """Run the evaluators that measure the machine (``Evaluator.remeasure``, e.g. latency)
        again on a variant restored from the cache; return their fresh metrics."""
        evaluators = [ev for ev in self.evaluators() if type(ev.component).remeasure]
        if not evaluators:
            return {}
        report = self.reporter(rv.config.name)
        runner = call(rv.backend, "load", artifact, self.inputs.model)
        try:
            ctx = EvalContext(variant=rv.config.name, work_dir=work_dir, report=report, warn=warner(result, report),
                              record=result.metadata.__setitem__, data=self.inputs.evaluation, outputs=outputs,
                              artifact=artifact, runner=runner, model=self.inputs.model)
            return self.measure(evaluators, ctx)
        finally:
            runner.close()

    def evaluators(self) -> list[Bound]:
        """The evaluators that run for the model's task (for any output's, with several outputs)."""
        tasks = list(self.inputs.tasks.values()) or [self.inputs.task]
        return applicable(self.resolved, *tasks)

    def measure(self, evaluators: list[Bound], ctx: EvalContext) -> dict[str, float]:
        """Run ``evaluators`` on one variant's predictions. A model with several outputs has each
        quality evaluator that fits an output's task run once per output (its labels, its
        predictions, the baseline's), named ``<output>/<metric>``; cost evaluators run once."""
        tasks = self.inputs.tasks
        if not tasks:
            return run_evaluators(evaluators, ctx)
        metrics = run_evaluators([ev for ev in evaluators if type(ev.component).role == "cost"], ctx)
        outputs: dict = ctx.outputs if isinstance(ctx.outputs, dict) else {}
        baseline: dict = ctx.baseline_outputs if isinstance(ctx.baseline_outputs, dict) else {}
        data = ctx.data
        for name, task in tasks.items():
            fits = [ev for ev in evaluators if type(ev.component).role != "cost" and type(ev.component).applies_to(task.name)]
            one = replace(ctx, output=name, outputs=outputs.get(name), baseline_outputs=baseline.get(name),
                          data=data.for_output(name) if data is not None else None)
            metrics.update({prefixed(name, key): value for key, value in run_evaluators(fits, one).items()})
        return metrics

    def reporter(self, variant: str) -> Callable[[str], None]:
        """``ctx.report`` for ``variant``: a progress hook call."""
        return lambda message: self.emit("qpipe_variant_progress", variant=variant, message=message)

    def calibrate(self, bound: Bound, common: dict[str, Any]) -> Calibration:
        """The samples of ``bound``'s calibrator, computed once per calibrator and options."""
        key = json.dumps([bound.component.name, plain_options(bound.component.options)], sort_keys=True)
        if key not in self._calibrations:
            ctx = CalibrateContext(**common, model=self.inputs.model, data=self.inputs.calibration)
            calibration = call(bound, "calibrate", ctx)
            if not isinstance(calibration, Calibration) or len(calibration.samples) == 0:
                raise QpipeError(f"calibrator '{bound.component.name}' produced no samples; "
                                 "check data.calibration")
            self._calibrations[key] = calibration
        return self._calibrations[key]


class _Stages:
    """One variant's stages, with what they share (the context callbacks, the baseline)."""

    def __init__(self, owner: VariantRunner, rv: ResolvedVariant, result: VariantResult, work_dir: Path,
                 baseline: Baseline | None):
        self.owner, self.rv, self.result = owner, rv, result
        self.inputs = owner.inputs
        name = rv.config.name
        self.is_baseline = name == owner.resolved.baseline
        self.baseline = baseline
        report = owner.reporter(name)
        self.common: dict[str, Any] = dict(
            variant=name, work_dir=work_dir, report=report, warn=warner(result, report),
            record=result.metadata.__setitem__,
            log_metrics=lambda metrics, step=None: owner.emit("qpipe_variant_metrics", variant=name,
                                                             metrics=metrics, step=step))

    def run(self, outcome: Outcome) -> None:
        """Calibrate, quantize, evaluate and check; fill ``outcome``."""
        rv, report = self.rv, self.common["report"]
        calibration = None
        if rv.calibrator is not None:
            report("calibrating")
            with guard_model(self.inputs.model, f"{rv.calibrator.component.name} (plugin '{rv.calibrator.plugin}')"):
                calibration = self.owner.calibrate(rv.calibrator, self.common)
        artifact, seconds = self.quantize(calibration)
        self.result.artifact = relative(artifact.path, self.common["work_dir"])
        self.result.metadata.update({k: v for k, v in artifact.metadata.items() if k != "metrics"})
        metrics: dict[str, float] = {"quantize_seconds": round(seconds, 3)}
        metrics.update(artifact.metadata.get("metrics", {}))
        outputs, measured = self.evaluate(artifact)
        metrics.update(measured)
        if self.is_baseline:
            self.baseline = Baseline(rv.config.name, outputs, artifact, dict(metrics))
        self.check(artifact, outputs)
        outcome.outputs, outcome.raw_metrics, outcome.artifact = outputs, dict(metrics), artifact
        self.result.metrics = with_deltas(metrics, self.baseline.metrics if self.baseline else None)

    def quantize(self, calibration: Calibration | None) -> tuple[Artifact, float]:
        rv = self.rv
        if type(rv.quantizer.component).needs_training and self.inputs.training is None:
            raise QpipeError(f"{rv.config.quantizer} trains the model: add data.training to the pipeline")
        self.common["report"]("quantizing")
        started = time.perf_counter()
        with guard_model(self.inputs.model, f"{rv.config.quantizer} (plugin '{rv.quantizer.plugin}')"):
            artifact = call(rv.quantizer, "quantize", QuantizeContext(
                **self.common, model=self.inputs.model, calibration=calibration, training=self.inputs.training,
                validation=self.inputs.validation, constraints=self.owner.resolved.constraints,
                evaluate=self.trial))
        if not isinstance(artifact, Artifact):
            raise PluginError(f"plugin '{rv.quantizer.plugin}': {rv.config.quantizer}.quantize returned "
                              f"{type(artifact).__name__}, expected qpipe.Artifact")
        return artifact, time.perf_counter() - started

    def evaluate(self, artifact: Artifact, trial: bool = False) -> tuple[Predictions, dict[str, float]]:
        """Run ``artifact`` on the evaluation data with the variant's backend: predictions and raw metrics."""
        report, rv, data = self.common["report"], self.rv, self.inputs.evaluation
        report("loading")
        runner = call(rv.backend, "load", artifact, self.inputs.model)
        try:
            report(f"predicting {len(data)} samples")
            outputs = name_outputs(runner.predict(data, rv.backend.component.batch_size),
                                   output_names(self.inputs.model), f"backend {rv.backend.component.name}")
            if self.is_baseline and not trial:
                reference: tuple[Any, Any] = (outputs, artifact)  # the baseline is compared with itself
            else:
                reference = (self.baseline.outputs, self.baseline.artifact) if self.baseline else (None, None)
            ctx = EvalContext(**self.common, data=data, outputs=outputs, artifact=artifact, runner=runner,
                              baseline_outputs=reference[0], baseline_artifact=reference[1], model=self.inputs.model)
            return outputs, self.owner.measure(self.owner.evaluators(), ctx)
        finally:
            runner.close()

    def trial(self, artifact: Artifact) -> dict[str, float]:
        """``ctx.evaluate`` for quantizers that search (e.g. float fallback): metrics with deltas."""
        _, raw = self.evaluate(artifact, trial=True)
        return with_deltas(raw, self.baseline.metrics if self.baseline else None)

    def check(self, artifact: Artifact, outputs: Predictions) -> None:
        """The sanity checks (``qpipe.sanity``): each problem becomes a named warning."""
        if any(vars(artifact.expects).values()):
            self.result.metadata["expects"] = artifact.expects.to_dict()
        base = self.baseline or Baseline(self.rv.config.name)
        for found in check_variant(self.owner.pm, artifact, outputs, base.outputs, base.artifact, self.is_baseline):
            self.common["warn"](found["message"], found["code"])


def warner(result: VariantResult, report: Callable[[str], None]) -> Callable[..., None]:
    """``ctx.warn``: a named warning on the variant, also shown as progress."""
    def warn(message: str, code: str = "plugin") -> None:
        result.warnings.append(warning(code, message))
        report(f"warning [{code}]: {message}")
    return warn


def run_evaluators(evaluators: list[Bound], ctx: EvalContext) -> dict[str, float]:
    """Every evaluator's metrics; one needing labels is skipped when the data has none."""
    metrics: dict[str, float] = {}
    owners: dict[str, Bound] = {}
    for ev in evaluators:
        if type(ev.component).needs_labels and (ctx.data is None or ctx.data.labels is None):
            continue
        ctx.report(f"evaluating: {ev.component.name}")
        produced = call(ev, "evaluate", ctx)
        for key, value in (produced or {}).items():
            if key in owners:
                first = owners[key]
                raise PluginError(f"metric '{key}' is written by two evaluators: '{first.component.name}' (plugin "
                                  f"'{first.plugin}') and '{ev.component.name}' (plugin '{ev.plugin}'); remove one "
                                  "of them from the pipeline's evaluators")
            owners[key] = ev
            metrics[key] = float(value)
    return metrics


def call(bound: Bound, method: str, *args: Any) -> Any:
    """Call a component method; a non-qpipe error is re-raised naming the component's plugin."""
    try:
        return getattr(bound.component, method)(*args)
    except QpipeError:
        raise
    except Exception as exc:
        raise PluginError(f"{bound.component.name} (plugin '{bound.plugin}'): {short_error(exc)}") from exc


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)
