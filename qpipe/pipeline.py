"""The runner: load the model and data, then calibrate, quantize, run and evaluate each variant.

Data flows one way. The baseline variant runs first so every other variant's deltas can be
computed as soon as it ends; a failing variant is recorded as ``failed`` through the same
path as a finished one, and ``results.json`` is rewritten after every variant.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qpipe import __version__
from qpipe.components import (
    Artifact,
    Calibration,
    CalibrateContext,
    EvalContext,
    LoadedModel,
    QuantizeContext,
    file_sha256,
)
from qpipe.config import Bound, ResolvedPipeline, ResolvedVariant
from qpipe.data import Dataset, bind_to_model, load_source
from qpipe.errors import PluginError, QpipeError, short_error
from qpipe.isolation import guard_model
from qpipe.metrics import applicable, check_for_task, headline
from qpipe.outputs import claim_output
from qpipe.signals import held_signals
from qpipe.plugins import HookFailure, QpipePluginManager
from qpipe.results import PipelineResults, PipelineRun, VariantResult
from qpipe.sanity import apply_strict, check_variant, warning
from qpipe.selection import select
from qpipe.task import Task, decide_task, output_width


def call_lifecycle(pm: QpipePluginManager, hook: str, strict: bool = False, **kwargs: Any) -> list[str]:
    """Call a lifecycle hook through pluggy; every plugin's implementation runs.

    Implementations are isolated per plugin (``qpipe.plugins``): one that raises is reported
    naming its plugin and the others still run. Afterwards, with ``strict`` the first error
    is raised (a plugin's own QpipeError as it is, anything else as a PluginError);
    otherwise errors are returned as one-line messages. SIGINT/SIGTERM arriving meanwhile
    are held until the hook returns (``qpipe.signals``).
    """
    caller = getattr(pm.hook, hook)
    with held_signals():
        try:
            outcome = caller(**kwargs)
        except QpipeError:
            raise
        except Exception as exc:  # only a hookwrapper's own error gets here
            wrappers = [i.plugin_name for i in caller.get_hookimpls() if i.wrapper or i.hookwrapper]
            raise PluginError(f"a hookwrapper of {hook} (plugin {', '.join(map(repr, wrappers))}) "
                              f"failed: {short_error(exc)}") from exc
    failures = [item for item in outcome or [] if isinstance(item, HookFailure)]
    if strict and failures:
        first = failures[0]
        if isinstance(first.error, QpipeError):
            raise first.error
        raise PluginError(_failure_message(first)) from first.error
    return [_failure_message(failure) for failure in failures]


def _failure_message(failure: HookFailure) -> str:
    if isinstance(failure.error, QpipeError):
        return f"plugin '{failure.plugin}' ({failure.hook}): {short_error(failure.error)}"
    return f"plugin '{failure.plugin}' failed in {failure.hook}: {short_error(failure.error)}"


@dataclass
class Inputs:
    """The model and the datasets, loaded once per run."""

    model: LoadedModel
    evaluation: Dataset
    calibration: Dataset | None = None
    training: Dataset | None = None
    validation: Dataset | None = None
    data_files: dict[str, Path] = field(default_factory=dict)
    task: Task = field(default_factory=lambda: Task(None, "inferred", "not judged"))


def load_model(pm: QpipePluginManager, resolved: ResolvedPipeline) -> LoadedModel:
    """Load the model through the ``qpipe_load_model`` hook."""
    source = resolved.config.model
    try:
        model = pm.hook.qpipe_load_model(source=source, base_dir=resolved.loaded.base_dir)
    except QpipeError:
        raise
    except Exception as exc:
        raise QpipeError(f"model: cannot load {source.path or source.function}: {short_error(exc)}") from exc
    if model is None:
        raise QpipeError(f"model: no plugin can load {source.path or source.function}")
    return model


def load_inputs(pm: QpipePluginManager, resolved: ResolvedPipeline) -> Inputs:
    """Load the model and every data section the selected variants need; fail early."""
    model = load_model(pm, resolved)
    data_cfg = resolved.config.data
    base = resolved.loaded.base_dir

    def load(section: str) -> Dataset | None:
        source = getattr(data_cfg, section)
        if source is None:
            return None
        return bind_to_model(load_source(source, base, f"data.{section}"), model.inputs, f"data.{section}",
                             allow_nonfinite=data_cfg.allow_nonfinite)

    needs_calibration = any(rv.calibrator is not None for rv in resolved.variants)
    needs_training = any(type(rv.quantizer.component).needs_training for rv in resolved.variants)
    inputs = Inputs(
        model=model,
        evaluation=load("evaluation"),  # type: ignore[arg-type]  # data.evaluation is required
        calibration=load("calibration") if needs_calibration else None,
        training=load("training") if needs_training else None,
        validation=load("validation") if needs_training else None,
    )
    width = output_width(model.outputs[0].shape) if model.outputs else None
    inputs.task = decide_task(resolved.config.task, width, inputs.evaluation.labels)
    for section in ("evaluation", "calibration", "training", "validation"):
        source = getattr(data_cfg, section)
        if source is not None and source.path:
            inputs.data_files[section] = (base / source.path).resolve()
    return inputs


class Runner:
    """Runs a resolved pipeline once. Use ``run_pipeline`` for the usual path."""

    def __init__(self, pm: QpipePluginManager, resolved: ResolvedPipeline, output_dir: Path,
                 settings: dict[str, Any] | None = None, timestamp: str | None = None):
        self.pm = pm
        self.resolved = resolved
        self.output_dir = Path(output_dir)
        self.settings = settings or {}
        self.timestamp = timestamp
        self._calibrations: dict[str, Calibration] = {}
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ run
    def run(self) -> PipelineResults:
        cfg = self.resolved.config
        from qpipe.executor import inputs_if_all_cached

        # an unchanged re-run loads the model and data only if a plugin touches them
        inputs = inputs_if_all_cached(self.pm, self.resolved, self.settings) or load_inputs(self.pm, self.resolved)
        self.inputs = inputs
        evaluators = check_for_task(self.resolved, inputs.task)  # before any variant runs
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = PipelineResults(
            pipeline=cfg.name,
            baseline=self.resolved.baseline,
            started=_dt.datetime.now().isoformat(timespec="seconds"),
            timestamp=self.timestamp,
            qpipe_version=__version__,
            model={"source": inputs.model.source, "flavor": inputs.model.flavor, "sha256": inputs.model.sha256},
            data={k: {"path": str(p), "sha256": file_sha256(p)} for k, p in inputs.data_files.items()},
            task=inputs.task.to_dict(), headline=headline(evaluators),
        )
        self.run_info = PipelineRun(
            name=cfg.name, config=cfg, config_path=self.resolved.loaded.path,
            config_text=self.resolved.loaded.text, output_dir=self.output_dir, results=results,
            model=inputs.model, data_files=inputs.data_files, settings=self.settings,
        )
        results.extra["pipeline_file"] = str(self.resolved.loaded.path)
        (self.output_dir / "pipeline.yaml").write_text(self.resolved.loaded.text, encoding="utf-8")
        results.write(self.output_dir)
        try:
            call_lifecycle(self.pm, "qpipe_pipeline_started", strict=True, run=self.run_info)
            self._run_variants(results)
            self._select(results)
            from qpipe.report import try_write_report  # summary table and charts, tracked or not

            self.warnings += try_write_report(results, self.output_dir, (results.extra.get("cache") or {}).get("dir"))
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            results.status = "interrupted" if interrupted else "crashed"
            results.finished = _dt.datetime.now().isoformat(timespec="seconds")
            results.write(self.output_dir)
            call_lifecycle(self.pm, "qpipe_pipeline_failed", run=self.run_info, error=exc, interrupted=interrupted)
            raise
        results.status = "finished"
        results.finished = _dt.datetime.now().isoformat(timespec="seconds")
        results.write(self.output_dir)
        self.warnings += call_lifecycle(self.pm, "qpipe_pipeline_finished", run=self.run_info, results=results)
        results.write(self.output_dir)  # plugins may add to results.extra
        return results

    def _select(self, results: PipelineResults) -> None:
        """Name the variant to ship and, when gating, whether the build passes."""
        cfg = self.resolved.config
        constraints = self.resolved.constraints
        if constraints or cfg.objective is not None:
            reference = None if cfg.select.allow_baseline else self.resolved.baseline
            results.selected = select(results.variants, constraints, cfg.objective_pair(), reference)
        if cfg.gate or self.settings.get("gate"):
            chosen = (results.selected or {}).get("variant")
            if not constraints:
                results.gate = {"passed": True, "reason": "no constraints declared"}
            elif chosen:
                results.gate = {"passed": True, "reason": f"{chosen} meets {', '.join(map(str, constraints))}"}
            else:
                selected = results.selected or {}
                results.gate = {"passed": False, "reason": selected.get("reason", "no variant selected"),
                                "constraints": [str(c) for c in constraints], "failures": selected.get("rejected", {})}

    def _run_variants(self, results: PipelineResults) -> None:
        """Run every variant through the cache and the executor (``qpipe.executor``), baseline
        first; record each as it ends (results.json, then the finished/failed hook)."""
        from qpipe.executor import execute

        with contextlib.closing(execute(self)) as finished:
            for result in finished:
                apply_strict(result, self.resolved.strict(result.name))
                if result.status != "ok":
                    self._log_failure(result)
                results.variants.append(result)
                results.write(self.output_dir)
                hook = "qpipe_variant_finished" if result.status == "ok" else "qpipe_variant_failed"
                extra: dict[str, Any] = {"error": getattr(result, "_exception", None)} if result.status != "ok" else {}
                self.warnings += call_lifecycle(self.pm, hook, run=self.run_info, result=result, **extra)
        order = {rv.config.name: i for i, rv in enumerate(self.resolved.variants)}
        results.variants.sort(key=lambda v: order.get(v.name, len(order)))  # parallel runs end in any order

    def _log_failure(self, result: VariantResult) -> None:
        """Keep a failed variant's full error and traceback in ``<variant>.error.txt`` and, with
        ``--debug``, print them; the terminal and results.json get the one-line error."""
        text = result.metadata.get("traceback") or result.error or "failed"
        (self.output_dir / error_log_name(result.name)).write_text(str(text), encoding="utf-8")
        if self.settings.get("debug"):
            sys.stderr.write(f"--- {result.name} failed:\n{text}\n")

    def adopt_baseline(self, outputs: np.ndarray | None, artifact: Artifact | None,
                       metrics: dict[str, float]) -> None:
        """Use a baseline computed elsewhere (a worker, the cache) for fidelity, size and deltas."""
        self._baseline_outputs, self._baseline_artifact = outputs, artifact
        self._baseline_metrics = dict(metrics)

    # ------------------------------------------------------------------ one variant
    def _new_result(self, rv: ResolvedVariant) -> VariantResult:
        v = rv.config
        return VariantResult(
            name=v.name, quantizer=v.quantizer, options=_plain(rv.quantizer.component.options),
            backend={"name": rv.backend.component.name, "options": _plain(rv.backend.component.options)},
            calibrator=None if rv.calibrator is None else {
                "name": rv.calibrator.component.name, "options": _plain(rv.calibrator.component.options)},
        )

    def run_variant(self, rv: ResolvedVariant) -> VariantResult:
        """Run one variant in this process, calling its lifecycle hooks as it goes."""
        v = rv.config
        result = self._new_result(rv)
        call_lifecycle(self.pm, "qpipe_variant_started", strict=True, run=self.run_info, variant=v.name)
        started = time.perf_counter()
        try:
            self._run_stages(rv, result)
        except Exception as exc:  # the variant fails; the others still run
            result.status = "failed"
            result.error = short_error(exc)
            if not isinstance(exc, QpipeError) or exc.__cause__ is not None:  # a cut third-party error
                result.error += f" (full error: {error_log_name(v.name)})"
            result.metadata["traceback"] = traceback.format_exc()
            result._exception = exc  # type: ignore[attr-defined]
        result.seconds = round(time.perf_counter() - started, 3)
        return result

    def _progress(self, variant: str):
        def report(message: str) -> None:
            call_lifecycle(self.pm, "qpipe_variant_progress", run=self.run_info, variant=variant, message=message)
        return report

    def _metrics_logger(self, variant: str):
        def log(metrics: dict[str, float], step: int | None = None) -> None:
            call_lifecycle(self.pm, "qpipe_variant_metrics", run=self.run_info, variant=variant,
                           metrics=metrics, step=step)
        return log

    @staticmethod
    def _warner(result: VariantResult, report: Any):
        def warn(message: str, code: str = "plugin") -> None:
            result.warnings.append(warning(code, message))
            report(f"warning [{code}]: {message}")
        return warn

    def _run_stages(self, rv: ResolvedVariant, result: VariantResult) -> None:
        v = rv.config
        report = self._progress(v.name)
        warn = self._warner(result, report)

        def record(key: str, value: Any) -> None:
            result.metadata[key] = value

        common = dict(variant=v.name, work_dir=self.output_dir, report=report,
                      log_metrics=self._metrics_logger(v.name), warn=warn, record=record)
        quantizer = rv.quantizer.component
        calibration = None
        if rv.calibrator is not None:
            report("calibrating")
            with guard_model(self.inputs.model, f"{rv.calibrator.component.name} (plugin '{rv.calibrator.plugin}')"):
                calibration = self._calibrate(rv.calibrator, common)
        if type(quantizer).needs_training and self.inputs.training is None:
            raise QpipeError(f"{v.quantizer} trains the model: add data.training to the pipeline")

        report("quantizing")
        t0 = time.perf_counter()
        with guard_model(self.inputs.model, f"{v.quantizer} (plugin '{rv.quantizer.plugin}')"):
            artifact = _call(rv.quantizer, "quantize", QuantizeContext(
                **common, model=self.inputs.model, calibration=calibration,
                training=self.inputs.training, validation=self.inputs.validation,
                constraints=self.resolved.constraints, evaluate=self._trial_evaluator(rv, common)))
        if not isinstance(artifact, Artifact):
            raise PluginError(f"plugin '{rv.quantizer.plugin}': {v.quantizer}.quantize returned "
                              f"{type(artifact).__name__}, expected qpipe.Artifact")
        quantize_seconds = time.perf_counter() - t0
        result.artifact = _relative(artifact.path, self.output_dir)
        result.metadata.update({k: val for k, val in artifact.metadata.items() if k != "metrics"})
        metrics: dict[str, float] = {"quantize_seconds": round(quantize_seconds, 3)}
        metrics.update(artifact.metadata.get("metrics", {}))

        metrics.update(self._evaluate(rv, artifact, common))
        self._check(rv, artifact, result, warn)
        result._raw_metrics = dict(metrics)  # type: ignore[attr-defined]  # for the cache
        result._outputs = self._last_outputs  # type: ignore[attr-defined]  # for the cache and workers
        result.metrics = self._with_deltas(v.name, metrics)

    def _check(self, rv: ResolvedVariant, artifact: Artifact, result: VariantResult, warn) -> None:
        """The sanity checks (``qpipe.sanity``): each problem becomes a named warning."""
        if any(vars(artifact.expects).values()):
            result.metadata["expects"] = artifact.expects.to_dict()
        is_baseline = rv.config.name == self.resolved.baseline
        for found in check_variant(self.pm, artifact, self._last_outputs, getattr(self, "_baseline_outputs", None),
                                   getattr(self, "_baseline_artifact", None), is_baseline):
            warn(found["message"], found["code"])

    def _evaluate(self, rv: ResolvedVariant, artifact: Artifact, common: dict,
                  record_baseline: bool = True) -> dict[str, float]:
        """Run ``artifact`` on the evaluation data with the variant's backend; return raw metrics."""
        report = common["report"]
        report("loading")
        backend = rv.backend.component
        runner = _call(rv.backend, "load", artifact, self.inputs.model)
        metrics: dict[str, float] = {}
        try:
            report(f"predicting {len(self.inputs.evaluation)} samples")
            outputs = np.asarray(runner.predict(self.inputs.evaluation, backend.batch_size))
            if record_baseline:
                self._last_outputs = outputs
                baseline = self._baseline_state(rv.config.name, outputs, artifact)
            else:
                baseline = (getattr(self, "_baseline_outputs", None), getattr(self, "_baseline_artifact", None))
            ctx = EvalContext(**common, data=self.inputs.evaluation, outputs=outputs, artifact=artifact,
                              runner=runner, baseline_outputs=baseline[0], baseline_artifact=baseline[1],
                              model=self.inputs.model)
            metrics = self._run_evaluators(applicable(self.resolved, self.inputs.task), ctx)
        finally:
            runner.close()
        return metrics

    def _run_evaluators(self, evaluators: list[Bound], ctx: EvalContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        owners: dict[str, Bound] = {}
        for ev in evaluators:
            if type(ev.component).needs_labels and (ctx.data is None or ctx.data.labels is None):
                continue
            ctx.report(f"evaluating: {ev.component.name}")
            produced = _call(ev, "evaluate", ctx)
            _merge_metrics(metrics, owners, ev, produced or {})
        return metrics

    def remeasure(self, rv: ResolvedVariant, artifact: Artifact, outputs: np.ndarray | None,
                  result: VariantResult) -> dict[str, float]:
        """Run the evaluators that measure the machine (``Evaluator.remeasure``, e.g. latency)
        again on a variant restored from the cache; return their fresh metrics."""
        evaluators = [ev for ev in applicable(self.resolved, self.inputs.task) if type(ev.component).remeasure]
        if not evaluators:
            return {}
        report = self._progress(rv.config.name)
        warn = self._warner(result, report)
        runner = _call(rv.backend, "load", artifact, self.inputs.model)
        try:
            ctx = EvalContext(variant=rv.config.name, work_dir=self.output_dir, report=report, warn=warn,
                              record=result.metadata.__setitem__, data=self.inputs.evaluation, outputs=outputs,
                              artifact=artifact, runner=runner, model=self.inputs.model)
            return self._run_evaluators(evaluators, ctx)
        finally:
            runner.close()

    def _trial_evaluator(self, rv: ResolvedVariant, common: dict):
        """``ctx.evaluate`` for quantizers that search (e.g. float fallback): metrics with deltas."""
        def evaluate(artifact: Artifact) -> dict[str, float]:
            raw = self._evaluate(rv, artifact, common, record_baseline=False)
            return self._with_deltas(rv.config.name, raw, record=False)
        return evaluate

    def _calibrate(self, bound: Bound, common: dict) -> Calibration:
        key = json.dumps([bound.component.name, _plain(bound.component.options)], sort_keys=True)
        if key not in self._calibrations:
            ctx = CalibrateContext(**common, model=self.inputs.model, data=self.inputs.calibration)
            calibration = _call(bound, "calibrate", ctx)
            if not isinstance(calibration, Calibration) or len(calibration.samples) == 0:
                raise QpipeError(f"calibrator '{bound.component.name}' produced no samples; "
                                 "check data.calibration")
            self._calibrations[key] = calibration
        return self._calibrations[key]

    def _baseline_state(self, name: str, outputs: np.ndarray, artifact: Artifact):
        if name == self.resolved.baseline:
            self._baseline_outputs, self._baseline_artifact = outputs, artifact
        return getattr(self, "_baseline_outputs", None), getattr(self, "_baseline_artifact", None)

    def _with_deltas(self, name: str, metrics: dict[str, float], record: bool = True) -> dict[str, float]:
        if name == self.resolved.baseline and record:
            self._baseline_metrics = dict(metrics)
        base = getattr(self, "_baseline_metrics", None)
        if base is None:
            return metrics
        out = dict(metrics)
        for key, value in metrics.items():
            if key.endswith("_delta") or key not in base:
                continue
            out[f"{key}_delta"] = round(value - base[key], 10)
        return out


def run_pipeline(pm: QpipePluginManager, resolved: ResolvedPipeline, output_dir: Path | None = None,
                 settings: dict[str, Any] | None = None) -> tuple[PipelineResults, list[str]]:
    """Run ``resolved`` into a newly claimed output folder (``qpipe.outputs``); return the
    results and any warnings raised by lifecycle plugins."""
    settings = settings or {}
    folder = claim_output(resolved, output_dir, force=bool(settings.get("force")))
    runner = Runner(pm, resolved, folder.path, settings, timestamp=folder.timestamp)
    try:
        results = runner.run()
    except BaseException:
        if getattr(runner, "run_info", None) is None:  # stopped before writing anything
            folder.release()
        raise
    return results, runner.warnings


def _call(bound: Bound, method: str, *args: Any) -> Any:
    """Call a component method; a non-qpipe error is re-raised naming the component's plugin."""
    try:
        return getattr(bound.component, method)(*args)
    except QpipeError:
        raise
    except Exception as exc:
        raise PluginError(f"{bound.component.name} (plugin '{bound.plugin}'): {short_error(exc)}") from exc


def error_log_name(variant: str) -> str:
    """The file in the output folder holding a failed variant's full error and traceback."""
    return f"{variant}.error.txt"


def _merge_metrics(metrics: dict[str, float], owners: dict[str, Bound], ev: Bound, produced: dict) -> None:
    """Add an evaluator's metrics; a key another evaluator already wrote fails the variant."""
    for key, value in produced.items():
        if key in owners:
            first = owners[key]
            raise PluginError(f"metric '{key}' is written by two evaluators: '{first.component.name}' (plugin "
                              f"'{first.plugin}') and '{ev.component.name}' (plugin '{ev.plugin}'); remove one "
                              "of them from the pipeline's evaluators")
        owners[key] = ev
        metrics[key] = float(value)


def _plain(options: Any) -> dict[str, Any]:
    return options.model_dump(mode="json") if hasattr(options, "model_dump") else dict(options or {})


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)
