"""A run of a resolved pipeline, top to bottom.

1. Claim the output folder (``qpipe.outputs``) and load the inputs (``qpipe.inputs``; on an
   unchanged re-run, stand-ins that load only if touched: ``qpipe.cached``).
2. Write ``results.json`` and fire ``qpipe_pipeline_started`` (``qpipe.lifecycle``).
3. Take each variant's ``Outcome`` as it finishes (``qpipe.schedule``: baseline first, cache hits
   restored, the rest run by an executor, ``qpipe.executors``) and record it: its files, its hook
   calls replayed, the cache, ``results.json``, then ``qpipe_variant_finished``/``_failed``.
4. Select the variant to ship and judge the gate (``qpipe.selection``), write the report, and
   fire ``qpipe_pipeline_finished`` (or ``qpipe_pipeline_failed``).
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from qpipe import __version__
from qpipe.cached import RunCache, inputs_if_all_cached
from qpipe.components import file_sha256
from qpipe.config import ResolvedPipeline, ResolvedVariant
from qpipe.errors import short_error
from qpipe.executors import RunSetup
from qpipe.inputs import Inputs, load_inputs
from qpipe.lifecycle import Lifecycle
from qpipe.metrics import check_for_task, headline
from qpipe.outcome import Outcome, WorkerError, error_log_name, write_files
from qpipe.outputs import claim_output, free_reserve
from qpipe.plugins import QpipePluginManager
from qpipe.results import PipelineResults, PipelineRun
from qpipe.sanity import apply_strict
from qpipe.schedule import schedule
from qpipe.selection import implied, select
from qpipe.variant import VariantRunner


def now() -> str:
    """The local time, to the second, as results.json records it."""
    return _dt.datetime.now().isoformat(timespec="seconds")


class PipelineRunner:
    """Runs a resolved pipeline once into ``output_dir``. Use ``run_pipeline`` for the usual path."""

    def __init__(self, pm: QpipePluginManager, resolved: ResolvedPipeline, output_dir: Path,
                 settings: dict[str, Any] | None = None, timestamp: str | None = None):
        self.pm = pm
        self.resolved = resolved
        self.output_dir = Path(output_dir)
        self.settings = settings or {}
        self.timestamp = timestamp
        self.warnings: list[str] = []
        self.started = False  # whether anything was written into the output folder

    def _start_converter(self) -> None:
        """Start the TFLite converter process now, when variants will convert in this process:
        its TensorFlow import then overlaps loading the model, not the first conversion."""
        from qpipe.schedule import chosen_executor

        config = self.resolved.config.executor
        in_process = int(self.settings.get("jobs") or config.jobs) == 1
        if in_process and chosen_executor(config, self.settings) != "ray" and any(
                type(rv.quantizer.component).uses_converter for rv in self.resolved.variants):
            from qpipe.convertproc import start

            start()

    def run(self) -> PipelineResults:
        """Run every variant, select, report; return the results (also in ``results.json``)."""
        # an unchanged re-run loads the model and data only if a plugin touches them
        inputs = inputs_if_all_cached(self.pm, self.resolved, self.settings)
        if inputs is None:
            self._start_converter()
            inputs = load_inputs(self.pm, self.resolved)
        run = self._start(inputs)
        results, lifecycle = run.results, Lifecycle(self.pm, run, self.warnings)
        try:
            lifecycle.fire("qpipe_pipeline_started")
            self._run_variants(inputs, lifecycle)
            self._select(results)
            from qpipe.report import try_write_report  # summary table and charts, tracked or not

            self.warnings += try_write_report(results, self.output_dir, (results.extra.get("cache") or {}).get("dir"))
            # inside the try: a signal landing during this write still closes the trackers' runs
            results.status, results.finished = "finished", now()
            results.write(self.output_dir, last=True)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            results.status, results.finished = ("interrupted" if interrupted else "crashed"), now()
            if not interrupted:
                results.extra["error"] = short_error(exc)
            try:
                results.write(self.output_dir, last=True)
            finally:  # the trackers close their runs even when the record cannot be written
                lifecycle.fire("qpipe_pipeline_failed", error=exc, interrupted=interrupted)
                free_reserve(self.output_dir)
            raise
        lifecycle.fire("qpipe_pipeline_finished", results=results)
        results.write(self.output_dir, last=True)  # plugins may add to results.extra
        free_reserve(self.output_dir)
        return results

    def _start(self, inputs: Inputs) -> PipelineRun:
        """Check the evaluators against the task, then write the folder's first files."""
        cfg = self.resolved.config
        evaluators = check_for_task(self.resolved, inputs.task, inputs.tasks)  # before any variant runs
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = PipelineResults(
            pipeline=cfg.name, baseline=self.resolved.baseline, started=now(), timestamp=self.timestamp,
            qpipe_version=__version__,
            model={"source": inputs.model.source, "flavor": inputs.model.flavor, "sha256": inputs.model.sha256},
            data={k: {"path": str(p), "sha256": inputs.data_sha256.get(k) or file_sha256(p)}
                  for k, p in inputs.data_files.items()},
            task=inputs.task.to_dict(), headline=headline(evaluators, inputs.tasks),
            tasks={name: task.to_dict() for name, task in inputs.tasks.items()})
        if inputs.unlabelled:
            self.warnings.append(f"output(s) without labels in data.evaluation: {', '.join(inputs.unlabelled)}: "
                                 "only compared with the baseline (fidelity); add them to 'labels:' as "
                                 "{output: KEY} to measure them")
            results.extra["unlabelled_outputs"] = list(inputs.unlabelled)
        results.extra["pipeline_file"] = str(self.resolved.loaded.path)
        results.extra["evaluators"] = [bound.component.name for bound in self.resolved.evaluators]
        self.started = True
        (self.output_dir / "pipeline.yaml").write_text(self.resolved.loaded.text, encoding="utf-8")
        results.write(self.output_dir)
        return PipelineRun(name=cfg.name, config=cfg, config_path=self.resolved.loaded.path,
                           config_text=self.resolved.loaded.text, output_dir=self.output_dir, results=results,
                           model=inputs.model, data_files=inputs.data_files, settings=self.settings)

    def _run_variants(self, inputs: Inputs, lifecycle: Lifecycle) -> None:
        """Record every variant's outcome as it arrives, then put them in the pipeline's order."""
        results = lifecycle.run.results
        cache = RunCache(self.resolved, inputs, self.settings,
                         {k: v.get("sha256") for k, v in results.data.items()}, self.warnings.append)
        results.extra["cache"] = cache.stats
        setup = RunSetup(self.pm, self.resolved, inputs, self.settings, self.output_dir,
                         VariantRunner(self.pm, self.resolved, inputs, lifecycle.fire), self.warnings.append)
        for rv, outcome in schedule(setup, cache, lifecycle.fire, results.extra):
            if not outcome.live:  # it ran elsewhere: its files and hook calls arrive now
                lifecycle.replay(outcome.events or [("qpipe_variant_started", {"variant": rv.config.name})])
                write_files(self.output_dir, outcome.files)
            cache.keep(rv, outcome, self.output_dir)
            self._record(rv, outcome, lifecycle)
        order = {rv.config.name: i for i, rv in enumerate(self.resolved.variants)}
        results.variants.sort(key=lambda v: order.get(v.name, len(order)))  # parallel runs end in any order

    def _record(self, rv: ResolvedVariant, outcome: Outcome, lifecycle: Lifecycle) -> None:
        """Add one variant to results.json, then fire its finished or failed hook."""
        result, results = outcome.result, lifecycle.run.results
        apply_strict(result, self.resolved.strict(result.name))
        results.variants.append(result)
        if result.status != "ok":
            text = result.metadata.get("traceback") or result.error or "failed"
            (self.output_dir / error_log_name(result.name)).write_text(str(text), encoding="utf-8")
            if self.settings.get("debug"):
                sys.stderr.write(f"--- {result.name} failed:\n{text}\n")
        results.write(self.output_dir)
        if result.status == "ok":
            lifecycle.fire("qpipe_variant_finished", result=result)
            return
        error = outcome.error  # None for a variant failed by a strict check
        if error is None and not outcome.live:
            error = WorkerError(result.error or "failed")
        lifecycle.fire("qpipe_variant_failed", result=result, error=error)

    def _select(self, results: PipelineResults) -> None:
        """Name the variant to ship and, when gating, whether the build passes."""
        cfg = self.resolved.config
        constraints = list(self.resolved.constraints)
        base = results.variant(self.resolved.baseline)
        labelled = [name for name in results.tasks if name not in results.extra.get("unlabelled_outputs", [])]
        guards = implied(results.headline, constraints, base.metrics if base else {}, labelled,
                         cfg.select.output_tolerance) if (constraints or cfg.objective is not None) else []
        if constraints or cfg.objective is not None:
            reference = None if cfg.select.allow_baseline else self.resolved.baseline
            results.selected = select(results.variants, constraints + guards, cfg.objective_pair(), reference)
            if guards:
                results.selected["implied"] = [f"{c} (select.output_tolerance)" for c in guards]
        constraints += guards
        if not (cfg.gate or self.settings.get("gate")):
            return
        chosen = (results.selected or {}).get("variant")
        if not constraints:
            results.gate = {"passed": True, "reason": "no constraints declared"}
        elif chosen:
            results.gate = {"passed": True, "reason": f"{chosen} meets {', '.join(map(str, constraints))}"}
        else:
            selected = results.selected or {}
            results.gate = {"passed": False, "reason": selected.get("reason", "no variant selected"),
                            "constraints": [str(c) for c in constraints], "failures": selected.get("rejected", {})}


def run_pipeline(pm: QpipePluginManager, resolved: ResolvedPipeline, output_dir: Path | None = None,
                 settings: dict[str, Any] | None = None) -> tuple[PipelineResults, list[str]]:
    """Run ``resolved`` into a newly claimed output folder (``qpipe.outputs``); return the
    results and any warnings raised by lifecycle plugins."""
    settings = settings or {}
    folder = claim_output(resolved, output_dir, force=bool(settings.get("force")))
    runner = PipelineRunner(pm, resolved, folder.path, settings, timestamp=folder.timestamp)
    try:
        results = runner.run()
    except BaseException:
        if not runner.started:  # stopped before writing anything
            folder.release()
        raise
    return results, runner.warnings
