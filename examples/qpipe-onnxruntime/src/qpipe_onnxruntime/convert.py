"""Keras model -> float32 ONNX with tf2onnx, once per pipeline run and opset."""

from __future__ import annotations

import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from qpipe import LoadedModel, QpipeError
from qpipe.tfenv import quiet, tensorflow


def onnx_model(model: LoadedModel, opset: int) -> tuple[Path, dict[str, Any]]:
    """The model as a float32 ``.onnx`` file and facts about the conversion.

    Converted from the SavedModel the host exports (``model.saved_model_dir()``), so Keras 3,
    tf_keras and SavedModel sources all take the same path. Memoized on ``model``: the
    variants of one run share a conversion.
    """
    return model.memo(f"qpipe_onnxruntime.onnx.opset{opset}", lambda: _convert(model, opset))


def _convert(model: LoadedModel, opset: int) -> tuple[Path, dict[str, Any]]:
    tensorflow()  # qpipe's TensorFlow environment (legacy Keras flag, quiet logs) first
    started = time.perf_counter()
    try:
        with quiet():
            saved_model = model.saved_model_dir()
            from tf2onnx import convert, tf_loader

            graph_def, inputs, outputs, _tables, renames = tf_loader.from_saved_model(
                str(saved_model), None, None, return_initialized_tables=True, return_tensors_to_rename=True)
            proto, _ = convert.from_graph_def(graph_def, input_names=inputs, output_names=outputs,
                                              tensors_to_rename=renames, opset=opset)
    except NotImplementedError as exc:
        raise QpipeError(f"tf2onnx cannot convert this {model.flavor} model: {exc}") from exc
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise QpipeError(f"tf2onnx conversion failed: {type(exc).__name__}: {first}") from exc
    path = Path(tempfile.mkdtemp(prefix="qpipe-onnx-")) / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    facts = {"converter": f"tf2onnx {metadata.version('tf2onnx')}", "opset": opset,
             "onnx_convert_seconds": round(time.perf_counter() - started, 3)}
    return path, facts
