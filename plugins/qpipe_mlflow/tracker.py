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

import contextlib
import datetime as _dt
import functools
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import qpipe
from qpipe import QpipeError
from qpipe.components import file_sha256
from qpipe.results import RESULTS_FILE, PipelineResults, VariantResult

from qpipe_mlflow.target import Target

KIND = "qpipe.kind"  # "pipeline" on parent runs, "variant" on child runs
PARENT_TAG = "mlflow.parentRunId"
#: bounded retries and timeouts for HTTP stores (MLflow's defaults wait minutes on a dead
#: server); set the variables yourself to override
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
END_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "crashed": "FAILED"}
VERSION_TAGS = {"tensorflow": "qpipe.tensorflow_version", "ai-edge-litert": "qpipe.litert_version",
                "tf-keras": "qpipe.tf_keras_version", "keras": "qpipe.keras_version",
                "tensorflow-model-optimization": "qpipe.tfmot_version", "mlflow": "qpipe.mlflow_version"}
MAX_TAG = 5000
MAX_PARAM = 6000


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

    # ------------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, target: Target) -> "Tracker":
        """Check the store answers and get (or create) the experiment; QpipeError if not."""
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
                             f"{one_line(exc)}; fix the URI or run with --no-tracking") from None
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
        stamp = results.timestamp or (started or _dt.datetime.now()).strftime('%Y%m%d-%H%M%S')
        self.run_name = f"{run.name}-{stamp}"
        tags = {KIND: "pipeline", "qpipe.pipeline": run.name, "qpipe.status": "running",
                "qpipe.output_dir": str(Path(run.output_dir).resolve()), "qpipe.pipeline_file": str(run.config_path),
                "qpipe.baseline": results.baseline, **version_tags(results), **input_tags(results)}
        if run.config.description:
            tags["mlflow.note.content"] = run.config.description
        if run.replay:
            tags["qpipe.replayed"] = "true"
        try:
            with quiet_logs():
                parent = self.client.create_run(self.experiment_id, start_time=ms(started) if run.replay else None,
                                                tags=with_context(tags), run_name=self.run_name)
                self.parent_id = parent.info.run_id
                cfg = run.config
                self.log(self.parent_id, params={
                    "pipeline": run.name, "baseline": results.baseline, "variants": len(cfg.variants),
                    "evaluators": ",".join(e.name for e in cfg.evaluators),
                    "model": cfg.model.path or cfg.model.function, "calibrator": cfg.calibrator.name})
        except Exception as exc:  # noqa: BLE001
            raise QpipeError(f"MLflow: cannot start a run in experiment '{self.target.experiment}' at "
                             f"{self.target.uri}: {one_line(exc)}; fix it or run with --no-tracking") from None
        run.results.extra["mlflow"] = self.info()
        if run.replay:
            with contextlib.suppress(Exception):
                self.supersede(run)

    def supersede(self, run: Any) -> None:
        """End FAILED the runs an earlier, interrupted attempt left RUNNING for this output folder."""
        folder = str(Path(run.output_dir).resolve())
        if "'" in folder:
            return
        stale = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`qpipe.output_dir` = '{folder}' and attributes.status = 'RUNNING'"))
        for old in stale:
            if old.info.run_id == self.parent_id:
                continue
            for child in self.client.search_runs([self.experiment_id], filter_string=(
                    f"tags.`{PARENT_TAG}` = '{old.info.run_id}' and attributes.status = 'RUNNING'")):
                self.client.set_terminated(child.info.run_id, "FAILED")
            self.client.set_tag(old.info.run_id, "qpipe.superseded_by", self.parent_id)
            self.client.set_terminated(old.info.run_id, "FAILED")

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
        self.log(self.parent_id, tags={**tags, **headline_tags(results)},
                 metrics={**metrics, **selected_headline(results, selected.get("variant"))})
        self.log_parent_files(run, results)
        self.client.set_terminated(self.parent_id, END_STATUS.get(results.status, "FINISHED"),
                                   end_time=ms(parse_time(results.finished)) if run.replay else None)
        register = run.config.tracking.register_model
        if register is not None and self.registered is None:
            raise QpipeError(f"tracking.register: variant '{register.variant}' did not finish ok; "
                             f"nothing registered as '{register.name}'")

    def log_parent_files(self, run: Any, results: PipelineResults) -> None:
        from qpipe import report

        self.client.log_text(self.parent_id, run.config_text, "pipeline.yaml")
        self.client.log_text(self.parent_id, json.dumps(results.to_dict(), indent=2) + "\n", RESULTS_FILE)
        files = report.report_files(run.output_dir)
        if len(files) < 2:  # a folder from before reports existed: draw them aside, not in it
            with tempfile.TemporaryDirectory(prefix="qpipe-report-") as tmp:
                for path in report.write_report(results, Path(tmp)):
                    self.client.log_artifact(self.parent_id, str(path))
            return
        for path in files:
            self.client.log_artifact(self.parent_id, str(path))

    @guarded
    def fail(self, run: Any, error: BaseException, interrupted: bool) -> None:
        """End every open run KILLED (Ctrl-C) or FAILED (a crash); keep what is known."""
        status = "KILLED" if interrupted else "FAILED"
        why = "interrupted" if interrupted else f"{type(error).__name__}: {one_line(error)}"
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
            child = self.client.create_run(self.experiment_id, run_name=variant, tags=with_context({
                PARENT_TAG: self.parent_id, KIND: "variant", "qpipe.variant": variant, "qpipe.status": "running"}))
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
        batch = [Metric(metric_key(k), v, now, step) for k, v in metrics.items() if number(v) is not None]
        self.client.log_batch(run_id, metrics=batch)
        self.steps[variant] = max(step, self.steps.get(variant, 0))

    @guarded
    def variant_ended(self, run: Any, result: VariantResult) -> None:
        """Params, metrics, tags and files of a finished or failed variant; end its child run."""
        run_id = self.open_child(result.name)
        ok = result.status == "ok"
        try:
            step = self.steps.get(result.name, 0)
            metrics = {k: v for k, v in result.metrics.items()}
            if result.seconds is not None:
                metrics["variant_seconds"] = result.seconds
            self.log(run_id, params=variant_params(result), metrics=metrics, tags=variant_tags(run, result), step=step)
            self.log_variant_files(run, result, run_id)
            register = run.config.tracking.register_model
            if ok and register is not None and register.variant == result.name:
                self.register(run, result, run_id, register.name)
        finally:
            self.children.pop(result.name, None)
            self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_variant_files(self, run: Any, result: VariantResult, run_id: str) -> None:
        entry = next((v for v in run.results.to_dict()["variants"] if v["name"] == result.name), None)
        self.client.log_text(run_id, json.dumps(entry or _plain(result), indent=2) + "\n", "result.json")
        if result.metadata.get("traceback"):
            self.client.log_text(run_id, str(result.metadata["traceback"]), "traceback.txt")
        for name in result.metadata.get("files", []):  # reports a component wrote (e.g. sensitivity)
            extra = Path(run.output_dir) / str(name)
            if extra.is_file():
                self.client.log_artifact(run_id, str(extra))
        path = artifact_path(run, result)
        if path is None or not run.config.tracking.log_models:
            return
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), path.name)
        else:
            self.client.log_artifact(run_id, str(path))

    def register(self, run: Any, result: VariantResult, run_id: str, name: str) -> None:
        """Log the variant as a pyfunc model on its child run and register it as ``name``."""
        from qpipe_mlflow.pyfunc import log_and_register

        path = artifact_path(run, result)
        if path is None or not path.is_file():
            raise QpipeError(f"tracking.register: variant '{result.name}' has no artifact file to register")
        tags = {"qpipe.variant": result.name, "qpipe.quantizer": result.quantizer,
                "qpipe.artifact_sha256": file_sha256(path), "qpipe.pipeline": run.name}
        model_uri, version = log_and_register(self.target.uri, run_id, path, name, result.backend, result.name, tags)
        self.registered = model_uri
        self.log(run_id, tags={"qpipe.registered_model": model_uri})

    # ------------------------------------------------------------------ helpers
    def log(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None, step: int = 0) -> None:
        """log_batch in chunks MLflow accepts; values made valid (finite numbers, short strings)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        items: list[Any] = [Param(metric_key(k), text(v, MAX_PARAM)) for k, v in (params or {}).items()]
        items += [RunTag(k, text(v, MAX_TAG)) for k, v in (tags or {}).items() if v is not None]
        items += [Metric(metric_key(k), number(v), now, step) for k, v in (metrics or {}).items()
                  if number(v) is not None]
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            self.client.log_batch(run_id, params=[i for i in chunk if isinstance(i, Param)],
                                  tags=[i for i in chunk if isinstance(i, RunTag)],
                                  metrics=[i for i in chunk if isinstance(i, Metric)])

    def _explain(self, where: str, exc: BaseException) -> str:
        """A warning for a failed call; a server that no longer answers turns tracking off."""
        if self.target.is_http:
            try:
                probe(self.target, timeout=3.0)
            except QpipeError:
                self.lost = one_line(exc)
                folder = f" {self.output_dir}" if self.output_dir else " OUTPUT_DIR"
                return (f"MLflow server {self.target.uri} stopped answering ({where}); tracking is off for the "
                        f"rest of this run. results.json keeps everything: send it later with "
                        f"'qpipe log{folder}'")
        return f"MLflow ({where}): {type(exc).__name__}: {one_line(exc)}"


# --------------------------------------------------------------------------- free functions


def probe(target: Target, timeout: float = 5.0) -> None:
    """GET <server>/health; QpipeError naming the URI and the cure if nothing answers."""
    url = target.uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
            response.read(64)
    except urllib.error.HTTPError:
        return  # it answered: the API calls that follow will tell whether it is MLflow
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise QpipeError(f"MLflow tracking server {target.uri} (from {target.source}) is unreachable: {reason}. "
                         "Start it, point --tracking-uri / MLFLOW_TRACKING_URI / tracking.uri at a running "
                         "one, or run with --no-tracking") from None


def experiment(client: Any, target: Target) -> str:
    """The id of the experiment named by ``target``, created (with its artifact location) if new."""
    found = client.get_experiment_by_name(target.experiment)
    if found is None:
        try:
            return client.create_experiment(target.experiment, artifact_location=target.artifact_location,
                                            tags={"qpipe.created_by": f"qpipe {qpipe.__version__}"})
        except Exception:
            found = client.get_experiment_by_name(target.experiment)  # created meanwhile by another run
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise QpipeError(f"MLflow experiment '{target.experiment}' at {target.uri} is deleted: restore it "
                         f"(mlflow experiments restore --experiment-id {found.experiment_id}) or set "
                         "tracking.experiment to another name")
    return found.experiment_id


def variant_params(result: VariantResult) -> dict[str, Any]:
    """quantizer, its options, calibrator and its options, backend and its options (threads,
    batch size), flattened with dots: the same keys on every child of the same quantizer."""
    params: dict[str, Any] = {"quantizer": result.quantizer}
    flatten("quantizer", result.options, params)
    params["calibrator"] = (result.calibrator or {}).get("name", "none")
    flatten("calibrator", (result.calibrator or {}).get("options") or {}, params)
    if result.backend:
        params["backend"] = result.backend.get("name", "")
        flatten("backend", result.backend.get("options") or {}, params)
    if result.metadata.get("engine"):  # which tool produced the artifact (convert once or not)
        params["engine"] = result.metadata["engine"]
    return params


def variant_tags(run: Any, result: VariantResult) -> dict[str, Any]:
    """qpipe.variant, quantizer, status, version, the sha256 of the model, data and artifact."""
    tags = {KIND: "variant", "qpipe.variant": result.name, "qpipe.quantizer": result.quantizer,
            "qpipe.status": result.status,
            "qpipe.version": run.results.qpipe_version or qpipe.__version__, **input_tags(run.results)}
    if result.name == run.results.baseline:
        tags["qpipe.baseline"] = "true"
    if result.error:
        tags["qpipe.error"] = result.error
    if result.metadata.get("cache"):
        tags["qpipe.cache"] = result.metadata["cache"]
    if result.warnings:  # the sanity checks' codes and messages (qpipe.sanity)
        tags["qpipe.warnings"] = " | ".join(f"[{w['code']}] {w['message']}" for w in result.warnings)[:5000]
    if result.metadata.get("engine_reason"):  # why engine auto chose as it did
        tags["qpipe.engine_reason"] = str(result.metadata["engine_reason"])
    path = artifact_path(run, result)
    if path is not None:
        tags["qpipe.artifact_sha256"] = file_sha256(path)
    return tags


def input_tags(results: PipelineResults) -> dict[str, str]:
    """sha256 of the model and of each data file, as recorded in results.json."""
    tags = {}
    if results.model.get("sha256"):
        tags["qpipe.model_sha256"] = results.model["sha256"]
    for section, info in (results.data or {}).items():
        if isinstance(info, dict) and info.get("sha256"):
            tags[f"qpipe.data.{section}_sha256"] = info["sha256"]
    return tags


def version_tags(results: PipelineResults) -> dict[str, str]:
    """qpipe (as recorded by the run), TensorFlow, LiteRT and the rest of the stack (installed)."""
    from qpipe.tfenv import versions

    tags = {"qpipe.version": results.qpipe_version or qpipe.__version__}
    for dist, version in versions().items():
        tags[VERSION_TAGS.get(dist, f"qpipe.{dist}_version")] = version
    return tags


def with_context(tags: dict[str, Any]) -> dict[str, Any]:
    """``tags`` plus what MLflow's fluent API would add (user, source, git commit)."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags(tags)
    except Exception:  # noqa: BLE001 - context tags are a nicety
        return tags


def artifact_path(run: Any, result: VariantResult) -> Path | None:
    if not result.artifact:
        return None
    path = Path(run.output_dir) / result.artifact
    return path if path.exists() else None


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def headline_tags(results: PipelineResults) -> dict[str, str]:
    """The task and the headline metrics, as parent tags (``qpipe.headline_spec``: for ``qpipe compare``)."""
    tags = {"qpipe.headline": ", ".join(h["metric"] for h in results.headline or []),
            "qpipe.headline_spec": json.dumps(results.headline or [])}
    if results.task and results.task.get("name"):
        tags["qpipe.task"] = results.task["name"]
    return tags


def selected_headline(results: PipelineResults, chosen: str | None) -> dict[str, float]:
    """The selected variant's headline metrics (and deltas), as ``selected.<metric>`` parent metrics."""
    variant = results.variant(chosen) if chosen else None
    if variant is None:
        return {}
    names = [n for h in results.headline or [] for n in (h["metric"], h["metric"] + "_delta")]
    return {f"selected.{n}": variant.metrics[n] for n in names if number(variant.metrics.get(n)) is not None}


def metric_key(key: Any) -> str:
    """A name MLflow accepts (letters, digits, _ - . / space and colon)."""
    return re.sub(r"[^\w\-. /:]", "_", str(key))[:250]


def text(value: Any, limit: int) -> str:
    value = value if isinstance(value, str) else json.dumps(value, default=str)
    return value if len(value) <= limit else value[:limit - 3] + "..."


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if len(message) <= 400 else message[:397] + "..."


def parse_time(text_value: str | None) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(text_value) if text_value else None
    except ValueError:
        return None


def ms(moment: _dt.datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


def _plain(result: VariantResult) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(result), default=str))


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Keep MLflow's and alembic's INFO chatter (database migrations) off the console."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def announce(tracker: Tracker) -> None:
    """One line on stderr: where the run went and how to look at it."""
    sys.stderr.write(f"mlflow: logged run {tracker.run_name} ({tracker.parent_id}) to experiment "
                     f"'{tracker.target.experiment}' at {tracker.target.uri}; view: {tracker.target.ui_hint()}\n")
