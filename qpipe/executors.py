"""Where variants run: in this process, in worker processes (``--jobs N``), or on Ray.

An executor takes variants and the baseline they are compared with and yields an ``Outcome``
for each as it finishes; it never records anything (the run does, ``qpipe.pipeline``).

- ``InProcess`` (the default, ``jobs: 1``): one after another with the run's ``VariantRunner``;
  their hooks are fired live.
- ``Processes`` (``--jobs N``): N spawned worker processes (``qpipe.workers``), each with its own
  TensorFlow, loading the model and data once.
- ``RayExecutor`` (``executor: {name: ray}``, in ``qpipe.remote``): each variant is a Ray task.

``qpipe.schedule.make_executor`` picks one.

Remote variants come back with the files they wrote and the hook calls they made, which the
run writes and replays.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from qpipe.config import ResolvedPipeline, ResolvedVariant
from qpipe.inputs import Inputs
from qpipe.outcome import Baseline, Outcome, failed_outcome
from qpipe.plugins import QpipePluginManager
from qpipe.variant import VariantRunner
from qpipe.workers import run_task, warm_task, worker_spec


@dataclass
class RunSetup:
    """What an executor needs of the run."""

    pm: QpipePluginManager
    resolved: ResolvedPipeline
    inputs: Inputs
    settings: dict[str, Any]
    output_dir: Path
    variant_runner: VariantRunner  # runs a variant in this process
    warn: Callable[[str], Any]


class Executor:
    """Runs variants and yields an ``Outcome`` for each as it finishes."""

    name = "executor"
    #: whether variants run outside this process (their files and hook calls come back)
    remote = False
    jobs = 1

    def warm(self, count: int) -> None:
        """Start ``count`` workers loading the model while the baseline runs (optional)."""

    def run(self, variants: list[ResolvedVariant], baseline: Baseline | None) -> Iterator[Outcome]:
        raise NotImplementedError

    def close(self, cancel: bool = False) -> None:
        """Release workers; ``cancel`` stops running variants (the run was interrupted)."""


class InProcess(Executor):
    """One variant after another in this process."""

    name = "in-process"

    def __init__(self, setup: RunSetup):
        self.setup = setup

    def run(self, variants, baseline):
        for rv in variants:
            yield self.setup.variant_runner.run(rv, baseline, self.setup.output_dir)


class Processes(Executor):
    """``jobs`` spawned worker processes, each with its own TensorFlow state."""

    name = "processes"
    remote = True

    def __init__(self, setup: RunSetup, jobs: int):
        self.spec = worker_spec(setup.pm, setup.resolved, setup.settings)
        self.output_dir = setup.output_dir
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

    def run(self, variants: list[ResolvedVariant], baseline: Baseline | None) -> Iterator[Outcome]:
        from concurrent.futures import FIRST_COMPLETED, wait

        shipped = baseline.shipped(self.output_dir) if baseline else None
        pending: deque[ResolvedVariant] = deque(variants)
        solo: deque[ResolvedVariant] = deque()  # solo: in flight when a worker died, retried one at a time
        tried: set[str] = set()
        inflight: dict[Any, Any] = {}
        while pending or solo or inflight:
            if solo and not inflight:
                rv = solo.popleft()
                inflight[self._pool().submit(run_task, self.spec, rv.config.name, shipped)] = rv
            while pending and not solo and len(inflight) < self.jobs:
                rv = pending.popleft()
                inflight[self._pool().submit(run_task, self.spec, rv.config.name, shipped)] = rv
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            alone = len(inflight) == 1  # a worker that dies running the only variant in flight: no doubt
            broken = False
            for future in done:
                rv = inflight.pop(future)
                outcome, died = self._collect(future, rv, retry=rv.config.name not in tried and not alone)
                broken |= died
                if outcome is not None:
                    yield outcome
                else:
                    tried.add(rv.config.name)
                    solo.append(rv)
            if broken:
                for future, rv in list(inflight.items()):  # they died with the pool
                    inflight.pop(future)
                    tried.add(rv.config.name)
                    solo.append(rv)
                self._discard_pool()

    @staticmethod
    def _collect(future: Any, rv: ResolvedVariant, retry: bool) -> tuple[Outcome | None, bool]:
        """The variant's outcome, or None to run it again alone; and whether its worker died."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result(), False
        except BrokenProcessPool:
            if retry:
                return None, True
            return failed_outcome(rv, "the worker process died while running this variant (a crash in native "
                                      "code, out of memory, or a script starting qpipe without an "
                                      "'if __name__ == \"__main__\":' guard)"), True
        except Exception as exc:  # noqa: BLE001 - any worker error fails this variant only
            return failed_outcome(rv, f"{type(exc).__name__}: {exc}", exc), False

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
