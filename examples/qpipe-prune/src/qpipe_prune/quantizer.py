"""``prune.int8``: magnitude pruning, fine-tuning, strip, full-integer int8."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from qpipe import Artifact, Expects, QuantizeContext, Quantizer
from qpipe.keras import TrainingOptions, choose_loss, final_metrics, fit, labels_of, model_inputs, tf_keras_copy
from qpipe.tfenv import quiet
from qpipe.tflite import convert_keras

#: layers whose kernels are pruned (TF-MOT prunes these by default)
PRUNED = ("Dense", "Conv2D", "DepthwiseConv2D", "Conv1D", "SeparableConv2D")


class PruneOptions(TrainingOptions):
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of each pruned kernel set to zero")
    io: Literal["int8", "float32"] = Field("int8", description="type of the model's input and output tensors")


class PruneInt8(Quantizer):
    """Prune to a target sparsity with TF-MOT, fine-tune, strip, convert to full-integer int8."""

    name = "prune.int8"
    Options = PruneOptions
    needs_training = True
    needs_calibration = True
    expects = Expects(smaller=True, quantized_weights=True, full_integer=True)

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        import tensorflow_model_optimization as tfmot

        sparsity = tfmot.sparsity.keras
        labels = labels_of(ctx.training, "training", self.name)
        sample = model_inputs(ctx.training.take(range(min(64, len(ctx.training)))))
        with quiet():
            model = tf_keras_copy(ctx.model, sample, self.name)  # private: ctx.model.model is shared
            schedule = sparsity.ConstantSparsity(self.options.sparsity, begin_step=0, frequency=1)
            pruned = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
        choice = choose_loss(self.options.loss, ctx.model.model, labels, self.name)
        ctx.report(f"pruning to {self.options.sparsity:.0%} while training {self.options.epochs} epochs")
        history = fit(pruned, choice, self.options, ctx, self.name, callbacks=[sparsity.UpdatePruningStep()])
        stripped = sparsity.strip_pruning(pruned)
        reached = kernel_sparsity(stripped)
        ctx.report(f"converting to int8 ({reached:.1%} of the pruned weights are zero)")
        path = ctx.artifact_path(".tflite")
        path.write_bytes(convert_keras(stripped, "int8", samples=ctx.calibration, io=self.options.io))
        return Artifact(path=path, expects=self.expects, metadata={
            "engine": "tfmot-pruning", "target_sparsity": self.options.sparsity,
            "metrics": {**final_metrics(history), "sparsity": round(reached, 4)},
        })


def kernel_sparsity(model: Any) -> float:
    """The fraction of zeros in the kernels of the pruned layer types."""
    zeros = total = 0
    for layer in model.layers:
        if type(layer).__name__ in PRUNED:
            kernel = np.asarray(layer.get_weights()[0])
            zeros += int(np.count_nonzero(kernel == 0))
            total += kernel.size
    return zeros / total if total else 0.0
