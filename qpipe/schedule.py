"""The order variants run in (the baseline first, alone, then the others with it) and where.

Cache hits are restored in this process; the misses go to the executor. A run with nothing to
compute uses no worker processes and no Ray connection.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

from qpipe.cached import RunCache
from qpipe.components import Artifact
from qpipe.config import ResolvedVariant
from qpipe.executors import Executor, InProcess, Processes, RunSetup
from qpipe.limits import clamp_jobs
from qpipe.lifecycle import Emit
from qpipe.outcome import Baseline, Outcome
from qpipe.remote import RayExecutor


def schedule(setup: RunSetup, cache: RunCache, emit: Emit,
             extra: dict[str, Any]) -> Iterator[tuple[ResolvedVariant, Outcome]]:
    """Yield every variant with its outcome as it finishes, the baseline first.

    The caller records each outcome (its files written, its hook calls replayed) before the
    next is asked for: the baseline's artifact is then in the output folder for the others.
    ``emit`` receives the hook calls of variants restored from the cache; ``extra`` (results.json's)
    learns which executor ran them.
    """
    first, *rest = setup.resolved.variants  # resolve() puts the baseline first
    misses = [rv for rv in rest if cache.hit(rv) is None]
    executor = InProcess(setup) if cache.hit(first) is not None and not misses else make_executor(setup)
    extra["executor"] = {"name": executor.name, "jobs": executor.jobs}
    interrupted = True
    try:
        if misses and executor.remote:  # workers load the model while the baseline runs
            executor.warm(executor.jobs - 1 if executor.jobs else len(misses))
        baseline = None
        for rv, outcome in _run(setup, cache, executor, [first], None, emit):
            yield rv, outcome
            baseline = _as_baseline(setup, rv, outcome)
        if baseline is None:
            cache.baseline_failed()
        yield from _run(setup, cache, executor, rest, baseline, emit)
        interrupted = False
    finally:
        executor.close(cancel=interrupted)


def _run(setup: RunSetup, cache: RunCache, executor: Executor, variants: list[ResolvedVariant],
         baseline: Baseline | None, emit: Emit) -> Iterator[tuple[ResolvedVariant, Outcome]]:
    """Restore the hits, then run the misses on ``executor``."""
    misses = []
    for rv in variants:
        entry = cache.hit(rv)
        if entry is None:
            misses.append(rv)
            continue
        remeasure = functools.partial(setup.variant_runner.remeasure, work_dir=setup.output_dir)
        yield rv, cache.restore(rv, entry, setup.output_dir, baseline, emit, remeasure)
    by_name = {rv.config.name: rv for rv in misses}
    for outcome in executor.run(misses, baseline) if misses else ():
        yield by_name[outcome.result.name], outcome


def _as_baseline(setup: RunSetup, rv: ResolvedVariant, outcome: Outcome) -> Baseline | None:
    """The baseline the other variants are compared with, once its outcome is recorded."""
    result = outcome.result
    if result.status != "ok":
        return None
    artifact = outcome.artifact
    if artifact is None and result.artifact:  # it ran elsewhere: its files are in the output folder now
        artifact = Artifact(setup.output_dir / result.artifact, type(rv.quantizer.component).output_format)
    return Baseline(rv.config.name, outcome.outputs, artifact, dict(outcome.raw_metrics or {}))


def chosen_executor(config: Any, settings: dict[str, Any]) -> str:
    """``ray`` or ``local``: ``--executor``, then ``--address`` (Ray), then ``executor.name``."""
    return settings.get("executor") or ("ray" if settings.get("address") else config.name)


def make_executor(setup: RunSetup) -> Executor:
    """The executor the pipeline's ``executor`` section and the command line ask for."""
    config = setup.resolved.config.executor
    jobs = setup.settings.get("jobs") or config.jobs
    if chosen_executor(config, setup.settings) == "ray":
        if setup.settings.get("jobs"):
            config = config.model_copy(update={"jobs": int(jobs)})
            config.model_fields_set.add("jobs")
        return RayExecutor(setup, config)
    jobs, warning = clamp_jobs(int(jobs), len(setup.resolved.variants))
    if warning:
        setup.warn(warning)
    return Processes(setup, jobs) if jobs > 1 else InProcess(setup)
