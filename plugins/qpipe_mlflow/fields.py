"""What a run and a variant look like in MLflow: the params, tags and parent metrics the
tracker logs, and the artifact's digest (hashed once per file version)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import qpipe
from qpipe import file_sha256
from qpipe.results import PipelineResults, VariantResult

from qpipe_mlflow.naming import input_tags
from qpipe_mlflow.store import KIND, flatten, number


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
        tags["qpipe.artifact_sha256"] = artifact_sha256(path)
    return tags


def artifact_sha256(path: Path) -> str:
    """The artifact's digest, hashed once per file version (tags, logged model and registry share it)."""
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def artifact_path(run: Any, result: VariantResult) -> Path | None:
    """The variant's artifact in the run's output folder, if it is there."""
    if not result.artifact:
        return None
    path = Path(run.output_dir) / result.artifact
    return path if path.exists() else None


def headline_tags(results: PipelineResults) -> dict[str, str]:
    """The task and the headline metrics, as parent tags (``qpipe.headline_spec``: for ``qpipe compare``)."""
    tags = {"qpipe.headline": ", ".join(h["metric"] for h in results.headline or []),
            "qpipe.headline_spec": json.dumps(results.headline or [])}
    if results.tasks:  # several outputs: each one's task ("species: classification, quality: regression")
        tags["qpipe.task"] = ", ".join(f"{name}: {task.get('name') or 'unlabelled'}" for name, task in results.tasks.items())
    elif results.task and results.task.get("name"):
        tags["qpipe.task"] = results.task["name"]
    return tags


def selected_headline(results: PipelineResults, chosen: str | None) -> dict[str, float]:
    """The selected variant's headline metrics (and deltas), as ``selected.<metric>`` parent metrics."""
    variant = results.variant(chosen) if chosen else None
    if variant is None:
        return {}
    names = [n for h in results.headline or [] for n in (h["metric"], h["metric"] + "_delta")]
    return {f"selected.{n}": variant.metrics[n] for n in names if number(variant.metrics.get(n)) is not None}


def plain_result(result: VariantResult) -> dict[str, Any]:
    """The result as JSON values (what result.json holds)."""
    return json.loads(json.dumps(asdict(result), default=str))
