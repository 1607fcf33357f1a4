"""Full-integer quantization with activation ranges chosen by a calibrator's estimator.

The converter only takes min/max over the representative data. Here it calibrates as usual
but stops there (``_experimental_calibrate_only``): the result is the float model with each
activation tensor's min/max recorded in its quantization parameters. Those are replaced by
the estimator's ranges (matched by tensor name), and the model is quantized by the same
quantizer the converter would use: the MLIR quantizer for int8, the calibration wrapper's
``QuantizeModel`` for int16x8. Weights are quantized as before (per channel or per tensor).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qpipe import QpipeError
from qpipe.tfenv import tensorflow


def calibrated_model(converter: Any) -> bytes:
    """Run the converter's conversion and calibration, without quantizing; float I/O."""
    tf = tensorflow()
    if not hasattr(converter, "_experimental_calibrate_only"):
        raise QpipeError("this TensorFlow's converter cannot stop after calibration; "
                         "remove the calibrator's estimator to use the converter's min/max")
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32
    converter._experimental_calibrate_only = True
    from qpipe.tflite import convert

    return convert(converter)  # in the run's converter process: a crash fails the variant only


def set_ranges(model: bytes, ranges: dict[str, tuple[float, float]]) -> tuple[bytes, dict[str, tuple[float, float]]]:
    """Replace the recorded min/max of every calibrated tensor named in ``ranges``.

    Returns the edited model and the ranges that were applied (by tensor name).
    """
    from tensorflow.lite.tools import flatbuffer_utils

    graph = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    applied: dict[str, tuple[float, float]] = {}
    for subgraph in graph.subgraphs:
        for tensor in subgraph.tensors:
            q = tensor.quantization
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
            if q is None or q.min is None or q.max is None or name not in ranges:
                continue
            if len(q.min) != 1:  # per-axis statistics: leave them to the converter
                continue
            lo, hi = (float(v) for v in ranges[name])
            q.min = np.array([lo], dtype=np.float32)
            q.max = np.array([hi], dtype=np.float32)
            applied[name] = (lo, hi)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(graph)), applied


def quantize_int8(calibrated: bytes, io: str, per_channel: bool) -> bytes:
    """int8 weights and activations from a calibrated model (the converter's MLIR quantizer)."""
    tf = tensorflow()
    from tensorflow.lite.python import convert

    io_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[io]
    return bytes(convert.mlir_quantize(
        calibrated, disable_per_channel=not per_channel, input_data_type=io_type,
        output_data_type=io_type, disable_per_channel_for_dense_layers=not per_channel))


def quantize_int16x8(calibrated: bytes, io: str, per_channel: bool) -> bytes:
    """int16 activations and int8 weights from a calibrated model, as the converter does it."""
    tf = tensorflow()
    from tensorflow.lite.python import util
    from tensorflow.lite.python.optimize import calibrator

    io_type = {"int16": tf.int16, "float32": tf.float32}[io]
    wrapper = calibrator.Calibrator(calibrated)
    quantized = wrapper._calibrator.QuantizeModel(
        np.dtype(io_type.as_numpy_dtype()).num, np.dtype(io_type.as_numpy_dtype()).num,
        False, np.dtype(np.int16).num, np.dtype(np.int64).num, not per_channel, not per_channel)
    return bytes(util.modify_model_io_type(quantized, io_type, io_type))


def activation_quantization(model: bytes) -> dict[str, tuple[float, int]]:
    """``(scale, zero_point)`` of every per-tensor quantized tensor of a .tflite, by name."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    out = {}
    for detail in interpreter.get_tensor_details():
        params = detail["quantization_parameters"]
        if len(params["scales"]) == 1:
            out[detail["name"]] = (float(params["scales"][0]), int(params["zero_points"][0]))
    return out
