"""The ``micro`` evaluator: what a variant needs on a microcontroller running TFLite Micro.

Works on the variant's .tflite whatever backend ran it: TFLM is run on the file itself
(allocation in a worker process, see ``arena.py``; inference in this one, at an arena the
worker proved works).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

import qpipe
from qpipe import EvalContext, Evaluator
from qpipe_tflm.arena import Prober, smallest_arena
from qpipe_tflm.runtime import LiteRTEngine, SampleRunner, TFLMEngine, require_tflm


class MicroOptions(qpipe.Options):
    max_arena_bytes: int = Field(16 << 20, ge=1024, description="largest tensor arena tried; a model that "
                                 "needs more is reported as not micro-compatible")
    alignment: int = Field(16, ge=1, description="arena_bytes is the smallest multiple of this that works "
                           "(TFLM aligns arena buffers to 16 bytes)")
    flash_overhead_bytes: int = Field(0, ge=0, description="added to flash_bytes: the code size of your "
                                      "firmware's TFLM runtime and kernels, measured once for your build")
    agreement_samples: int | None = Field(None, ge=1, description="evaluation samples compared with LiteRT "
                                          "(default: all of them)")
    xnnpack: bool = Field(False, description="compare with LiteRT's XNNPACK delegate (the litert backend's "
                          "default, which rounds int8 differently) instead of its built-in kernels")


def _graph(path: Path):
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils, flatbuffer_utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))


def op_names(path: Path) -> list[str]:
    """The distinct operators of every subgraph, in order of first use: what an op resolver
    (``MicroMutableOpResolver<N>``) must register."""
    utils, model = _graph(path)
    names: dict[str, None] = {}
    for graph in model.subgraphs:
        for op in graph.operators or []:
            names[utils.opcode_to_name(model, op.opcodeIndex) or "CUSTOM"] = None
    return list(names)


def output_step(path: Path, position: int) -> float | None:
    """One quantization step of output ``position``: its scale, or the scale of the integer
    tensor a final DEQUANTIZE turns into it; None for a float model."""
    utils, model = _graph(path)
    graph = model.subgraphs[0]
    index = graph.outputs[position]
    for _ in range(2):
        q = graph.tensors[index].quantization
        if q is not None and q.scale is not None and len(q.scale) == 1 and q.scale[0] > 0:
            return float(q.scale[0])
        producer = next((op for op in graph.operators if index in list(op.outputs)), None)
        if producer is None or utils.opcode_to_name(model, producer.opcodeIndex) != "DEQUANTIZE":
            return None
        index = producer.inputs[0]
    return None


def agreement(path: Path, data: qpipe.Dataset, arena_size: int, xnnpack: bool = False) -> dict[str, float]:
    """Max abs difference of TFLM's outputs from LiteRT's on ``data`` (same quantized inputs),
    in output units and in output quantization steps."""
    micro = SampleRunner(path, TFLMEngine(path, arena_size))
    litert = SampleRunner(path, LiteRTEngine(path, xnnpack))
    try:
        ours, theirs = micro.predict(data, 256), litert.predict(data, 256)
    finally:
        micro.close()
        litert.close()
    worst = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
    metrics = {"micro_max_abs_diff": worst}
    step = output_step(path, micro.output.position)
    if step is not None:
        metrics["micro_max_diff_steps"] = round(worst / step, 3)
    return metrics


class Micro(Evaluator):
    """TFLite Micro: runs at all?, smallest tensor arena, flash, op list, agreement with LiteRT."""

    name = "micro"
    Options = MicroOptions
    metrics = ("micro_compatible", "arena_bytes", "flash_bytes", "micro_ops",
               "micro_max_abs_diff", "micro_max_diff_steps")
    headline = ("arena_bytes", "flash_bytes")
    lower_is_better = ("arena_bytes", "flash_bytes", "micro_max_abs_diff", "micro_max_diff_steps")
    role = "cost"

    def __init__(self, options: MicroOptions | None = None):
        super().__init__(options)
        require_tflm("the micro evaluator")

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        artifact, opts = ctx.artifact, self.options
        if artifact.format != "tflite" or not artifact.path.is_file():
            ctx.record("micro_reason", f"TFLite Micro runs .tflite files, not {artifact.format} artifacts")
            return {"micro_compatible": 0.0}
        path = artifact.path
        ops = op_names(path)
        ctx.record("micro_ops", ops)
        metrics = {"flash_bytes": float(path.stat().st_size + opts.flash_overhead_bytes), "micro_ops": float(len(ops))}
        largest = opts.max_arena_bytes // opts.alignment * opts.alignment
        ctx.report("micro: allocating in TFLite Micro")
        with Prober(path) as prober:
            first = prober.attempt(largest)
            if not first.ok:
                ctx.record("micro_reason", first.reason)
                ctx.report(f"micro: TFLite Micro cannot run it: {first.reason}")
                return {**metrics, "micro_compatible": 0.0}
            arena = smallest_arena(prober.attempt, first, opts.alignment)
            ctx.record("micro_arena", {"alignment": opts.alignment, "tries": len(prober.attempts),
                                       "tflm_reported_bytes": first.reported_total,
                                       "flash_overhead_bytes": opts.flash_overhead_bytes})
        metrics.update(micro_compatible=1.0, arena_bytes=float(arena))
        if ctx.data is not None and len(ctx.data):
            ctx.report("micro: comparing TFLite Micro with LiteRT")
            count = len(ctx.data) if opts.agreement_samples is None else min(opts.agreement_samples, len(ctx.data))
            metrics.update(agreement(path, ctx.data.take(range(count)), largest, opts.xnnpack))
        return metrics
