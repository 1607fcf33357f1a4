"""Quantize the shared float .tflite with ``ai-edge-quantizer`` recipes (convert once).

Instead of running the TFLite converter again per variant, the float32 flatbuffer that the
run converted once is quantized directly: dynamic-range in about 0.1 s, static int8/int16
with calibration in seconds, where the converter takes tens of seconds on real models.
"""

from __future__ import annotations

from typing import Any

from qpipe import QpipeError, QuantizeContext
from qpipe.conversion import calibrate_ai_edge_quantizer, float_tflite
from qpipe.tfenv import quiet

ENGINE = "ai-edge-quantizer"


def quantize(ctx: QuantizeContext, recipe: Any, calibrate: bool) -> bytes:
    """Apply ``recipe`` to the run's float .tflite (calibrating on ctx.calibration if asked)."""
    from ai_edge_quantizer import quantizer

    source = float_tflite(ctx.model, ctx.report)
    ctx.report("quantizing with ai-edge-quantizer")
    engine = quantizer.Quantizer(bytearray(source))
    engine.load_quantization_recipe(recipe)
    try:
        with quiet():
            if calibrate:
                result = engine.quantize(calibrate_ai_edge_quantizer(engine, source, ctx.calibration.samples))
            else:
                result = engine.quantize()
    except QpipeError:
        raise
    except Exception as exc:
        raise QpipeError(f"ai-edge-quantizer failed: {type(exc).__name__}: {exc}") from exc
    return bytes(result.quantized_model)


def recipe(kind: str, per_channel: bool = True) -> Any:
    """The ai-edge-quantizer recipe for ``dynamic``, ``float16``, ``int8`` or ``int16x8``.

    ``per_channel=False`` gives one weight scale per tensor instead of per output channel.
    """
    from ai_edge_quantizer import recipe as recipes

    if kind == "float16":  # float16 weights, float32 compute: a weight-only cast
        from ai_edge_quantizer import qtyping, recipe_manager
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                       num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        return manager.get_quantization_recipe()
    rules = {"dynamic": recipes.dynamic_wi8_afp32, "int8": recipes.static_wi8_ai8,
             "int16x8": recipes.static_wi8_ai16}[kind]()
    if not per_channel:
        for rule in rules:
            rule["op_config"]["weight_tensor_config"]["granularity"] = "TENSORWISE"
    return rules
