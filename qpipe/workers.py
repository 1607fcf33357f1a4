"""The worker side of ``--jobs N`` and Ray: run one variant of a run in a private folder.

A worker builds its ``VariantRunner`` once per run (plugins that load the model or check
artifacts, the model and data loaded once) and, for each task, runs the variant in a new
temporary folder with the shipped baseline. It returns an ``Outcome`` holding the result, the
files the variant wrote and the hook calls it made (an ``EventLog``): no hook runs in a worker.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from qpipe.config import ResolvedPipeline
from qpipe.errors import QpipeError, short_error
from qpipe.inputs import Inputs, load_inputs
from qpipe.lifecycle import EventLog
from qpipe.outcome import Baseline, Outcome, ShippedBaseline, WorkerError, collect_files
from qpipe.plugins import QpipePluginManager
from qpipe.scratch import ensure_scratch
from qpipe.variant import VariantRunner

#: the hooks a worker's plugins may need: loading the model, checking artifacts
WORKER_HOOKS = {"qpipe_load_model", "qpipe_check_artifact"}

#: ``load(pm, resolved)``: a worker's Inputs (default: open the pipeline's paths, as ``--jobs`` does)
Loader = Callable[[QpipePluginManager, ResolvedPipeline], Inputs]


@dataclass
class WorkerSpec:
    """Everything a worker process needs to run variants of one run (sent with each task)."""

    run_id: str
    resolved: Any  # ResolvedPipeline
    plugins: list[tuple[str, str, Any]]  # (name, "module" | "object", module name or object)
    settings: dict[str, Any]


def worker_spec(pm: QpipePluginManager, resolved: ResolvedPipeline, settings: dict[str, Any]) -> WorkerSpec:
    """Describe the run for workers: the resolved pipeline and the plugins they need."""
    plugins: list[tuple[str, str, Any]] = []
    for name, plugin in pm.list_name_plugin():
        hooks = {h.name for h in pm.get_hookcallers(plugin) or []} if plugin is not None else set()
        if not hooks & WORKER_HOOKS:
            continue
        if isinstance(plugin, ModuleType):
            plugins.append((name, "module", plugin.__name__))
            continue
        try:
            pickle.dumps(plugin)
        except Exception as exc:  # noqa: BLE001
            raise QpipeError(f"plugin '{name}' loads the model or checks artifacts but cannot be sent to worker "
                             f"processes ({type(exc).__name__}); install it as an entry point or run without "
                             "--jobs") from None
        plugins.append((name, "object", plugin))
    spec = WorkerSpec(run_id=uuid.uuid4().hex, resolved=resolved, plugins=plugins,
                      settings={k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))})
    try:
        pickle.dumps(spec)
    except Exception as exc:  # noqa: BLE001
        raise QpipeError(f"this pipeline cannot be sent to worker processes ({type(exc).__name__}: {exc}); "
                         "components must be importable classes; run without --jobs") from None
    return spec


@dataclass
class _Worker:
    """A worker's state for one run."""

    runner: VariantRunner
    log: EventLog
    baseline: Baseline | None = None


_STATE: dict[str, _Worker] = {}


def _worker(spec: WorkerSpec, load: Loader | None = None) -> _Worker:
    """This worker's state for the run (model and data loaded once)."""
    if spec.run_id in _STATE:
        return _STATE[spec.run_id]
    _STATE.clear()  # a worker serves one run at a time
    from qpipe.tfenv import prepare_environment

    prepare_environment()
    ensure_scratch()  # this worker's temporary files go in one folder, removed when it exits
    pm = QpipePluginManager()
    for name, kind, value in spec.plugins:
        pm.register_plugin(importlib.import_module(value) if kind == "module" else value, name)
    log = EventLog()
    inputs = (load or load_inputs)(pm, spec.resolved)
    _STATE[spec.run_id] = _Worker(VariantRunner(pm, spec.resolved, inputs, log.emit), log)
    return _STATE[spec.run_id]


def warm_task(spec: WorkerSpec, load: Loader | None = None) -> int:
    """Load the model and data in this worker ahead of its first variant."""
    try:
        _worker(spec, load)
    except Exception:  # noqa: BLE001 - the variant itself will report it
        pass
    return os.getpid()


def run_task(spec: WorkerSpec, name: str, baseline: ShippedBaseline | None, load: Loader | None = None) -> Outcome:
    """Run one variant in this worker; return what the parent needs to record it."""
    try:
        worker = _worker(spec, load)
    except QpipeError as exc:
        raise WorkerError(f"the worker could not load the pipeline's inputs: {short_error(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - sent back as one line (it may not pickle)
        raise WorkerError(f"the worker could not start: {short_error(exc)}") from None
    rv = next(r for r in spec.resolved.variants if r.config.name == name)
    if baseline is not None and name != baseline.name and (worker.baseline is None
                                                           or worker.baseline.name != baseline.name):
        worker.baseline = baseline.unpack(Path(tempfile.mkdtemp(prefix="qpipe-baseline-")))
    work = Path(tempfile.mkdtemp(prefix=f"qpipe-{name}-"))
    worker.log.take()
    try:
        outcome = worker.runner.run(rv, worker.baseline if baseline is not None else None, work)
        outcome.result.metadata["worker"] = {"pid": os.getpid(), "host": socket.gethostname()}
        outcome.files = collect_files(work, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # the exception may not pickle (the parent rebuilds one from the result's error); the
    # artifact's path is this worker's; the calls are replayed by the parent
    outcome.error, outcome.artifact, outcome.live = None, None, False
    outcome.events = worker.log.take()
    return outcome
