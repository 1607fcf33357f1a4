"""Sanity checks run on every variant, so a broken variant never passes as ``ok`` in silence.

The host checks what any model shows: its outputs (against the baseline's) and its file size.
Plugins check their own file formats through the ``qpipe_check_artifact`` hook, driven by what
the quantizer claimed in ``Artifact.expects``. Each problem is a named warning on the variant
(``VariantResult.warnings``); with ``strict: true`` (per variant or for the whole pipeline) a
warning makes the variant fail. The codes:

- ``non-finite-outputs``: some outputs are NaN or Inf.
- ``collapsed-outputs``: the outputs are (near-)constant. Their variance across the evaluation
  samples (summed over output units) is below ``COLLAPSE_RATIO`` (1%) of the baseline's, i.e.
  their spread is under a tenth of the baseline's; for the baseline itself, every sample
  gives the same output.
- ``not-smaller``: a quantizer that compresses (``expects.smaller``) wrote a file no smaller
  than the baseline's.
- ``float-weights`` / ``float-ops`` (the LiteRT plugin, for .tflite files): weights the
  quantizer was asked to quantize stored in float; ops computing in float in a model meant to
  be full-integer.
- ``fixed-batch`` (the TFLite plugin): the model was converted at a fixed batch of 1 because
  the converter cannot lower its recurrent layers with a dynamic batch.
- ``check-failed``: a plugin's check raised (the variant could not be checked).
- ``plugin`` (or a plugin's own code): a warning a component recorded with ``ctx.warn``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qpipe.components import Artifact

#: a variant whose output variance is below this fraction of the baseline's has collapsed
COLLAPSE_RATIO = 0.01


def warning(code: str, message: str) -> dict[str, str]:
    """One named warning, as kept in ``VariantResult.warnings``."""
    return {"code": code, "message": message}


def _rows(outputs: Any) -> np.ndarray:
    values = np.asarray(outputs)
    return values.reshape(len(values), -1) if values.ndim else values.reshape(1, -1)


def output_warnings(outputs: Any, baseline_outputs: Any, is_baseline: bool) -> list[dict[str, str]]:
    """``non-finite-outputs`` and ``collapsed-outputs`` for one variant's predictions (of each
    output, for a model with several: the message then names it)."""
    if isinstance(outputs, dict):
        theirs = baseline_outputs if isinstance(baseline_outputs, dict) else {}
        return [warning(w["code"], f"output '{name}': {w['message']}") for name, values in outputs.items()
                for w in output_warnings(values, theirs.get(name), is_baseline)]
    if outputs is None or np.asarray(outputs).size == 0:
        return []
    rows = _rows(outputs)
    if rows.dtype.kind not in "fc":
        rows = rows.astype(np.float64)
    finite = np.isfinite(rows)
    if not finite.all():
        bad, nan = int((~finite).sum()), int(np.isnan(rows).sum())
        return [warning("non-finite-outputs", f"{bad} of {rows.size} output values are not finite "
                                              f"({nan} NaN, {bad - nan} Inf)")]
    if len(rows) < 2:
        return []
    variance = float(rows.astype(np.float64).var(axis=0).sum())
    example = np.array2string(rows[0][:4], precision=4, separator=", ")
    if is_baseline or baseline_outputs is None:
        if variance == 0.0:
            return [warning("collapsed-outputs", f"every one of the {len(rows)} evaluation samples gives the "
                                                 f"same output {example}")]
        return []
    base = _rows(baseline_outputs).astype(np.float64)
    if base.shape != rows.shape or not np.isfinite(base).all():
        return []
    base_variance = float(base.var(axis=0).sum())
    if base_variance > 0 and variance < COLLAPSE_RATIO * base_variance:
        distinct = len(np.unique(rows, axis=0))
        return [warning("collapsed-outputs", f"outputs are (near-)constant: their variance over the {len(rows)} "
                                             f"evaluation samples is {variance / base_variance:.2%} of the "
                                             f"baseline's (threshold {COLLAPSE_RATIO:.0%}); {distinct} distinct "
                                             f"output(s), e.g. {example}")]
    return []


def size_warnings(artifact: Artifact, baseline: Artifact | None, is_baseline: bool) -> list[dict[str, str]]:
    """``not-smaller``: a compressing quantizer whose file is not smaller than the baseline's."""
    if is_baseline or baseline is None or not artifact.expects.smaller or baseline.expects.smaller:
        return []
    try:
        size, base = artifact.size_bytes(), baseline.size_bytes()
    except OSError:
        return []
    if size < base:
        return []
    return [warning("not-smaller", f"the quantizer compresses, but its file ({size / 1024:.1f} KB) is not smaller "
                                   f"than the baseline's ({base / 1024:.1f} KB, ratio {base / size:.2f}x)")]


def plugin_warnings(pm: Any, artifact: Artifact) -> list[dict[str, str]]:
    """What every ``qpipe_check_artifact`` implementation finds (called through pluggy, each
    plugin isolated: one that raises becomes a ``check-failed`` warning naming it)."""
    from qpipe.errors import short_error
    from qpipe.plugins import HookFailure

    found: list[dict[str, str]] = []
    for produced in pm.hook.qpipe_check_artifact(artifact=artifact, expects=artifact.expects):
        if isinstance(produced, HookFailure):
            found.append(warning("check-failed", f"plugin '{produced.plugin}' could not check the artifact: "
                                                 f"{short_error(produced.error)}"))
            continue
        for item in produced or []:
            if isinstance(item, dict) and item.get("code") and item.get("message"):
                found.append(warning(str(item["code"]), str(item["message"])))
            else:
                found.append(warning("check-failed", f"a qpipe_check_artifact implementation returned "
                                                     f"{item!r}, not {{'code': ..., 'message': ...}}"))
    return found


def check_variant(pm: Any, artifact: Artifact, outputs: Any, baseline_outputs: Any,
                  baseline_artifact: Artifact | None, is_baseline: bool) -> list[dict[str, str]]:
    """Every sanity warning for one evaluated variant."""
    return (output_warnings(outputs, baseline_outputs, is_baseline)
            + size_warnings(artifact, baseline_artifact, is_baseline)
            + plugin_warnings(pm, artifact))


def apply_strict(result: Any, strict: bool) -> None:
    """Under ``strict``, an ``ok`` variant with warnings becomes ``failed``; the error lists them."""
    if not strict or result.status != "ok" or not result.warnings:
        return
    result.status = "failed"
    result.error = "strict: " + "; ".join(f"[{w['code']}] {w['message']}" for w in result.warnings)
