"""How a run reads in the MLflow UI: short run names, metric keys, rounded values. No MLflow import.

- A grid variant (``int8-per_channel-true``) gets a child run name with each option
  abbreviated (``int8-pctrue``), short enough for the runs table; the full name stays in the
  ``qpipe.variant`` tag and every option value in the params.
- Final metrics are logged at step 0 (one bar per variant in the charts); curves a variant
  reports while training go under their own keys with their real steps: ``train/loss``,
  ``val/loss``.
- Values are rounded to 6 significant digits (whole numbers, such as sizes, stay exact).
- Tags name the stack's versions and the sha256 of the model and data.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import qpipe
from qpipe.results import PipelineResults

STAMP = re.compile(r"(\d{8}-\d{6})")
VERSION_TAGS = {"tensorflow": "qpipe.tensorflow_version", "ai-edge-litert": "qpipe.litert_version",
                "tf-keras": "qpipe.tf_keras_version", "keras": "qpipe.keras_version",
                "tensorflow-model-optimization": "qpipe.tfmot_version", "mlflow": "qpipe.mlflow_version"}


def abbreviation(key: str) -> str:
    """``target_sparsity`` -> ``ts``; ``io`` -> ``io`` (short keys stay)."""
    parts = [p for p in re.split(r"[_\-.]+", key) if p]
    return key if len(key) <= 3 or len(parts) < 2 else "".join(p[0] for p in parts)


def short_names(config: Any) -> dict[str, str]:
    """For each configured variant with option lists (a grid): suffix rewrite rules as
    ``{variant: [(f"{key}-", abbreviation), ...]}``; the rest need none."""
    rules = {}
    for v in config.variants:
        keys = [k for k, value in (v.options or {}).items() if isinstance(value, list)]
        if keys:
            short = [abbreviation(k) for k in keys]
            if len(set(short)) < len(short):
                short = keys
            rules[v.name] = list(zip([f"{k}-" for k in keys], short, strict=False))
    return rules


def run_name(variant: str, rules: dict[str, list[tuple[str, str]]]) -> str:
    """The child run name of ``variant``: grid option names abbreviated, the rest unchanged."""
    for base, pairs in rules.items():
        if variant.startswith(base + "-"):
            tokens = variant[len(base) + 1:]
            for long, short in pairs:
                if tokens.startswith(long):
                    tokens = short + tokens[len(long):]
                tokens = tokens.replace("-" + long, "-" + short)
            return f"{base}-{tokens}"
    return variant


def curve_key(key: str) -> str:
    """A per-step metric's key: ``train_loss`` -> ``train/loss``, ``val_acc`` -> ``val/acc``,
    anything else ``train/<key>`` (never the key of a final metric)."""
    for prefix in ("train", "val"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return key if "/" in key else f"train/{key}"


def history_curves(metadata: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step) of the per-epoch history a training quantizer recorded (steps from 1)."""
    history = (metadata.get("training") or {}).get("history") if isinstance(metadata, dict) else None
    out: list[tuple[str, float, int]] = []
    for key, values in (history or {}).items():
        name = curve_key(key if key.startswith("val_") else f"train_{key}")
        out += [(name, v, step) for step, v in enumerate(values or [], start=1) if isinstance(v, (int, float))]
    return out


def tidy(value: float) -> float:
    """6 significant digits; whole numbers (bytes, counts) exact."""
    if value == int(value) or not math.isfinite(value):
        return value
    return float(f"{value:.6g}")


def parent_name(run: Any, started: Any) -> str:
    """``<pipeline>-<timestamp>`` with the run's one timestamp: results.json's ``timestamp`` (the
    output folder's) when the host records it, else the output folder's name's, else the start."""
    pipeline = run.name
    stamp = getattr(run.results, "timestamp", None)
    if stamp:
        return f"{pipeline}-{stamp}"
    found = STAMP.search(Path(run.output_dir).name)
    if found:
        return f"{pipeline}-{found.group(1)}"
    return f"{pipeline}-{started.strftime('%Y%m%d-%H%M%S')}" if started is not None else pipeline


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
