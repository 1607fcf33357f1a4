"""qpipe plugin: ONNX Runtime as a second runtime beside LiteRT.

Registers the quantizers ``ort.float32`` (the model converted to ONNX with tf2onnx),
``ort.int8`` (static int8 with ``onnxruntime.quantization.quantize_static``, calibrated on
the variant's calibrator samples) and ``ort.dynamic`` (``quantize_dynamic``: int8 weights),
and the ``onnxruntime`` backend that runs ``.onnx`` artifacts. The built-in evaluators
(accuracy, fidelity, size, latency) and trackers work on these variants unchanged.

Nothing heavy is imported here: onnxruntime, onnx, tf2onnx and TensorFlow load at first
use. A missing dependency makes the plugin fail to load (qpipe reports it by name).
"""

from __future__ import annotations

import importlib.util

import qpipe

__version__ = "0.1.0"

_MISSING = [name for name in ("onnxruntime", "onnx", "tf2onnx") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"qpipe-onnxruntime needs {', '.join(_MISSING)}: pip install onnxruntime onnx tf2onnx")

from qpipe_onnxruntime.backend import OnnxRuntimeBackend  # noqa: E402
from qpipe_onnxruntime.quantizers import OrtDynamic, OrtFloat32, OrtInt8  # noqa: E402


@qpipe.hookimpl
def qpipe_register_quantizers(register) -> None:
    for quantizer in (OrtFloat32, OrtInt8, OrtDynamic):
        register(quantizer)


@qpipe.hookimpl
def qpipe_register_backends(register) -> None:
    register(OnnxRuntimeBackend)
