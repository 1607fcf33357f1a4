"""Check a .tflite against what its quantizer claimed (``qpipe.Expects``), from the flatbuffer.

``float-weights``: conv / dense / embedding weights stored in float although the quantizer
was asked to quantize them (``expects.quantized_weights``), with the bytes they keep.
``float-ops``: ops computing on float activations in a model meant to be full-integer
(``expects.full_integer``). Layers the quantizer kept in float on purpose
(``expects.keep_float``) are excused.
"""

from __future__ import annotations

import re
from typing import Any

from qpipe import Artifact, Expects

from qpipe_litert.inspect import TFLiteModel

FLOAT_TYPES = {"FLOAT32": 4, "FLOAT16": 2, "FLOAT64": 8}
#: how many tensors or ops a warning names before "..."
LISTED = 5


def _excused(patterns: tuple[str, ...], *names: str) -> bool:
    """Whether a tensor or op name belongs to a layer kept in float (``keep_float``)."""
    for pattern in patterns:
        wanted = re.compile(r"(^|[/;])" + re.escape(pattern) + r"($|[/;:])")
        if any(name == pattern or wanted.search(name) for name in names):
            return True
    return False


def _first(name: str) -> str:
    """The first of a fused op's ';'-joined output names."""
    return name.split(";", 1)[0]


def _listed(items: list[str]) -> str:
    return ", ".join(items[:LISTED]) + (f", ... ({len(items) - LISTED} more)" if len(items) > LISTED else "")


def float_weights(model: TFLiteModel, expects: Expects) -> list[dict[str, str]]:
    """The ``float-weights`` warning, or nothing."""
    left = [w for w in model.weights() if w.dtype in FLOAT_TYPES and w.count >= expects.min_weight_elements
            and not _excused(expects.keep_float, w.tensor)]
    if not left:
        return []
    total = sum(w.count * FLOAT_TYPES[w.dtype] for w in left)
    named = [f"{w.tensor} ({w.op}, {w.dtype}, {w.count} weights, {w.count * FLOAT_TYPES[w.dtype] / 1024:.1f} KB)"
             for w in left]
    return [{"code": "float-weights",
             "message": f"{len(left)} weight tensor(s) the quantizer was asked to quantize are stored in float "
                        f"({total / 1024:.1f} KB): {_listed(named)}"}]


def _excused_ops(model: TFLiteModel, keep_float: tuple[str, ...]) -> set[int]:
    """Ops of the layers kept in float (by output or constant names), and the ops computing on
    their float outputs before any QUANTIZE (a kept Dense's SOFTMAX)."""
    excused: set[int] = set()
    for op in model.ops():  # in execution order: producers come first
        producers, constants = model.links(op.index)
        if _excused(keep_float, op.output, *constants) or (
                op.name != "QUANTIZE" and any(p in excused for p in producers)):
            excused.add(op.index)
    return excused


def float_ops(model: TFLiteModel, expects: Expects) -> list[dict[str, str]]:
    """The ``float-ops`` warning, or nothing."""
    excused = _excused_ops(model, expects.keep_float) if expects.keep_float else set()
    left = [op for op in model.float_ops() if op.index not in excused]
    if not left:
        return []
    named = [f"{op.name} ({_first(op.output)})" for op in left]
    return [{"code": "float-ops",
             "message": f"{len(left)} op(s) compute in float in a model meant to be full-integer: {_listed(named)}"}]


def check_tflite(artifact: Artifact, expects: Expects) -> list[dict[str, str]] | None:
    """Every broken claim of ``expects`` for a .tflite artifact (None for other formats)."""
    if artifact.format != "tflite" or not artifact.path.is_file():
        return None
    if not (expects.quantized_weights or expects.full_integer):
        return []
    model = TFLiteModel(artifact.path)
    found: list[dict[str, Any]] = []
    if expects.quantized_weights:
        found += float_weights(model, expects)
    if expects.full_integer:
        found += float_ops(model, expects)
    return found
