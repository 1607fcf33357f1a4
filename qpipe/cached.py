"""How one run uses the variant cache (``qpipe.cache``): keys for its variants, hits restored
into the output folder, finished misses stored, and inputs that load only when touched when
every variant is a hit (an unchanged re-run then imports neither TensorFlow nor the model)."""

from __future__ import annotations

import datetime as _dt
import functools
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from qpipe.cache import CachedVariant, KeyMaker, VariantCache, cache_dir
from qpipe.components import Artifact, TensorInfo, file_sha256
from qpipe.config import ResolvedPipeline, ResolvedVariant
from qpipe.data import bind_to_model, load_source
from qpipe.errors import short_error
from qpipe.inputs import Inputs, data_files, load_inputs, used_sections
from qpipe.lifecycle import Emit
from qpipe.outcome import Baseline, Outcome, new_result, with_deltas
from qpipe.plugins import QpipePluginManager
from qpipe.sanity import warning
from qpipe.task import Task

#: ``remeasure(rv, artifact, outputs, result)``: fresh machine metrics of a restored variant
Remeasure = Callable[..., dict[str, float]]


class RunCache:
    """The cache as one run sees it; ``stats`` is what results.json reports under ``cache``."""

    def __init__(self, resolved: ResolvedPipeline, inputs: Inputs, settings: dict[str, Any],
                 data_hashes: dict[str, str | None], warn: Callable[[str], Any]):
        self.resolved, self.inputs = resolved, inputs
        root = cache_dir(resolved.config, resolved.loaded.base_dir, settings)
        self.store: VariantCache | None = VariantCache(root, warn=warn) if root is not None else None
        maker = KeyMaker(resolved, inputs, data_hashes) if self.store is not None else None  # type: ignore[arg-type]
        self.stats: dict[str, Any] = {"dir": str(root) if root else None, "hits": 0, "misses": 0, "stored": 0}
        if self.store is None:
            self.stats["off"] = "--no-cache" if settings.get("no_cache") else "cache: false"
        elif maker is not None and maker.reason:
            self.stats["off"] = maker.reason
            self.store = maker = None
        first, *rest = resolved.variants  # resolve() puts the baseline first
        base_key = maker.key(first, None) if maker else None
        self.keys = {first.config.name: base_key}
        self.keys.update({rv.config.name: maker.key(rv, base_key) if maker else None for rv in rest})

    def hit(self, rv: ResolvedVariant) -> CachedVariant | None:
        """The intact entry for ``rv``, if any."""
        key = self.keys.get(rv.config.name)
        return self.store.get(key) if self.store is not None and key else None

    def baseline_failed(self) -> None:
        """Without the baseline, fidelity and deltas differ: the other variants are not cached."""
        self.keys = {name: None for name in self.keys}

    def restore(self, rv: ResolvedVariant, entry: CachedVariant, output_dir: Path, baseline: Baseline | None,
                emit: Emit, remeasure: Remeasure) -> Outcome:
        """A variant restored from ``entry``: artifact copied in, machine metrics measured again,
        deltas against ``baseline`` (or itself, when it is the baseline)."""
        name = rv.config.name
        started = time.perf_counter()
        emit("qpipe_variant_started", variant=name)
        emit("qpipe_variant_progress", variant=name, message=f"restored from the cache ({entry.key[:12]})")
        self.stats["hits"] += 1
        result = new_result(rv)
        entry.restore_artifact(output_dir)
        result.artifact = entry.artifact
        result.metadata = {k: v for k, v in entry.result.get("metadata", {}).items() if k != "traceback"}
        result.warnings = [dict(w) for w in entry.result.get("warnings", [])]
        result.metadata.update({"cache": "hit", "cache_key": entry.key, "cache_origin": entry.origin,
                                "cached_seconds": entry.result.get("seconds")})
        artifact = Artifact(output_dir / entry.artifact, type(rv.quantizer.component).output_format)
        raw, outputs = dict(entry.raw_metrics), entry.outputs()
        try:
            fresh = remeasure(rv, artifact, outputs, result)
        except Exception as exc:  # the cached numbers stand, said to be cached (see report.latency_note)
            fresh = {}
            result.warnings.append(warning("remeasure-failed", f"could not re-measure on this machine: "
                                                                f"{short_error(exc)}"))
        if fresh:  # latency measures this machine now, not the run that filled the cache
            raw.update(fresh)
            result.metadata["remeasured"] = sorted(fresh)
        reference = raw if name == self.resolved.baseline else (baseline.metrics if baseline else None)
        result.metrics = {**with_deltas(raw, reference), "cache_hit": 1.0}
        result.seconds = round(time.perf_counter() - started, 3)
        return Outcome(result=result, outputs=outputs, raw_metrics=raw, artifact=artifact, live=True,
                       restored=True)

    def keep(self, rv: ResolvedVariant, outcome: Outcome, output_dir: Path) -> None:
        """Record a computed variant as a miss and store it when it finished well."""
        result = outcome.result
        if outcome.restored:
            return
        if self.store is None:
            result.metadata["cache"] = "off"
            return
        self.stats["misses"] += 1
        result.metadata["cache"] = "miss"
        if result.status == "ok":
            result.metrics["cache_hit"] = 0.0
        key = self.keys.get(rv.config.name)
        if result.status != "ok" or not key or not result.artifact or outcome.raw_metrics is None:
            return
        record = {k: v for k, v in asdict(result).items() if k != "metrics"}
        record["metadata"] = {k: v for k, v in result.metadata.items() if k not in ("cache", "cache_key", "worker")}
        record["model_flavor"] = self.inputs.model.flavor
        record["task"] = self.inputs.task.to_dict()
        record["tasks"] = {name: task.to_dict() for name, task in self.inputs.tasks.items()}
        record["model_outputs"] = [t.name for t in self.inputs.model.outputs]
        record["unlabelled"] = list(self.inputs.unlabelled)
        # lets a fully cached re-run load the evaluation data alone (latency is re-measured)
        record["model_inputs"] = [[t.name, list(t.shape), t.dtype] for t in self.inputs.model.inputs]
        if self.store.put(key, record, outcome.raw_metrics, outcome.outputs, output_dir / result.artifact,
                          result.artifact, _dt.datetime.now().isoformat(timespec="seconds"), str(output_dir)):
            self.stats["stored"] += 1
            result.metadata["cache_key"] = key


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


def cached_entries(resolved: ResolvedPipeline, settings: dict[str, Any]) -> tuple[list[Any], dict[str, str], str] | None:
    """Every variant's intact entry, the used data files' sha256 and the model's, when all are cached."""
    cfg, base = resolved.config, resolved.loaded.base_dir
    root = cache_dir(cfg, base, settings)
    if root is None or not cfg.model.path or not (base / cfg.model.path).exists():
        return None
    used = used_sections(resolved)
    hashes = {}
    for section, path in data_files(resolved).items():
        if used[section]:
            if not path.exists():
                return None
            hashes[section] = file_sha256(path)
    if any(used[s] and getattr(cfg.data, s) is not None and s not in hashes for s in used):
        return None  # a section read from a function: its content is unknown
    sha = file_sha256((base / cfg.model.path).resolve())
    probe = SimpleNamespace(model=SimpleNamespace(sha256=sha), **{s: (s in hashes) or None for s in used})
    keys, cache = KeyMaker(resolved, probe, hashes), VariantCache(root)
    base_key = keys.key(resolved.variants[0], None)
    entries = [cache.get(base_key) if base_key else None]
    entries += [cache.get(k) if (k := keys.key(rv, base_key)) else None for rv in resolved.variants[1:]]
    first = entries[0]
    if any(e is None for e in entries) or first is None or not first.result.get("model_flavor") \
            or not first.result.get("task"):
        return None
    return entries, hashes, sha


def inputs_if_all_cached(pm: QpipePluginManager, resolved: ResolvedPipeline, settings: dict[str, Any]) -> Any:
    """When every variant is in the cache, Inputs whose model and data load only if touched.

    None when any variant must be computed, the cache is off, or a source is a function.
    """
    found = cached_entries(resolved, settings)
    if found is None:
        return None
    entries, hashes, sha = found
    first = entries[0].result
    cfg, base = resolved.config, resolved.loaded.base_dir
    load = functools.cache(lambda: load_inputs(pm, resolved))
    model_path = (base / str(cfg.model.path)).resolve()  # a path: checked by cached_entries
    model = _Deferred(lambda: load().model, sha256=sha, source=str(model_path), path=model_path,
                      flavor=first["model_flavor"])
    data = {s: (_Deferred(lambda s=s: getattr(load(), s)) if s in hashes else None) for s in used_sections(resolved)}
    if first.get("model_inputs") and data["evaluation"] is not None:
        data["evaluation"] = _Deferred(functools.cache(
            lambda: _evaluation_only(cfg.data.evaluation, base, first["model_inputs"], first.get("model_outputs"))))
    return Inputs(model=model, **data, data_files=data_files(resolved), data_sha256=hashes,  # type: ignore[arg-type]
                  task=Task(**first["task"]),
                  tasks={name: Task(**task) for name, task in (first.get("tasks") or {}).items()},
                  unlabelled=list(first.get("unlabelled") or []))


def _evaluation_only(source: Any, base: Path, model_inputs: list, model_outputs: list | None = None) -> Any:
    """The evaluation data bound to the model's inputs as recorded in the cache, without
    loading the model (for evaluators that re-measure on a cache hit)."""
    infos = [TensorInfo(name, tuple(shape), dtype) for name, shape, dtype in model_inputs]
    outputs = [TensorInfo(name, ()) for name in model_outputs or []]
    return bind_to_model(load_source(source, base, "data.evaluation"), infos, "data.evaluation",
                         model_outputs=outputs)
