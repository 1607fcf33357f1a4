"""The MLflow tracker: one parent run per pipeline run, one nested child run per variant.

Built on ``MlflowClient`` (no global active run): the parent is created when the pipeline
starts (after a reachability check, so a dead server stops the run before any conversion),
a child when a variant starts; each child is ended FINISHED or FAILED as its variant ends,
and whatever is still open when the run stops is ended KILLED (Ctrl-C) or FAILED (a crash).

If the server dies mid-run, the first failing call turns tracking off for the rest of the
run with one warning; ``results.json`` holds everything and ``qpipe log OUTPUT_DIR`` sends it
later (a replay ends the dead run's leftovers FAILED). MLflow is imported inside methods only.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import functools
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from qpipe import QpipeError
from qpipe.errors import short_error
from qpipe.results import RESULTS_FILE, PipelineResults, VariantResult

from qpipe_mlflow import datasets as data_inputs
from qpipe_mlflow.fields import (artifact_path, artifact_sha256, headline_tags, plain_result, selected_headline,
                                 variant_params, variant_tags)
from qpipe_mlflow.store import (KIND, PARENT_TAG, context_tags, experiment, metric_key, ms, number,
                                parse_time, probe, quiet_logs, text, upload)
from qpipe_mlflow.naming import (curve_key, history_curves, input_tags, parent_name, run_name, short_names, tidy,
                                 version_tags)
from qpipe_mlflow.target import Target

#: bounded retries and timeouts for HTTP stores (MLflow's defaults wait minutes on a dead
#: server); set the variables yourself to override
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
END_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "crashed": "FAILED"}
MAX_TAG = 5000
MAX_PARAM = 6000
#: final metrics that do not describe the evaluation data (no dataset on them)
NOT_EVALUATION = ("train_", "val_", "variant_seconds")
#: run metrics that describe the run rather than the model: kept off the Models tab
NOT_MODEL = ("_delta", "_seconds")
#: results.json metrics that are tags in MLflow (``qpipe.cache`` says hit or miss)
NOT_METRIC = ("cache_hit", "cache_hit_delta")


def guarded(method: Callable) -> Callable:
    """Run a tracker call; a lost server turns tracking off with one warning (a QpipeError the
    runner reports), later calls do nothing. Warnings deferred from strict hooks come out here."""

    @functools.wraps(method)
    def wrapper(self: "Tracker", *args: Any, **kwargs: Any) -> Any:
        if self.lost is None:
            try:
                with quiet_logs():
                    method(self, *args, **kwargs)
            except QpipeError as exc:
                self.deferred.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - tracking must never fail the pipeline
                self.deferred.append(self._explain(method.__name__, exc))
        if self.deferred:
            message = "; ".join(dict.fromkeys(self.deferred))
            self.deferred.clear()
            raise QpipeError(message)

    return wrapper


class Tracker:
    """Logs one qpipe run to MLflow. Create it with ``Tracker.connect``."""

    def __init__(self, target: Target, client: Any, experiment_id: str):
        self.target = target
        self.client = client
        self.experiment_id = experiment_id
        self.parent_id: str | None = None
        self.run_name: str | None = None
        self.children: dict[str, str] = {}  # open child runs by variant name
        self.steps: dict[str, int] = {}  # last step metric logged per variant
        self.lost: str | None = None
        self.deferred: list[str] = []
        self.registered: str | None = None
        self.output_dir: Path | None = None
        self.rules: dict[str, list[tuple[str, str]]] = {}  # grid names -> short run names
        self.datasets: dict[str, Any] = {}  # mlflow Dataset per data section
        self.recorded: str | None = None  # the parent run id results.json had before this run
        self.folders: Any = None  # pyfunc.ModelFolders once a variant is logged as a model
        self.context: dict[str, Any] = {}  # MLflow's context tags (user, source, git), on every run

    # ------------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, target: Target) -> "Tracker":
        """Check the store answers and get (or create) the experiment; QpipeError if not."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in qpipe's output
        if target.is_http:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            probe(target)
        db = target.sqlite_path
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise QpipeError(f"MLflow: cannot create the folder of {db} ({target.source}): {exc}") from None
        from mlflow import MlflowClient

        try:
            with target.store_lock(), quiet_logs():
                client = MlflowClient(tracking_uri=target.uri)
                experiment_id = experiment(client, target)
        except QpipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds here
            raise QpipeError(f"MLflow tracking at {target.uri} (from {target.source}) is not usable: "
                             f"{short_error(exc)}; fix the URI or run with --no-tracking") from None
        _skip_last_collection()
        return cls(target, client, experiment_id)

    def info(self) -> dict[str, Any]:
        """Where this run was logged (kept in results.json under extra.mlflow)."""
        return {"tracking_uri": self.target.uri, "experiment": self.target.experiment,
                "experiment_id": self.experiment_id, "run_id": self.parent_id, "run_name": self.run_name}

    # ------------------------------------------------------------------ parent run
    def start(self, run: Any) -> None:
        """Create the parent run (a QpipeError here stops the pipeline before any conversion)."""
        results: PipelineResults = run.results
        self.output_dir = Path(run.output_dir)
        started = parse_time(results.started)
        self.run_name = parent_name(run, started or _dt.datetime.now())
        self.rules = short_names(run.config)
        self.context = context_tags()
        tags = {KIND: "pipeline", "qpipe.pipeline": run.name, "qpipe.status": "running",
                "qpipe.started": results.started or "",
                "qpipe.output_dir": str(Path(run.output_dir).resolve()), "qpipe.pipeline_file": str(run.config_path),
                "qpipe.baseline": results.baseline, **version_tags(results), **input_tags(results)}
        if run.config.description:
            tags["mlflow.note.content"] = run.config.description
        if run.replay:
            tags["qpipe.replayed"] = "true"
        try:
            with quiet_logs():
                parent = self.client.create_run(self.experiment_id, start_time=ms(started) if run.replay else None,
                                                tags={**self.context, **tags}, run_name=self.run_name)
                self.parent_id = parent.info.run_id
                cfg = run.config
                self.log(self.parent_id, params={
                    "pipeline": run.name, "baseline": results.baseline,
                    "evaluators": ",".join(results.extra.get("evaluators") or [e.name for e in cfg.evaluators]),
                    "model": cfg.model.path or cfg.model.function, "calibrator": cfg.calibrator.name})
                self.datasets = data_inputs.datasets(results, cfg, read=not run.replay)
                if self.datasets:
                    self.client.log_inputs(self.parent_id, data_inputs.inputs(self.datasets, list(self.datasets)))
        except Exception as exc:  # noqa: BLE001
            raise QpipeError(f"MLflow: cannot start a run in experiment '{self.target.experiment}' at "
                             f"{self.target.uri}: {short_error(exc)}; fix it or run with --no-tracking") from None
        self.recorded = (run.results.extra.get("mlflow") or {}).get("run_id")
        run.results.extra["mlflow"] = self.info()

    @guarded
    def finish(self, run: Any, results: PipelineResults) -> None:
        """Log the pipeline file, results.json, the report; end the parent run."""
        for variant in list(self.children):  # only when a replay misses a variant's end
            self.client.set_terminated(self.children.pop(variant), "KILLED")
        selected = results.selected or results.extra.get("selected") or {}
        tags = {"qpipe.status": results.status}
        if selected.get("variant"):
            tags.update({"qpipe.selected": selected["variant"], "qpipe.selected_reason": selected.get("reason", "")})
        elif selected.get("reason"):
            tags["qpipe.selected_reason"] = selected["reason"]
        if results.gate is not None:
            tags["qpipe.gate"] = "passed" if results.gate.get("passed") else "failed"
        if self.registered:
            tags["qpipe.registered_model"] = self.registered
        ok = sum(v.status == "ok" for v in results.variants)
        metrics = {"variants_ok": ok, "variants_failed": len(results.variants) - ok}
        self.log(self.parent_id, tags={**tags, **headline_tags(results)}, params={"variants": len(results.variants)},
                 metrics={**metrics, **selected_headline(results, selected.get("variant"))})
        self.log_parent_files(run, results)
        self.client.set_terminated(self.parent_id, END_STATUS.get(results.status, "FINISHED"),
                                   end_time=ms(parse_time(results.finished)) if run.replay else None)
        if run.replay:
            from qpipe_mlflow.resend import supersede

            with contextlib.suppress(Exception):
                supersede(self, run)
        register = run.config.tracking.register_model
        if register is not None and self.registered is None:
            raise QpipeError(f"tracking.register: variant '{register.variant}' did not finish ok; "
                             f"nothing registered as '{register.name}'")

    def log_parent_files(self, run: Any, results: PipelineResults) -> None:
        """The pipeline file, results.json and the report, in one upload."""
        from qpipe import report

        texts = {"pipeline.yaml": run.config_text, RESULTS_FILE: json.dumps(results.to_dict(), indent=2) + "\n"}
        files = report.report_files(run.output_dir)
        with tempfile.TemporaryDirectory(prefix="qpipe-report-") as tmp:
            if len(files) < 2:  # a folder from before reports existed: draw them aside, not in it
                Path(tmp, "report").mkdir()
                files = report.write_report(results, Path(tmp, "report"))
            upload(self.client, self.parent_id, texts, files)

    def close(self) -> None:
        """Remove the model folders' scratch space."""
        if self.folders is not None:
            self.folders.close()
            self.folders = None

    @guarded
    def fail(self, run: Any, error: BaseException, interrupted: bool) -> None:
        """End every open run KILLED (Ctrl-C) or FAILED (a crash); keep what is known."""
        status = "KILLED" if interrupted else "FAILED"
        why = "interrupted" if interrupted else short_error(error)
        for variant in list(self.children):
            run_id = self.children.pop(variant)
            self.log(run_id, tags={"qpipe.status": "interrupted" if interrupted else "crashed",
                                   "qpipe.error": why})
            self.client.set_terminated(run_id, status)
        if self.parent_id is None:
            return
        self.log(self.parent_id, tags={"qpipe.status": "interrupted" if interrupted else "crashed",
                                       "qpipe.error": why})
        with contextlib.suppress(Exception):
            self.client.log_text(self.parent_id, json.dumps(run.results.to_dict(), indent=2) + "\n", RESULTS_FILE)
        self.client.set_terminated(self.parent_id, status)

    # ------------------------------------------------------------------ child runs
    def open_child(self, variant: str) -> str:
        """The child run of ``variant``, created on first use."""
        if variant not in self.children:
            name = run_name(variant, self.rules)
            child = self.client.create_run(self.experiment_id, run_name=name, tags={
                **self.context, PARENT_TAG: self.parent_id, KIND: "variant", "qpipe.variant": variant,
                "qpipe.status": "running"})
            self.children[variant] = child.info.run_id
        return self.children[variant]

    def variant_started(self, variant: str) -> None:
        """Create the child run now (so the UI shows it running); never raises: the warning
        comes out with the next call (the runner treats errors in this hook as fatal)."""
        if self.lost is not None:
            return
        try:
            with quiet_logs():
                self.open_child(variant)
        except Exception as exc:  # noqa: BLE001
            self.deferred.append(self._explain("variant_started", exc))

    @guarded
    def variant_metrics(self, variant: str, metrics: dict[str, float], step: int | None) -> None:
        """Intermediate metrics (e.g. per epoch) as step metrics of the child run."""
        from mlflow.entities import Metric

        run_id = self.open_child(variant)
        step = int(step) if step is not None else self.steps.get(variant, 0)
        now = int(time.time() * 1000)
        batch = [Metric(metric_key(curve_key(k)), tidy(number(v)), now, step) for k, v in metrics.items()
                 if number(v) is not None]
        self.client.log_batch(run_id, metrics=batch)
        self.steps[variant] = max(step, self.steps.get(variant, 0))

    @guarded
    def variant_ended(self, run: Any, result: VariantResult) -> None:
        """Params, final metrics (step 0, on its logged model and the evaluation dataset), tags,
        data inputs and files of a finished or failed variant; end its child run."""
        run_id = self.open_child(result.name)
        ok = result.status == "ok"
        try:
            metrics = dict(result.metrics)
            if result.seconds is not None:
                metrics["variant_seconds"] = result.seconds
            params, tags = variant_params(result), variant_tags(run, result)
            model_id = self.log_model(run, result, run_id, params) if ok else None
            # curves not sent live (a replay, a cached variant) go in the same batch
            curves = history_curves(result.metadata) if result.name not in self.steps else []
            self.log(run_id, params=params, metrics=metrics, tags=tags, model_id=model_id, curves=curves)
            if self.datasets:
                self.client.log_inputs(run_id, data_inputs.inputs(self.datasets, data_inputs.used_sections(result)))
            self.log_variant_files(run, result, run_id)
            register = run.config.tracking.register_model
            if ok and register is not None and register.variant == result.name:
                self.register(run, result, run_id, model_id, register.name)
        finally:
            self.children.pop(result.name, None)
            self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_model(self, run: Any, result: VariantResult, run_id: str, params: dict[str, Any]) -> str:
        """The variant as a LoggedModel of its child run (see pyfunc.py); its id."""
        from qpipe_mlflow.pyfunc import log_variant_model

        path = artifact_path(run, result)
        tags = {"qpipe.variant": result.name, "qpipe.quantizer": result.quantizer, "qpipe.pipeline": run.name}
        if path is not None and path.is_file():
            tags["qpipe.artifact_sha256"] = artifact_sha256(path)
        if self.folders is None:
            from qpipe_mlflow.pyfunc import ModelFolders

            # templates kept across runs in this run's cache; never in a folder a replayed
            # results.json names (qpipe log writes nothing outside what it was given)
            cache = None if run.replay else (run.results.extra.get("cache") or {}).get("dir")
            self.folders = ModelFolders(Path(cache) if cache else None)
        return log_variant_model(self.client, self.experiment_id, run_id, run_name(result.name, self.rules),
                                 path if run.config.tracking.log_models else None, result.backend,
                                 {k: text(v, MAX_PARAM) for k, v in params.items()}, tags, self.folders)

    def log_variant_files(self, run: Any, result: VariantResult, run_id: str) -> None:
        """result.json, the traceback, the reports a component wrote (e.g. sensitivity) and the
        artifact, in one upload."""
        entry = next((v for v in run.results.to_dict()["variants"] if v["name"] == result.name), None)
        texts = {"result.json": json.dumps(entry or plain_result(result), indent=2) + "\n"}
        if result.metadata.get("traceback"):
            texts["traceback.txt"] = str(result.metadata["traceback"])
        files = [f for name in result.metadata.get("files", []) if (f := Path(run.output_dir) / str(name)).is_file()]
        path = artifact_path(run, result)  # a file, or a folder logged under its name
        if path is not None and run.config.tracking.log_models:
            files.append(path)
        upload(self.client, run_id, texts, files)

    def register(self, run: Any, result: VariantResult, run_id: str, model_id: str | None, name: str) -> None:
        """Register the variant's logged model as a new version of ``name``."""
        from qpipe_mlflow.pyfunc import register

        path = artifact_path(run, result)
        if model_id is None or path is None or path.suffix != ".tflite":
            raise QpipeError(f"tracking.register: variant '{result.name}' has no .tflite model to register "
                             "(tracking.log_models must be on)")
        tags = {"qpipe.variant": result.name, "qpipe.quantizer": result.quantizer,
                "qpipe.artifact_sha256": artifact_sha256(path), "qpipe.pipeline": run.name}
        self.registered = register(self.target.uri, model_id, name, tags)
        self.log(run_id, tags={"qpipe.registered_model": self.registered})

    # ------------------------------------------------------------------ helpers
    def log(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None, model_id: str | None = None,
            curves: list[tuple[str, float, int]] | None = None) -> None:
        """One log_batch per MLflow limit (100 params, 100 tags, 1000 items); values made valid
        (finite numbers rounded, short strings); metrics at step 0, linked to ``model_id`` (but
        deltas and timings) and, unless about training, to the evaluation dataset; ``curves``
        (key, value, step) as they are."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        evaluation = self.datasets.get("evaluation")
        params_ = [Param(metric_key(k), text(v, MAX_PARAM)) for k, v in (params or {}).items()]
        tags_ = [RunTag(k, text(v, MAX_TAG)) for k, v in (tags or {}).items() if v is not None]
        metrics_ = []
        for k, v in (metrics or {}).items():
            if number(v) is None or k in NOT_METRIC:
                continue
            on_data = evaluation is not None and not str(k).startswith(NOT_EVALUATION)
            on_model = model_id if not str(k).endswith(NOT_MODEL) else None
            metrics_.append(Metric(metric_key(k), tidy(number(v)), now, 0, model_id=on_model,
                                   dataset_name=evaluation.name if on_data else None,
                                   dataset_digest=evaluation.digest if on_data else None))
        metrics_ += [Metric(metric_key(k), tidy(float(v)), now, step) for k, v, step in curves or []]
        while params_ or tags_ or metrics_:
            self.client.log_batch(run_id, params=params_[:100], tags=tags_[:100], metrics=metrics_[:800])
            params_, tags_, metrics_ = params_[100:], tags_[100:], metrics_[800:]

    def _explain(self, where: str, exc: BaseException) -> str:
        """A warning for a failed call; a server that no longer answers turns tracking off."""
        if self.target.is_http:
            try:
                probe(self.target, timeout=3.0)
            except QpipeError:
                self.lost = short_error(exc)
                folder = f" {self.output_dir}" if self.output_dir else " OUTPUT_DIR"
                return (f"MLflow server {self.target.uri} stopped answering ({where}); tracking is off for the "
                        f"rest of this run. results.json keeps everything: send it later with "
                        f"'qpipe log{folder}'")
        return f"MLflow ({where}): {short_error(exc)}"


# --------------------------------------------------------------------------- free functions


@functools.lru_cache(maxsize=1)
def _skip_last_collection() -> None:
    """At interpreter exit, freeze what is left instead of letting the collector walk it: MLflow
    brings some 150 000 objects, and the last collections over them cost about 0.7 s of every
    tracked run. Nothing is lost: by then every run is ended and every file closed (atexit
    callbacks and ``weakref.finalize`` cleanups still run; the OS takes back the memory). Only at
    exit, so a long-lived process (a notebook, pytest) collects as usual until then."""
    atexit.register(gc.freeze)


def announce_existing(tracker: Tracker, old: Any) -> None:
    """One line on stderr: ``qpipe log`` found the run already in the store and sent nothing."""
    sys.stderr.write(f"mlflow: run {old.info.run_name} ({old.info.run_id}) is already in experiment "
                     f"'{tracker.target.experiment}' at {tracker.target.uri}, complete; nothing sent\n")


def announce(tracker: Tracker) -> None:
    """One line on stderr: where the run went and how to look at it."""
    sys.stderr.write(f"mlflow: logged run {tracker.run_name} ({tracker.parent_id}) to experiment "
                     f"'{tracker.target.experiment}' at {tracker.target.uri}; "
                     f"view: {tracker.target.ui_hint(tracker.experiment_id)}\n")
