"""``fallback: auto`` for tflite.int8: keep the most sensitive layers in float until the
pipeline's constraints hold, one layer at a time (worst first), within a budget.

The plain int8 it starts from is the variant's own (the engine chosen as for any int8
variant), so its ``plain_int8`` metrics are those of a plain int8 variant beside it. Each
candidate is converted with TFLite's QuantizationDebugger (``denylisted_nodes``) and
measured with ``ctx.evaluate`` — the variant's own backend and evaluators, with deltas
against the baseline — so the search judges exactly what the final results will show.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qpipe import Artifact, QpipeError, QuantizeContext, unmet

from qpipe_tflite.sensitivity import LayerError, convert_keeping_float, layer_sensitivity, write_report

#: ops whose output error only echoes their input's (they add no quantization error of their own)
PASS_THROUGH = {"RESHAPE", "MAX_POOL_2D", "SQUEEZE", "CONCATENATION", "QUANTIZE", "DEQUANTIZE"}


def _samples(ctx: QuantizeContext):
    from qpipe.tflite import representative_dataset

    return lambda: representative_dataset(ctx.calibration)


def analyze(quantizer: Any, ctx: QuantizeContext, write: bool) -> list[LayerError]:
    """Rank the variant's layers by int8 error; with ``write``, save the table and chart."""
    ctx.report("ranking layers by int8 error")
    layers = layer_sensitivity(quantizer.make_converter(ctx), _samples(ctx))
    ctx.record("sensitivity", [{"rank": layer.rank, "op": layer.op, "tensor": layer.tensor,
                                "rmse_over_scale": round(layer.rmse_over_scale, 6)} for layer in layers[:10]])
    if write:
        files = write_report(layers, ctx.work_dir, f"{ctx.variant}.sensitivity")
        ctx.record("files", sorted(p.name for p in files.values()))
    return layers



def fall_back(quantizer: Any, ctx: QuantizeContext, artifact: Artifact, layers: list[LayerError]) -> Artifact:
    """Keep layers in float, worst first, until ``ctx.constraints`` hold or the budget ends."""
    if not ctx.constraints or ctx.evaluate is None:
        raise QpipeError("fallback: auto needs constraints in the pipeline, e.g. "
                         "constraints: ['accuracy_delta >= -0.01'] (a regression model: ['mae_delta <= 0.05'], "
                         "any task: ['relative_error <= 0.02'])")
    ctx.report("fallback: checking plain int8 against the constraints")
    plain = ctx.evaluate(artifact)
    misses = unmet(ctx.constraints, plain)
    record: dict[str, Any] = {"plain_int8": {"engine": artifact.metadata.get("engine"), "meets_constraints": not misses,
                                             "unmet": misses, "metrics": plain},
                              "float_layers": [], "trials": []}
    metrics = dict(plain)
    candidates = [layer for layer in layers if layer.op not in PASS_THROUGH]
    budget = quantizer.options.fallback_max_layers
    kept: list[LayerError] = []
    for layer in candidates[:budget]:
        if not misses:
            break
        kept.append(layer)
        ctx.report(f"fallback: keeping {len(kept)} layer(s) in float ({layer.op})")
        flatbuffer = convert_keeping_float(quantizer.make_converter(ctx), _samples(ctx), [k.tensor for k in kept])
        artifact.path.write_bytes(flatbuffer)
        metrics = ctx.evaluate(artifact)
        misses = unmet(ctx.constraints, metrics)
        record["trials"].append({"float_layers": len(kept), "unmet": misses})
    record["float_layers"] = [{"op": k.op, "tensor": k.tensor, "rank": k.rank} for k in kept]
    record["meets_constraints"] = not misses
    ctx.record("fallback", record)
    if misses:
        ctx.warn(f"fallback kept {len(kept)} layer(s) in float (budget {budget}) and the constraints "
                 f"still fail: {'; '.join(misses)}", code="fallback-unmet")
    artifact.metadata["metrics"] = {
        **artifact.metadata.get("metrics", {}),
        "fallback_float_layers": float(len(kept)),
        "fallback_size_cost_bytes": metrics.get("size_bytes", 0.0) - plain.get("size_bytes", 0.0),
        **({"fallback_latency_cost_ms": metrics["latency_ms_p50"] - plain["latency_ms_p50"]}
           if "latency_ms_p50" in metrics and "latency_ms_p50" in plain else {}),
    }
    if kept:
        artifact.metadata["io_note"] = "float fallback models keep float32 input/output"
        artifact.expects = dataclasses.replace(artifact.expects, keep_float=tuple(k.tensor for k in kept))
        artifact.metadata["engine"] = "tflite-converter"
        artifact.metadata["engine_reason"] = (f"fallback kept {len(kept)} layer(s) in float, converted by the "
                                              f"converter (QuantizationDebugger); plain int8 was "
                                              f"{record['plain_int8']['engine']}")
    return artifact
