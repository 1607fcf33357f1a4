"""How ``engine: auto`` picks between the converter's and ai-edge-quantizer's file of a variant.

The one whose outputs are closer to the float model's on the calibration samples wins. When
the two are as close (within ``TIE``, relative), the full-integer file (no op left computing
in float) wins, and between two full-integer (or two partly float) files the smaller one. An
engine that fails leaves the other's file. ``pick`` is pure: it takes the errors and the files.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from qpipe import QpipeError
from qpipe.conversion import float_ops

#: relative difference of the engines' output errors that ``auto`` treats as a tie
TIE = 1e-3


def tied(a: float, b: float, tie: float = TIE) -> bool:
    """Whether two output errors are the same within ``tie`` (relative to the larger)."""
    return abs(a - b) <= tie * max(abs(a), abs(b))


def _kb(size: int) -> str:
    return f"{size / 1024:.1f} KB"


def pick(errors: dict[str, float], files: dict[str, bytes], samples: int, tie: float = TIE) -> tuple[str, str, dict]:
    """(engine kept, the reason, facts for the metadata) for two engines' files of one variant.

    ``errors`` are the engines' output errors against the float model (each output's mean absolute
    error over its own spread, ``qpipe.conversion.output_error``) on
    ``samples`` calibration samples; ``files`` their .tflite bytes.
    """
    (a, b) = list(errors)
    facts: dict[str, Any] = {"engine_errors": {k: float(f"{v:.6g}") for k, v in errors.items()}}
    measured = f"on {samples} calibration samples (error relative to the float outputs' spread {{}} vs {{}}'s {{}})"
    if not tied(errors[a], errors[b], tie):
        keep = a if errors[a] < errors[b] else b
        other = b if keep == a else a
        how = measured.format(f"{errors[keep]:.4g}", other, f"{errors[other]:.4g}")
        return keep, f"auto: both engines quantized it; {keep}'s outputs are closer to the float model's {how}", facts
    left = {k: float_ops(v) for k, v in files.items()}
    sizes = {k: len(v) for k, v in files.items()}
    facts["engine_tie"] = {"float_ops": {k: len(v) for k, v in left.items()}, "size_bytes": sizes}
    # full-integer first, then the smaller file; ai-edge-quantizer when even the sizes are equal
    keep = min(files, key=lambda k: (bool(left[k]), sizes[k], k != "ai-edge-quantizer"))
    other = b if keep == a else a
    how = measured.format(f"{errors[keep]:.4g}", other, f"{errors[other]:.4g}")
    if bool(left[keep]) != bool(left[other]):
        ops = ", ".join(sorted(set(left[other])))
        why = f"the full-integer file ({other}'s leaves {len(left[other])} op(s) in float: {ops})"
    else:
        why = f"the smaller file ({_kb(sizes[keep])} vs {_kb(sizes[other])})"
    return keep, (f"auto: both engines quantized it; their outputs are as close to the float model's {how}, "
                  f"so {keep}'s, {why}"), facts


def integer_inputs(model: Any) -> list[str]:
    """Names of the model's integer (or boolean) inputs, such as token ids."""
    out = []
    for info in getattr(model, "inputs", None) or []:
        try:
            if np.dtype(info.dtype).kind in "biu":
                out.append(info.name)
        except TypeError:
            continue
    return out


_UNRECORDED = re.compile(r"Max and min for dynamic tensors should be recorded during calibration: "
                         r"Failed for tensor (?:serving_default_)?(?P<name>[^:\s]+)")


def integer_input_failure(exc: BaseException, mode: str, model: Any) -> QpipeError | None:
    """A helpful line for the converter's full-integer quantizer asking for the range of an
    integer input (it quantizes integer ops on token ids at 16 bits), else None."""
    found = _UNRECORDED.search(str(exc))
    if found is None or found["name"] not in integer_inputs(model):
        return None
    hint = ("use io: int16 with engine: ai-edge-quantizer or auto, or quantize to int8" if mode == "int16x8"
            else "use engine: ai-edge-quantizer")
    return QpipeError(f"TFLite {mode} conversion failed: the converter's {mode} quantizer asks for a range of "
                      f"the integer input '{found['name']}' (integer ops on the ids, such as Keras 3 Embedding's "
                      f"index check, which it cannot leave unquantized); {hint}")
