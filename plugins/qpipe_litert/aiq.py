"""Post-training quantizers built on Google's ``ai-edge-quantizer`` (``litert.int4``).

``ai-edge-quantizer`` quantizes an existing float .tflite from a recipe and writes INT4
weight tensors packed two to a byte, so the file itself shrinks. The float .tflite is
converted once per run (``qpipe.conversion``) and shared with every other variant.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

import qpipe
from qpipe import Artifact, Expects, QpipeError, QuantizeContext, Quantizer
from qpipe.tfenv import quiet


def float_tflite(ctx: QuantizeContext) -> bytes:
    """The model as a float32 .tflite, converted once per run (shared with other plugins)."""
    from qpipe.conversion import float_tflite as shared

    return shared(ctx.model, ctx.report)


class Int4Options(qpipe.Options):
    mode: Literal["dynamic", "weight_only"] = Field(
        "dynamic", description="dynamic: int4 weights, activations quantized at run time; "
                               "weight_only: int4 weights dequantized to float before each op")
    granularity: Literal["channel", "block32", "block64"] = Field(
        "channel", description="one scale per output channel, or per block of 32/64 weights")


class Int4(Quantizer):
    """4-bit weights (ai-edge-quantizer, post-training), float activations."""

    name = "litert.int4"
    Options = Int4Options

    def recipe(self) -> Any:
        from ai_edge_quantizer import qtyping, recipe_manager

        granularity = {"channel": qtyping.QuantGranularity.CHANNELWISE,
                       "block32": qtyping.QuantGranularity.BLOCKWISE_32,
                       "block64": qtyping.QuantGranularity.BLOCKWISE_64}[self.options.granularity]
        manager = recipe_manager.RecipeManager()
        add = manager.add_dynamic_config if self.options.mode == "dynamic" else manager.add_weight_only_config
        add(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=4, granularity=granularity)
        return manager.get_quantization_recipe()

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        from ai_edge_quantizer import quantizer

        source = float_tflite(ctx)
        ctx.report("quantizing weights to int4")
        started = time.perf_counter()
        engine = quantizer.Quantizer(bytearray(source))
        engine.load_quantization_recipe(self.recipe())
        try:
            with quiet():
                result = engine.quantize()
        except Exception as exc:
            raise QpipeError(f"ai-edge-quantizer failed: {type(exc).__name__}: {exc}") from exc
        path = ctx.artifact_path(".tflite")
        path.write_bytes(bytes(result.quantized_model))
        # LiteRT has no int4 kernel for depthwise convolutions: their weights stay float and
        # the sanity check names them (float-weights)
        return Artifact(path=path, format="tflite", expects=Expects(smaller=True, quantized_weights=True), metadata={
            "engine": "ai-edge-quantizer", "recipe": f"{self.options.mode}_wi4_afp32 ({self.options.granularity})",
            "convert_seconds": round(time.perf_counter() - started, 3)})
