"""The model's float32 .tflite, converted once per run and shared by every plugin.

The TFLite converter is the slow step (tens of seconds on real architectures); quantizers
that start from a float flatbuffer (``ai-edge-quantizer`` recipes, the float32 baseline)
all take this one conversion instead of paying for their own.
"""

from __future__ import annotations

from typing import Callable

from qpipe.components import LoadedModel
from qpipe.errors import QpipeError

MEMO_KEY = "qpipe.float_tflite"


def float_tflite(model: LoadedModel, report: Callable[[str], None] | None = None) -> bytes:
    """The float32 .tflite of ``model`` (converted from its SavedModel on first use)."""
    def convert() -> bytes:
        from qpipe.tfenv import quiet, tensorflow

        tf = tensorflow()
        if report is not None:
            report("converting to a float .tflite (once per run)")
        with quiet():
            saved_model = model.saved_model_dir()
            try:
                return bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert())
            except Exception as exc:
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                raise QpipeError(f"TFLite conversion failed: {(lines or [type(exc).__name__])[0][:300]}") from exc

    return model.memo(MEMO_KEY, convert)
