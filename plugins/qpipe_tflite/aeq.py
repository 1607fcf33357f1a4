"""Quantize the shared float .tflite with ``ai-edge-quantizer`` recipes (convert once).

Instead of running the TFLite converter again per variant, the float32 flatbuffer that the
run converted once is quantized directly: dynamic-range in about 0.1 s, static int8/int16
with calibration in seconds, where the converter takes tens of seconds on real models.
"""

from __future__ import annotations

from typing import Any

from qpipe import Calibration, QpipeError, QuantizeContext
from qpipe.conversion import float_tflite
from qpipe.tfenv import quiet

ENGINE = "ai-edge-quantizer"


def _signature_inputs(flatbuffer: bytes) -> tuple[str, list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=flatbuffer).get_signature_list()
    if not signatures:
        raise QpipeError("the float .tflite has no signature; ai-edge-quantizer needs one (use engine: converter)")
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    return key, list(signatures[key]["inputs"])


def calibration_data(flatbuffer: bytes, calibration: Calibration) -> dict[str, list[dict[str, Any]]]:
    """Samples keyed by signature and signature input name, as ai-edge-quantizer wants them."""
    key, names = _signature_inputs(flatbuffer)
    data = calibration.samples
    if len(names) == 1 and len(data.inputs) == 1:
        mapping = {names[0]: next(iter(data.inputs))}
    else:
        missing = [n for n in names if n not in data.inputs]
        if missing:
            raise QpipeError(f"calibration inputs {sorted(data.inputs)} do not match the .tflite's {names}")
        mapping = {n: n for n in names}
    rows = [{sig: data.inputs[ours][i:i + 1].astype("float32") for sig, ours in mapping.items()}
            for i in range(len(data))]
    return {key: rows}


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
                result = engine.quantize(engine.calibrate(calibration_data(source, ctx.calibration)))
            else:
                result = engine.quantize()
    except QpipeError:
        raise
    except Exception as exc:
        raise QpipeError(f"ai-edge-quantizer failed: {type(exc).__name__}: {exc}") from exc
    return bytes(result.quantized_model)


def recipe(kind: str) -> Any:
    """The ai-edge-quantizer recipe for ``dynamic``, ``float16``, ``int8`` or ``int16x8``."""
    from ai_edge_quantizer import recipe as recipes

    if kind == "float16":  # float16 weights, float32 compute: a weight-only cast
        from ai_edge_quantizer import qtyping, recipe_manager
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                       num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        return manager.get_quantization_recipe()
    return {"dynamic": recipes.dynamic_wi8_afp32, "int8": recipes.static_wi8_ai8,
            "int16x8": recipes.static_wi8_ai16}[kind]()
