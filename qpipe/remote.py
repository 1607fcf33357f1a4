"""Variants as Ray tasks on a cluster whose nodes share nothing but Ray's object store.

The driver (the ``qpipe run`` process) loads the model and data once, as for any run, and puts
them into the object store: the model as the bytes of its file or folder (a ``module:function``
model is saved as a ``.keras`` file first), the datasets as the arrays it already bound to the
model's inputs. A worker loads the model from those bytes in a private temporary folder, runs
the variant there and returns the result, the files it wrote and its hook calls as the task's
value; the driver writes the output folder, the cache and the trackers. A worker never opens a
path of the pipeline.

Each task asks Ray for the CPUs the executor grants (``num_cpus``, or more when the quantizer
declares ``resources``), memory for quantizers that train, and any custom resources of the
``executor`` section (``resources: {gpu_node: 1}``) so variants can be pinned to some nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qpipe.errors import QpipeError, short_error
from qpipe.executors import Executor, RunSetup
from qpipe.inputs import SECTIONS, Inputs
from qpipe.outcome import failed_outcome
from qpipe.workers import run_task, warm_task, worker_spec

if TYPE_CHECKING:
    from qpipe.config import ResolvedVariant

#: memory a task of a quantizer that trains reserves unless the quantizer declares its own
TRAINING_MEMORY = 1 << 30


@dataclass
class ShippedInputs:
    """The driver's loaded model and data, as they travel to workers."""

    model_name: str  # the file or folder name the worker recreates
    model_files: dict[str, bytes]  # path inside model_name ("" for a single file) -> bytes
    safe_mode: bool
    flavor: str
    sha256: str | None
    source: str
    data: dict[str, Any] = field(default_factory=dict)  # section -> Dataset or None


def ship_inputs(inputs: Inputs, safe_mode: bool) -> ShippedInputs:
    """Package what the driver loaded; the worker then needs none of the pipeline's paths."""
    model = inputs.model
    if model.path is not None and model.path.is_dir():
        name = model.path.name
        files = {str(p.relative_to(model.path)): p.read_bytes() for p in sorted(model.path.rglob("*")) if p.is_file()}
    elif model.path is not None:
        name, files = model.path.name, {"": model.path.read_bytes()}
    else:  # a module:function model: its module is not on the workers; send it saved
        with tempfile.TemporaryDirectory(prefix="qpipe-ship-") as folder:
            saved = Path(folder) / "model.keras"
            model.model.save(saved)
            name, files = saved.name, {"": saved.read_bytes()}
    data = {s: _arrays(getattr(inputs, s)) for s in SECTIONS}
    return ShippedInputs(model_name=name, model_files=files, safe_mode=safe_mode, flavor=model.flavor,
                         sha256=model.sha256, source=model.source, data=data)


def _arrays(ds: Any, convert: Any = np.asarray) -> Any:
    """``ds`` with every array passed through ``convert``: read into memory (a lazily read array
    would travel as its path), or copied (object-store arrays are read-only views)."""
    from qpipe.data import Dataset

    if ds is None:
        return None
    labels = ds.labels
    if labels is not None:
        labels = {k: convert(v) for k, v in labels.items()} if isinstance(labels, dict) else convert(labels)
    return Dataset(inputs={k: convert(v) for k, v in ds.inputs.items()}, labels=labels)


def unship_inputs(pm: Any, shipped: ShippedInputs) -> Inputs:
    """The worker's Inputs, rebuilt from ``shipped`` in a private folder."""
    from qpipe.schema import ModelSource

    folder = Path(tempfile.mkdtemp(prefix="qpipe-model-"))
    target = folder / shipped.model_name
    for relative, payload in shipped.model_files.items():
        path = target / relative if relative else target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    model = pm.hook.qpipe_load_model(source=ModelSource(path=shipped.model_name, safe_mode=shipped.safe_mode),
                                     base_dir=folder)
    if model is None:
        raise QpipeError(f"model: no plugin on this worker can load {shipped.model_name}")
    if model.flavor != shipped.flavor:
        raise QpipeError(f"model: the worker loaded a {model.flavor} model where the driver has {shipped.flavor}")
    model.sha256, model.source = shipped.sha256, shipped.source
    return Inputs(model=model, **{s: _arrays(shipped.data.get(s), np.array) for s in SECTIONS})


def _load_from(refs: list) -> Any:
    """A loader for ``run_task``: fetch the shipped inputs from the object store, once per worker."""
    def load(pm: Any, resolved: Any) -> Inputs:
        import ray

        return unship_inputs(pm, ray.get(refs[0]))
    return load


def ray_run(spec: Any, refs: list, name: str, baseline: Any) -> Any:
    """A Ray task: run one variant from the shipped inputs; say which node ran it."""
    import ray

    outcome = run_task(spec, name, baseline, load=_load_from(refs))
    worker = outcome.result.metadata.get("worker")
    if isinstance(worker, dict):
        worker["node"] = ray.get_runtime_context().get_node_id()
    return outcome


def ray_warm(spec: Any, refs: list) -> int:
    """A Ray task: load the shipped model in this worker ahead of its first variant."""
    return warm_task(spec, load=_load_from(refs))


def task_options(rv: ResolvedVariant, config: Any) -> dict[str, Any]:
    """The Ray resources one variant's task requests: from the quantizer's declared needs."""
    cls = type(rv.quantizer.component)
    needs = dict(getattr(cls, "resources", None) or {})
    options: dict[str, Any] = {"num_cpus": max(float(needs.pop("num_cpus", 0)), config.num_cpus)}
    memory = needs.pop("memory", TRAINING_MEMORY if cls.needs_training else None)
    if memory:
        options["memory"] = int(memory)
    custom = {**needs, **(config.resources or {})}
    if custom:
        options["resources"] = custom
    return options


def check_reachable(config: Any, settings: dict[str, Any]) -> None:
    """Before anything is written: a cluster address where nothing answers is one clear error."""
    address = ray_address(config, settings)
    if address and not _reachable(address):
        raise QpipeError(f"executor: cannot start or reach Ray at {address}: nothing answers there; "
                         "start the cluster (ray start --head) or fix executor.address")


def ray_address(config: Any, settings: dict[str, Any]) -> str | None:
    """The cluster to use: ``--address``, then ``executor.address``, then ``RAY_ADDRESS``; None: start one here."""
    return settings.get("address") or config.address or os.environ.get("RAY_ADDRESS") or None


class RayExecutor(Executor):
    """Each variant is a Ray task on a Ray cluster (``address``) or a local Ray started here."""

    name = "ray"
    remote = True

    def __init__(self, setup: RunSetup, config: Any):
        try:
            import ray
        except ImportError:
            raise QpipeError("executor: the ray executor needs Ray; install it with pip install 'qpipe[ray]'") from None
        self.ray = ray
        self.config = config
        self.started = False
        if not ray.is_initialized():
            check_reachable(config, setup.settings)
            self._connect(ray, ray_address(config, setup.settings), setup.warn)
        self.jobs = config.jobs if "jobs" in config.model_fields_set else 0  # 0: all in flight
        self.task = ray.remote(max_retries=1)(ray_run)
        self.warmer = ray.remote(ray_warm)
        self.spec_ref = ray.put(worker_spec(setup.pm, setup.resolved, setup.settings))
        # the shipped inputs travel nested in a list: a worker fetches them once, not with every task
        self.refs = [ray.put(ship_inputs(setup.inputs, setup.resolved.config.model.safe_mode))]
        self.options = {rv.config.name: task_options(rv, config) for rv in setup.resolved.variants}
        self.output_dir = setup.output_dir
        self.inflight: dict[Any, Any] = {}

    def _connect(self, ray: Any, address: str | None, warn: Any = None) -> None:
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            kwargs["address"] = address
        else:
            kwargs["include_dashboard"] = False
        if not address or address.split(":")[0] in ("127.0.0.1", "localhost"):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a local Ray listens on loopback only
        try:
            init_ray(ray, kwargs, warn=warn)
        except Exception as exc:  # noqa: BLE001 - Ray raises several kinds here
            where = f"at {address}" if address else "locally"
            raise QpipeError(f"executor: cannot start or reach Ray {where}: {ray_error(exc)}") from None
        self.started = True

    def warm(self, count: int) -> None:
        free = int(self.ray.available_resources().get("CPU", 1))
        first = next(iter(self.options.values()), {})
        warm = {k: v for k, v in first.items() if k in ("num_cpus", "resources")}
        for _ in range(max(0, min(count, free - 1))):
            self.warmer.options(**warm).remote(self.spec_ref, self.refs)

    def run(self, variants, baseline):
        ray = self.ray
        base_ref = ray.put(baseline.shipped(self.output_dir) if baseline else None)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        pending = deque()
        for rv in variants:  # Ray would keep a task no node can take waiting forever
            missing = unschedulable(self.options[rv.config.name], nodes)
            if missing:
                yield failed_outcome(rv, f"no node of the Ray cluster has {missing}; start a node that has "
                                         "(ray start --resources ...) or lower the request (executor.num_cpus, "
                                         "executor.resources, the quantizer's resources)")
            else:
                pending.append(rv)
        while pending or self.inflight:
            while pending and (not self.jobs or len(self.inflight) < self.jobs):
                rv = pending.popleft()
                task = self.task.options(**self.options[rv.config.name])
                self.inflight[task.remote(self.spec_ref, self.refs, rv.config.name, base_ref)] = rv
            ready, _ = ray.wait(list(self.inflight), num_returns=1)
            for ref in ready:
                rv = self.inflight.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task error fails this variant only
                    yield failed_outcome(rv, node_error(exc))

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in list(self.inflight):
                with contextlib.suppress(Exception):  # best effort on the way out
                    self.ray.cancel(ref, force=True)
        self.inflight.clear()
        if self.started:
            self.ray.shutdown()
            self.started = False


def unschedulable(options: dict[str, Any], nodes: list[dict[str, float]]) -> str | None:
    """What no node in ``nodes`` (their total resources) can give a task with ``options``; None if one can."""
    wanted = {"CPU": options.get("num_cpus", 0), "memory": options.get("memory", 0), **options.get("resources", {})}
    wanted = {k: v for k, v in wanted.items() if v}
    if any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        return None
    return " and ".join(f"{v:g} {'bytes of memory' if k == 'memory' else k}" for k, v in wanted.items())


#: Ray Client connects: attempts, and the first wait between them (doubled after each failure)
CLIENT_ATTEMPTS, CLIENT_BACKOFF = 4, 2.0
#: what a Ray Client server says when a connect failed on its side and the same call may go through
_TRANSIENT = ("Starting Ray client server failed", "Proxy failed to Connect", "Initialization failure from server",
              "failed to connect to all addresses", "Connection refused", "Socket closed", "UNAVAILABLE")


def init_ray(ray: Any, kwargs: dict[str, Any], warn: Any = None, attempts: int | None = None,
             backoff: float | None = None) -> None:
    """``ray.init(**kwargs)``, retried with backoff for a Ray Client (``ray://``) address.

    On a busy machine the head's Ray Client proxy sometimes loses the per-client server it
    spawns for a new connection ("Starting Ray client server failed"); the next connect
    works. Ray itself does not retry that, so qpipe does, a bounded number of times, saying
    so through ``warn``; other errors, and every error for a non-client address, raise at once.
    """
    attempts = CLIENT_ATTEMPTS if attempts is None else attempts
    wait = CLIENT_BACKOFF if backoff is None else backoff
    client = str(kwargs.get("address") or "").startswith("ray://")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:
            cause = ray_error(exc)
            if not client or attempt == attempts or not any(t in str(exc) for t in _TRANSIENT):
                raise
            with contextlib.suppress(Exception):
                ray.shutdown()  # a half-made client connection
            if warn is not None:
                warn(f"executor: Ray Client connect failed ({cause}); retrying in {wait:g} s "
                     f"(attempt {attempt + 1} of {attempts})")
            time.sleep(wait)
            wait *= 2


def ray_error(exc: BaseException) -> str:
    """One line for a Ray error: a Ray Client server's own final error line when the message
    carries the server's traceback (``ConnectionAbortedError: Initialization failure from
    server: Traceback ... RuntimeError: Starting Ray client server failed ...``)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        final = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit):", line)]
        if final:
            return short_error(f"{type(exc).__name__}: {final[-1]}".replace("\n", " "))
    return short_error(exc)


def node_error(exc: BaseException) -> str:
    """One line for a failed task: the error raised on the node, and which node and process."""
    cause = getattr(exc, "cause", None) or exc
    where = [f"{k} {v}" for k, v in (("node", getattr(exc, "ip", None)), ("pid", getattr(exc, "pid", None))) if v]
    text = short_error(cause)
    return f"{text} (on {', '.join(where)})" if where else text


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether a ``host:port`` Ray address accepts connections (other forms are left to Ray)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return True
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        return False
    return True
