"""Write TF-MOT results as .tflite: int8 from QAT, and 2- or 4-bit weights that really shrink the file.

QAT models convert with the TFLite converter (``Optimize.DEFAULT``; the fake-quant ranges
learned in training set the int8 scales). Binary/ternary models are baked into a float
model whose kernels hold the constrained values, converted to float, then stored with
Google's ``ai-edge-quantizer``. With float activations, dense weights become INT2 (LiteRT
has no 1-bit type, so binary weights take 2 bits too) and convolution weights INT4, both
run by dynamic-range kernels; with int8 activations every weight is INT4 (LiteRT has no
int8 kernels for INT2 weights). Both widths hold {-a, 0, +a} exactly (symmetric scale
``a / qmax`` per output channel).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from qpipe import Dataset, QpipeError
from qpipe.errors import short_error
from qpipe.conversion import calibrate_ai_edge_quantizer
from qpipe.tfenv import quiet, tensorflow


def convert_qat(qat_model: Any, io: str) -> bytes:
    """A QAT tf_keras model -> integer .tflite (int8 or float32 inputs and outputs)."""
    tf = tensorflow()
    converter = tf.lite.TFLiteConverter.from_keras_model(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if io == "int8":
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return _convert(converter)


def convert_float(model: Any) -> bytes:
    """A float tf_keras model -> float32 .tflite."""
    return _convert(tensorflow().lite.TFLiteConverter.from_keras_model(model))


def _convert(converter: Any) -> bytes:
    try:
        with quiet():
            return bytes(converter.convert())
    except Exception as exc:
        raise QpipeError(f"TFLite conversion failed: {short_error(exc)}") from exc


#: TFLite op -> weight bits (float activations, dynamic-range kernels). LiteRT's CONV_2D returns
#: NaN with INT2 weights (checked with ai-edge-litert 2.3), so convolutions take INT4; its
#: DEPTHWISE_CONV_2D has no low-bit kernel and stays float.
DYNAMIC_BITS = {"FULLY_CONNECTED": 2, "CONV_2D": 4}
#: TFLite op -> weight bits with int8 activations (LiteRT has no int8 kernels for INT2 weights)
STATIC_BITS = {"FULLY_CONNECTED": 4, "CONV_2D": 4, "DEPTHWISE_CONV_2D": 4}
#: training samples that calibrate int8 activations
CALIBRATION_SAMPLES = 200


def layer_scopes(float_tflite: bytes, layers: list[str]) -> dict[str, list[str]]:
    """The scopes of the conv/dense ops made from the named Keras layers, by TFLite op name.

    ai-edge-quantizer selects ops by scope (their output tensor names), which for a model's
    last op is just ``StatefulPartitionedCall:0``; the weight tensor keeps the layer name
    (``.../<layer>/MatMul``), so ops are found through their weights.
    """
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    model = fb.read_model(bytearray(float_tflite))
    graph = model.subgraphs[0]
    wanted = re.compile("(^|[/;])(" + "|".join(re.escape(n) for n in layers) + ")/")
    scopes: dict[str, list[str]] = {}
    for op in graph.operators:
        kind = fb.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
        kind = str(getattr(kind, "value", kind))
        if kind not in STATIC_BITS or len(op.inputs) < 2:
            continue
        if wanted.search(fb.get_tensor_name(graph.tensors[op.inputs[1]])):
            scopes.setdefault(kind, []).append(fb.get_op_scope(op, graph.tensors))
    return scopes


def _exactly(scopes: list[str]) -> str:
    return "^(" + "|".join(re.escape(s) for s in scopes) + ")$"


def store_low_bit(float_tflite: bytes, layers: list[str], activations: str,
                  calibration: Dataset | None = None) -> tuple[bytes, dict[str, int]]:
    """Requantize the float model's ``layers``: with float activations, dense weights as INT2 and
    conv weights as INT4 (dynamic range); with int8 activations, INT4 weights and every other
    op int8. Returns the flatbuffer and the weight bits chosen per TFLite op."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    every = qtyping.TFLOperationName.ALL_SUPPORTED
    manager = recipe_manager.RecipeManager()
    scopes = layer_scopes(float_tflite, layers) if layers else {}
    table = STATIC_BITS if activations == "int8" else DYNAMIC_BITS
    chosen = {kind: table[kind] for kind in scopes if kind in table}
    if activations == "int8":
        manager.add_static_config(regex=".*", operation_name=every, activation_num_bits=8, weight_num_bits=8)
    for kind, bits in chosen.items():
        operation = qtyping.TFLOperationName(kind)
        if activations == "int8":
            manager.add_static_config(regex=_exactly(scopes[kind]), operation_name=operation,
                                      activation_num_bits=8, weight_num_bits=bits)
        else:
            manager.add_dynamic_config(regex=_exactly(scopes[kind]), operation_name=operation, num_bits=bits)
    engine = quantizer.Quantizer(bytearray(float_tflite))
    engine.load_quantization_recipe(manager.get_quantization_recipe())
    with quiet():
        if engine.need_calibration:
            if calibration is None:
                raise QpipeError("int8 activations need calibration samples")
            samples = calibration if len(calibration) <= CALIBRATION_SAMPLES else \
                calibration.take(np.arange(CALIBRATION_SAMPLES))
            result = engine.quantize(calibrate_ai_edge_quantizer(engine, float_tflite, samples))
        elif chosen:
            result = engine.quantize()
        else:
            return float_tflite, {}
    return bytes(result.quantized_model), chosen
