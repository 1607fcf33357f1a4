"""Quantize the shared float .tflite with ``ai-edge-quantizer`` recipes (convert once).

Instead of running the TFLite converter again per variant, the float32 flatbuffer that the
run converted once is quantized directly: dynamic-range in about 0.1 s, static int8/int16
with calibration in seconds, where the converter takes tens of seconds on real models.
"""

from __future__ import annotations

from typing import Any

from qpipe import Calibration, QpipeError, QuantizeContext, match_inputs
from qpipe.conversion import float_tflite
from qpipe.tfenv import quiet

ENGINE = "ai-edge-quantizer"


def _signature_inputs(interpreter: Any) -> tuple[str, list[str]]:
    signatures = interpreter.get_signature_list()
    if not signatures:
        raise QpipeError("the float .tflite has no signature; ai-edge-quantizer needs one (use engine: converter)")
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
    return key, list(signatures[key]["inputs"])


#: most bytes of tensors one calibration step may hold (ai-edge-quantizer keeps every tensor)
STEP_BYTES = 256 << 20


def _samples_per_step(interpreter: Any, key: str, count: int) -> int:
    """Samples per calibration step: as many as fit in ``STEP_BYTES`` of tensors, or one when
    the model's batch dimension is fixed."""
    import numpy as np

    inputs = interpreter.get_signature_runner(key).get_input_details().values()
    if any(len(d["shape_signature"]) == 0 or d["shape_signature"][0] != -1 for d in inputs):
        return 1
    per_sample = sum(int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
                     for d in interpreter.get_tensor_details())
    return max(1, min(count, STEP_BYTES // max(1, per_sample)))


def calibration_data(flatbuffer: bytes, calibration: Calibration) -> list[dict[str, list[dict[str, Any]]]]:
    """The calibration samples as ai-edge-quantizer datasets, one per batch.

    Keyed by signature and signature input name, as ai-edge-quantizer wants them. Each batch
    is calibrated on its own and the ranges merged by ``merge_ranges``: ai-edge-quantizer
    otherwise smooths per-step min/max with a moving average, which on per-sample steps
    clips activations (16x the converter's output error on our tiny test model).
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    key, names = _signature_inputs(interpreter)
    data = calibration.samples
    mapping = match_inputs(names, data.inputs, "the float .tflite")
    step = _samples_per_step(interpreter, key, len(data))
    return [{key: [{sig: data.inputs[ours][i:i + step].astype("float32") for sig, ours in mapping.items()}]}
            for i in range(0, len(data), step)]


def merge_ranges(total: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """Tensor statistics of two calibration steps: the smallest min and the largest max."""
    import numpy as np

    merged = dict(total)
    for name, qsv in step.items():
        seen = merged.get(name)
        if seen and qsv and "min" in seen and "min" in qsv:
            merged[name] = {**seen, "min": np.minimum(seen["min"], qsv["min"]),
                            "max": np.maximum(seen["max"], qsv["max"])}
        elif not seen:
            merged[name] = qsv
    return merged


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
                ranges: dict[str, Any] = {}
                for batch in calibration_data(source, ctx.calibration):
                    ranges = merge_ranges(ranges, engine.calibrate(batch))
                result = engine.quantize(ranges)
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
