"""How variants are executed: in this process, in worker processes (``--jobs N``), or on Ray.

The parent process always owns the run. It consults the cache, runs the baseline first, calls
every lifecycle hook (one variant at a time: started, progress..., finished or failed), writes
the artifacts into the output folder and rewrites ``results.json`` as each variant ends.

- ``InProcess`` (the default, ``jobs: 1``): variants run one after another in this process and
  the hooks are called as they go.
- ``Processes`` (``--jobs N``): N spawned worker processes, each with its own TensorFlow. A
  worker loads the model and data itself once and keeps them for the variants it runs.
- ``RayExecutor`` (``executor: {name: ray, address: ...}``, in ``qpipe.remote``): each variant is a
  Ray task; the model and data travel through Ray's object store, not the filesystem.

Remote workers run the same ``Runner.run_variant`` in a private folder. They receive the
baseline's outputs, raw metrics and artifact with each task, and send back the result, the
files the variant wrote, its predictions and the hook calls it made; the parent replays those
calls, so trackers (MLflow) log from the parent as each result arrives.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterator

import numpy as np

from qpipe import hookimpl
from qpipe.components import Artifact
from qpipe.errors import QpipeError, short_error
from qpipe.limits import clamp_jobs
from qpipe.results import VariantResult
from qpipe.sanity import warning

if TYPE_CHECKING:
    from qpipe.config import ResolvedPipeline, ResolvedVariant
    from qpipe.pipeline import Runner

#: hooks a worker records and the parent replays, in order
REPLAYED = ("qpipe_variant_started", "qpipe_variant_progress", "qpipe_variant_metrics")


class WorkerError(QpipeError):
    """A variant could not run in a worker (the worker failed to start or died)."""


# --------------------------------------------------------------------------- values


@dataclass
class Baseline:
    """What a worker needs of the baseline: predictions, raw metrics and the artifact's files."""

    name: str
    outputs: np.ndarray | None
    metrics: dict[str, float]
    artifact: str | None
    format: str
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Outcome:
    """One finished variant as an executor hands it back to the parent."""

    result: VariantResult
    outputs: np.ndarray | None = None
    raw_metrics: dict[str, float] | None = None
    #: files the variant wrote (relative path -> bytes); empty when it ran in the output folder
    files: dict[str, bytes] = field(default_factory=dict)
    #: lifecycle calls made while it ran, to replay; empty when they were made live
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    live: bool = False
    error: BaseException | None = None


@dataclass
class WorkerSpec:
    """Everything a worker process needs to run variants of one run (sent once per task)."""

    run_id: str
    resolved: Any  # ResolvedPipeline
    plugins: list[tuple[str, str, Any]]  # (name, "module" | "object", module name or object)
    settings: dict[str, Any]


# --------------------------------------------------------------------------- executors


class Executor:
    """Runs variants by name and yields an ``Outcome`` for each as it finishes."""

    name = "executor"
    #: whether variants run outside this process (they then need a ``Baseline``)
    remote = False
    jobs = 1

    def warm(self, count: int) -> None:
        """Start ``count`` workers loading the model while the baseline runs (optional)."""

    def run(self, variants: list[ResolvedVariant], baseline: Baseline | None) -> Iterator[Outcome]:
        raise NotImplementedError

    def close(self, cancel: bool = False) -> None:
        """Release workers; ``cancel`` stops running variants (the run was interrupted)."""


class InProcess(Executor):
    """One variant after another in this process; hooks are called as each runs."""

    name = "in-process"

    def __init__(self, runner: Runner):
        self.runner = runner

    def run(self, variants, baseline):
        for rv in variants:
            result = self.runner.run_variant(rv)
            yield Outcome(result=result, outputs=getattr(result, "_outputs", None),
                          raw_metrics=getattr(result, "_raw_metrics", None), live=True,
                          error=getattr(result, "_exception", None))


class Processes(Executor):
    """``jobs`` spawned worker processes, each with its own TensorFlow state."""

    name = "processes"
    remote = True

    def __init__(self, runner: Runner, jobs: int):
        self.spec = worker_spec(runner)
        self.jobs = jobs
        self.pool: Any = None

    def _pool(self) -> Any:
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"))
        return self.pool

    def warm(self, count: int) -> None:
        for _ in range(min(count, self.jobs)):
            self._pool().submit(warm_task, self.spec)

    def run(self, variants, baseline):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        pending = deque(variants)
        solo: deque = deque()  # variants in flight when a worker died: retried one at a time
        tried: set[str] = set()
        inflight: dict[Any, Any] = {}
        while pending or solo or inflight:
            if solo and not inflight:
                rv = solo.popleft()
                inflight[self._pool().submit(run_task, self.spec, rv.config.name, baseline)] = rv
            while pending and not solo and len(inflight) < self.jobs:
                rv = pending.popleft()
                inflight[self._pool().submit(run_task, self.spec, rv.config.name, baseline)] = rv
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            broken = False
            alone = len(inflight) == 1  # a worker that dies running the only variant in flight: no doubt
            for future in done:
                rv = inflight.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken = True
                    if rv.config.name in tried or alone:
                        yield failed_outcome(rv, "the worker process died while running this variant (a crash "
                                                 "in native code, out of memory, or a script starting qpipe "
                                                 "without an 'if __name__ == \"__main__\":' guard)")
                    else:
                        tried.add(rv.config.name)
                        solo.append(rv)
                except Exception as exc:  # noqa: BLE001 - any worker error fails this variant only
                    yield failed_outcome(rv, f"{type(exc).__name__}: {exc}", exc)
            if broken:
                for future, rv in list(inflight.items()):  # they died with the pool
                    inflight.pop(future)
                    tried.add(rv.config.name)
                    solo.append(rv)
                self._discard_pool()

    def _discard_pool(self) -> None:
        if self.pool is not None:
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def close(self, cancel: bool = False) -> None:
        if self.pool is None:
            return
        if cancel:
            self._discard_pool()
        else:
            self.pool.shutdown(wait=True)
            self.pool = None


def make_executor(runner: Runner) -> Executor:
    """The executor the pipeline's ``executor`` section and ``--jobs`` ask for."""
    config = runner.resolved.config.executor
    jobs = runner.settings.get("jobs") or config.jobs
    chosen = runner.settings.get("executor") or ("ray" if runner.settings.get("address") else config.name)
    if chosen == "ray":
        from qpipe.remote import RayExecutor

        if runner.settings.get("jobs"):
            config = config.model_copy(update={"jobs": int(jobs)})
            config.model_fields_set.add("jobs")
        return RayExecutor(runner, config)
    jobs, warning = clamp_jobs(int(jobs), len(runner.resolved.variants))
    if warning:
        runner.warnings.append(warning)
    if jobs > 1:
        return Processes(runner, jobs)
    return InProcess(runner)


# --------------------------------------------------------------------------- the parent's loop


def execute(runner: Runner) -> Generator[VariantResult, None, None]:
    """Run every variant of ``runner`` (baseline first) through the cache and the executor.

    Yields each finished VariantResult after its started/progress hooks were called and its
    artifact is in the output folder; the caller records it and calls finished/failed.
    """
    from qpipe.cache import KeyMaker, VariantCache, cache_dir

    resolved = runner.resolved
    results = runner.run_info.results
    root = cache_dir(resolved.config, resolved.loaded.base_dir, runner.settings)
    cache = VariantCache(root, warn=runner.warnings.append) if root is not None else None
    data_hashes = {k: v.get("sha256") for k, v in results.data.items()}
    keys = KeyMaker(resolved, runner.inputs, data_hashes) if cache is not None else None
    stats = {"dir": str(root) if root else None, "hits": 0, "misses": 0, "stored": 0}
    if cache is None:
        stats["off"] = "--no-cache" if runner.settings.get("no_cache") else "cache: false"
    elif keys is not None and keys.reason:
        stats["off"] = keys.reason
        cache = keys = None
    results.extra["cache"] = stats

    variants = list(resolved.variants)
    first, rest = variants[0], variants[1:]  # resolve() puts the baseline first
    base_key = keys.key(first, None) if keys else None
    others = {rv.config.name: keys.key(rv, base_key) if keys else None for rv in rest}
    to_run = [rv for rv in rest if not (cache and (k := others[rv.config.name]) and cache.get(k))]
    all_cached = bool(cache and base_key and cache.get(base_key) and not to_run)
    # nothing to compute: no worker processes and no Ray connection
    executor = InProcess(runner) if all_cached else make_executor(runner)
    results.extra["executor"] = {"name": executor.name, "jobs": executor.jobs}
    interrupted = True
    try:
        if to_run and executor.remote:  # workers load the model while the baseline runs
            executor.warm(executor.jobs - 1 if executor.jobs else len(to_run))
        base_result = yield from _run_some(runner, executor, [first], {first.config.name: base_key}, cache,
                                           stats, None)
        baseline = _baseline_for_workers(runner, first, base_result) if executor.remote else None
        if base_result is None or base_result.status != "ok":
            others = dict.fromkeys(others)  # without a baseline, fidelity and deltas differ: no caching
        yield from _run_some(runner, executor, rest, others, cache, stats, baseline)
        interrupted = False
    finally:
        executor.close(cancel=interrupted)


class _Deferred:
    """Stands in for a loaded value: attributes given here are known; any other loads it."""

    def __init__(self, load: Any, **known: Any):
        self.__dict__.update(known)
        self._load = load

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._load(), name)

    def __len__(self) -> int:
        return len(self._load())


def inputs_if_all_cached(pm: Any, resolved: ResolvedPipeline, settings: dict[str, Any]) -> Any:
    """When every variant is in the cache, Inputs whose model and data load only if touched.

    An unchanged re-run then imports neither TensorFlow nor the model. None when any variant
    must be computed, the cache is off, or a source is a function (its content is unknown).
    """
    import functools
    from types import SimpleNamespace

    from qpipe.cache import KeyMaker, VariantCache, cache_dir
    from qpipe.components import file_sha256
    from qpipe.pipeline import Inputs, load_inputs
    from qpipe.task import Task

    cfg, base = resolved.config, resolved.loaded.base_dir
    root = cache_dir(cfg, base, settings)
    if root is None or not cfg.model.path or not (base / cfg.model.path).exists():
        return None
    needs_training = any(type(rv.quantizer.component).needs_training for rv in resolved.variants)
    used = {"evaluation": True, "calibration": any(rv.calibrator is not None for rv in resolved.variants),
            "training": needs_training, "validation": needs_training}
    files, hashes = {}, {}
    for section, wanted in used.items():
        source = getattr(cfg.data, section)
        if source is None or not wanted:
            continue
        path = (base / source.path).resolve() if source.path else None
        if path is None or not path.exists():
            return None
        files[section], hashes[section] = path, file_sha256(path)
    model_path = (base / cfg.model.path).resolve()
    sha = file_sha256(model_path)
    probe = SimpleNamespace(model=SimpleNamespace(sha256=sha), **{s: (s in files) or None for s in used})
    keys, cache = KeyMaker(resolved, probe, hashes), VariantCache(root)
    base_key = keys.key(resolved.variants[0], None)
    entries = [cache.get(base_key)] if base_key else [None]
    entries += [cache.get(k) if (k := keys.key(rv, base_key)) else None for rv in resolved.variants[1:]]
    first = entries[0]
    if any(e is None for e in entries) or first is None or not first.result.get("model_flavor") \
            or not first.result.get("task"):
        return None
    load = functools.cache(lambda: load_inputs(pm, resolved))
    model = _Deferred(lambda: load().model, sha256=sha, source=str(model_path), path=model_path,
                      flavor=first.result["model_flavor"])
    data = {s: (_Deferred(lambda s=s: getattr(load(), s)) if s in files else None) for s in used}
    inputs_seen = first.result.get("model_inputs")
    if inputs_seen and data["evaluation"] is not None:
        data["evaluation"] = _Deferred(functools.cache(
            lambda: _evaluation_only(cfg.data.evaluation, base, inputs_seen)))
    # stand-ins that load the model and data on first use (a fully cached run may never)
    inputs = Inputs(model=model, **data, task=Task(**first.result["task"]))  # type: ignore[arg-type]
    for section in ("evaluation", "calibration", "training", "validation"):
        source = getattr(cfg.data, section)
        if source is not None and source.path:
            inputs.data_files[section] = (base / source.path).resolve()
    return inputs


def _evaluation_only(source: Any, base: Path, model_inputs: list) -> Any:
    """The evaluation data bound to the model's inputs as recorded in the cache, without
    loading the model (for evaluators that re-measure on a cache hit)."""
    from qpipe.components import TensorInfo
    from qpipe.data import bind_to_model, load_source

    infos = [TensorInfo(name, tuple(shape), dtype) for name, shape, dtype in model_inputs]
    return bind_to_model(load_source(source, base, "data.evaluation"), infos, "data.evaluation")


def _run_some(runner: Runner, executor: Executor, variants: list, keys: dict[str, str | None],
              cache: Any, stats: dict, baseline: Baseline | None):
    """Restore cache hits, run the misses; yield each result. Returns the last result."""
    last = None
    misses = []
    for rv in variants:
        key = keys.get(rv.config.name)
        entry = cache.get(key) if cache is not None and key else None
        if entry is None:
            misses.append(rv)
            continue
        stats["hits"] += 1
        last = _from_cache(runner, rv, entry)
        yield last
    if not misses:
        return last
    for outcome in executor.run(misses, baseline):
        rv = next(r for r in misses if r.config.name == outcome.result.name)
        last = _finish(runner, rv, outcome, cache, keys.get(rv.config.name), stats)
        yield last
    return last


def _emit(runner: Runner, hook: str, **kwargs: Any) -> None:
    from qpipe.pipeline import call_lifecycle

    problems = call_lifecycle(runner.pm, hook, strict=hook == "qpipe_variant_started", run=runner.run_info,
                              **kwargs)
    runner.warnings += problems


def _from_cache(runner: Runner, rv: ResolvedVariant, entry: Any) -> VariantResult:
    """A variant restored from the cache: artifact copied in, metrics and deltas as computed."""
    name = rv.config.name
    started = time.perf_counter()
    _emit(runner, "qpipe_variant_started", variant=name)
    _emit(runner, "qpipe_variant_progress", variant=name, message=f"restored from the cache ({entry.key[:12]})")
    result = runner._new_result(rv)
    entry.restore_artifact(runner.output_dir)
    result.artifact = entry.artifact
    result.metadata = {k: v for k, v in entry.result.get("metadata", {}).items() if k != "traceback"}
    result.warnings = [dict(w) for w in entry.result.get("warnings", [])]
    result.metadata.update({"cache": "hit", "cache_key": entry.key, "cache_origin": entry.origin,
                            "cached_seconds": entry.result.get("seconds")})
    artifact = Artifact(runner.output_dir / entry.artifact, type(rv.quantizer.component).output_format)
    if name == runner.resolved.baseline:
        runner.adopt_baseline(entry.outputs(), artifact, entry.raw_metrics)
    raw = dict(entry.raw_metrics)
    try:
        fresh = runner.remeasure(rv, artifact, entry.outputs(), result)
    except Exception as exc:  # the cached numbers stand, said to be cached (see report.latency_note)
        fresh = {}
        result.warnings.append(warning("remeasure-failed", f"could not re-measure on this machine: {short_error(exc)}"))
    if fresh:  # latency measures this machine now, not the run that filled the cache
        raw.update(fresh)
        result.metadata["remeasured"] = sorted(fresh)
    result.metrics = {**runner._with_deltas(name, raw), "cache_hit": 1.0}
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _finish(runner: Runner, rv: ResolvedVariant, outcome: Outcome, cache: Any, key: str | None,
            stats: dict) -> VariantResult:
    """Replay a remote variant's hooks and files, adopt the baseline, store it in the cache."""
    result = outcome.result
    name = rv.config.name
    if not outcome.live:
        for hook, kwargs in outcome.events or [("qpipe_variant_started", {"variant": name})]:
            _emit(runner, hook, **kwargs)
        _write_files(runner.output_dir, outcome.files)
        result._exception = outcome.error or (  # type: ignore[attr-defined]
            WorkerError(result.error) if result.status != "ok" else None)
        if name == runner.resolved.baseline and result.status == "ok":
            fmt = type(rv.quantizer.component).output_format
            artifact = Artifact(runner.output_dir / result.artifact, fmt) if result.artifact else None
            runner.adopt_baseline(outcome.outputs, artifact, outcome.raw_metrics or {})
    for private in ("_outputs", "_raw_metrics"):
        result.__dict__.pop(private, None)
    if cache is None:
        result.metadata["cache"] = "off"
        return result
    stats["misses"] += 1
    result.metadata["cache"] = "miss"
    if result.status == "ok":
        result.metrics["cache_hit"] = 0.0
    if result.status == "ok" and key and result.artifact and outcome.raw_metrics is not None:
        record = {k: v for k, v in _result_dict(result).items() if k not in ("metrics",)}
        record["metadata"] = {k: v for k, v in result.metadata.items() if k not in ("cache", "cache_key", "worker")}
        record["model_flavor"] = runner.inputs.model.flavor
        record["task"] = runner.inputs.task.to_dict()
        # lets a fully cached re-run load the evaluation data alone (latency is re-measured)
        record["model_inputs"] = [[t.name, list(t.shape), t.dtype] for t in runner.inputs.model.inputs]
        stored = cache.put(key, record, outcome.raw_metrics, outcome.outputs, runner.output_dir / result.artifact,
                           result.artifact, _dt.datetime.now().isoformat(timespec="seconds"),
                           str(runner.output_dir))
        if stored:
            stats["stored"] += 1
            result.metadata["cache_key"] = key
    return result


def _result_dict(result: VariantResult) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)


def _write_files(output_dir: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        target = (output_dir / relative).resolve()
        if output_dir.resolve() not in target.parents:
            continue  # never outside the output folder
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _baseline_for_workers(runner: Runner, rv: ResolvedVariant, result: VariantResult | None) -> Baseline | None:
    if result is None or result.status != "ok":
        return None
    files: dict[str, bytes] = {}
    if result.artifact:
        path = runner.output_dir / result.artifact
        files = _collect(path, runner.output_dir) if path.exists() else {}
    outputs = getattr(runner, "_baseline_outputs", None)
    return Baseline(name=rv.config.name, outputs=outputs, metrics=dict(getattr(runner, "_baseline_metrics", {})),
                    artifact=result.artifact, format=type(rv.quantizer.component).output_format, files=files)


def failed_outcome(rv: ResolvedVariant, message: str, error: BaseException | None = None) -> Outcome:
    """A variant that failed outside its stages (its worker could not start or died)."""
    from qpipe.pipeline import _plain

    result = VariantResult(name=rv.config.name, quantizer=rv.config.quantizer, status="failed",
                           error=short_error(message), options=_plain(rv.quantizer.component.options))
    return Outcome(result=result, error=error or WorkerError(short_error(message)))


def _collect(path: Path, base: Path) -> dict[str, bytes]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return {str(f.relative_to(base)): f.read_bytes() for f in files}


# --------------------------------------------------------------------------- workers


def worker_spec(runner: Runner) -> WorkerSpec:
    """Describe the run for workers: the resolved pipeline and the plugins that load the model
    or check artifacts."""
    import pickle

    plugins: list[tuple[str, str, Any]] = []
    for name, plugin in runner.pm.list_name_plugin():
        hooks = {h.name for h in runner.pm.get_hookcallers(plugin) or []} if plugin is not None else set()
        if not hooks & {"qpipe_load_model", "qpipe_check_artifact"}:
            continue
        if isinstance(plugin, type(os)):
            plugins.append((name, "module", plugin.__name__))
        else:
            try:
                pickle.dumps(plugin)
            except Exception as exc:  # noqa: BLE001
                raise QpipeError(f"plugin '{name}' loads the model or checks artifacts but cannot be sent to worker "
                                 f"processes ({type(exc).__name__}); install it as an entry point or run without "
                                 "--jobs") from None
            plugins.append((name, "object", plugin))
    spec = WorkerSpec(run_id=uuid.uuid4().hex, resolved=runner.resolved, plugins=plugins,
                      settings={k: v for k, v in runner.settings.items() if isinstance(v, (str, int, float, bool))})
    try:
        pickle.dumps(spec)
    except Exception as exc:  # noqa: BLE001
        raise QpipeError(f"this pipeline cannot be sent to worker processes ({type(exc).__name__}: {exc}); "
                         "components must be importable classes; run without --jobs") from None
    return spec


class _Recorder:
    """The worker's only lifecycle plugin: records the calls for the parent to replay."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def qpipe_variant_started(self, variant: str) -> None:
        self.events.append(("qpipe_variant_started", {"variant": variant}))

    @hookimpl
    def qpipe_variant_progress(self, variant: str, message: str) -> None:
        self.events.append(("qpipe_variant_progress", {"variant": variant, "message": message}))

    @hookimpl
    def qpipe_variant_metrics(self, variant: str, metrics: dict, step: Any) -> None:
        self.events.append(("qpipe_variant_metrics", {"variant": variant, "metrics": dict(metrics), "step": step}))


_STATE: dict[str, Any] = {}


def _worker(spec: WorkerSpec, load: Any = None) -> tuple[Any, _Recorder]:
    """This worker's Runner for the run (model and data loaded once), and its recorder.

    ``load(pm, resolved)`` gives the Inputs (default: open the pipeline's paths, as ``--jobs`` does).
    """
    if spec.run_id in _STATE:
        return _STATE[spec.run_id]
    _STATE.clear()  # a worker serves one run at a time
    from qpipe.pipeline import Runner, load_inputs
    from qpipe.plugins import QpipePluginManager
    from qpipe.results import PipelineResults, PipelineRun
    from qpipe.tfenv import prepare_environment

    prepare_environment()
    pm = QpipePluginManager()
    for name, kind, value in spec.plugins:
        pm.register_plugin(importlib.import_module(value) if kind == "module" else value, name)
    recorder = _Recorder()
    pm.register(recorder, name="qpipe-worker-recorder")
    resolved = spec.resolved
    runner = Runner(pm, resolved, Path(tempfile.mkdtemp(prefix="qpipe-worker-")), spec.settings)
    runner.inputs = (load or load_inputs)(pm, resolved)
    cfg = resolved.config
    runner.run_info = PipelineRun(name=cfg.name, config=cfg, config_path=resolved.loaded.path,
                                  config_text=resolved.loaded.text, output_dir=runner.output_dir,
                                  results=PipelineResults(pipeline=cfg.name, baseline=resolved.baseline),
                                  model=runner.inputs.model, settings=spec.settings)
    runner._adopted = None  # type: ignore[attr-defined]
    _STATE[spec.run_id] = (runner, recorder)
    return runner, recorder


def warm_task(spec: WorkerSpec, load: Any = None) -> int:
    """Load the model and data in this worker ahead of its first variant."""
    try:
        _worker(spec, load)
    except Exception:  # noqa: BLE001 - the variant itself will report it
        pass
    return os.getpid()


def run_task(spec: WorkerSpec, name: str, baseline: Baseline | None, load: Any = None) -> Outcome:
    """Run one variant in this worker; return what the parent needs to record it."""
    try:
        runner, recorder = _worker(spec, load)
    except QpipeError as exc:
        raise WorkerError(f"the worker could not load the pipeline's inputs: {short_error(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - sent back as one line (it may not pickle)
        raise WorkerError(f"the worker could not start: {short_error(exc)}") from None
    rv = next(r for r in runner.resolved.variants if r.config.name == name)
    if baseline is not None and name != baseline.name and runner._adopted != baseline.name:
        folder = Path(tempfile.mkdtemp(prefix="qpipe-baseline-"))
        _write_files(folder, baseline.files)
        artifact = Artifact(folder / baseline.artifact, baseline.format) if baseline.artifact else None
        runner.adopt_baseline(baseline.outputs, artifact, baseline.metrics)
        runner._adopted = baseline.name
    work = Path(tempfile.mkdtemp(prefix=f"qpipe-{name}-"))
    runner.output_dir = work
    recorder.events = []
    try:
        result = runner.run_variant(rv)
        result.metadata["worker"] = {"pid": os.getpid(), "host": socket.gethostname()}
        files = _collect(work, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    outcome = Outcome(result=result, outputs=getattr(result, "_outputs", None),
                      raw_metrics=getattr(result, "_raw_metrics", None), files=files, events=list(recorder.events))
    for private in ("_exception", "_outputs", "_raw_metrics"):
        result.__dict__.pop(private, None)  # the exception may not pickle; the rest travels in the outcome
    return outcome
