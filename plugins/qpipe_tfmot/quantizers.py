"""The training quantizers: ``tfmot.qat`` (int8), ``tfmot.ternary`` and ``tfmot.binary``.

Each takes the loaded model as tf_keras (rebuilding a Keras 3 model), picks the loss,
wraps the model with TF-MOT, fine-tunes it on ``data.training`` and writes a .tflite.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from qpipe import Artifact, Expects, QuantizeContext, Quantizer
from qpipe.keras import (TrainingOptions, check_same_outputs, choose_loss, final_metrics, fit, labels_of,
                         model_inputs, tf_keras_copy)
from qpipe.tfenv import quiet

from qpipe_tfmot.annotate import match_layers, quantize_model
from qpipe_tfmot.fold import fold_dense_batchnorm


class TFMOTOptions(TrainingOptions):
    """The toolkit's training options plus what TF-MOT quantizers choose."""

    keep_float: list[str] = Field(default_factory=list,
                                  description="layers kept in float, by name or class name (e.g. Dense)")
    unsupported: Literal["error", "float"] = Field(
        "error", description="a layer TF-MOT cannot quantize: fail, or keep it in float with a warning")


class QATOptions(TFMOTOptions):
    io: Literal["int8", "float32"] = Field("int8", description="type of the model's input and output tensors")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")


class LowBitOptions(TFMOTOptions):
    epochs: int = Field(10, ge=1, description="fine-tuning epochs")
    learning_rate: float = Field(1e-3, gt=0, description="optimizer learning rate")
    activations: Literal["float", "int8"] = Field(
        "float", description="float: 2-bit dense and 4-bit conv weights, float activations (dynamic range); "
                  "int8: 4-bit weights, int8 activations")


class TernaryOptions(LowBitOptions):
    threshold: float = Field(0.7, gt=0, lt=2, description="weights below threshold x mean|w| of their "
                                                             "channel become 0")


class TrainingQuantizer(Quantizer):
    """Shared steps: the tf_keras model, the loss, the annotated model, training."""

    needs_training = True
    #: the last epoch's loss and (for classifiers) accuracy, and the training time
    metrics = ("train_seconds", "train_loss", "val_loss", "train_accuracy", "val_accuracy")

    def prepare(self, ctx: QuantizeContext) -> tuple[Any, Any]:
        """(tf_keras model, loss choice)."""
        what = self.name
        labels = labels_of(ctx.training, "training", what)
        sample = model_inputs(ctx.training.take(range(min(64, len(ctx.training)))))
        if ctx.model.flavor == "keras3":
            ctx.report("rebuilding the Keras 3 model in tf_keras")
        with quiet():
            base = tf_keras_copy(ctx.model, sample, what)
            folded, batchnorms = fold_dense_batchnorm(base, what, keep=self.options.keep_float)
            if batchnorms:
                check_same_outputs(base, folded, sample, what, label="folding BatchNormalization into Dense")
        if batchnorms:
            ctx.report(f"folded {len(batchnorms)} BatchNormalization layer(s) into the Dense before them")
            ctx.record("folded_batchnorm", batchnorms)
        choice = choose_loss(self.options.loss, ctx.model.model, labels, what)
        return folded, choice

    def train(self, qat: Any, choice: Any, ctx: QuantizeContext) -> tuple[dict, float]:
        from qpipe_tfmot.ranges import calibrate_ranges

        ctx.report("calibrating the fake-quantization ranges on training samples")
        calibrated = calibrate_ranges(qat, ctx.training, self.options.batch_size)
        if calibrated:
            ctx.record("range_calibration", calibrated)
        ctx.report(f"training {self.options.epochs} epochs (loss {choice.name}, {choice.source})")
        started = time.perf_counter()
        history = fit(qat, choice, self.options, ctx, self.name)
        return history, round(time.perf_counter() - started, 3)

    def facts(self, ctx: QuantizeContext, choice: Any, history: dict, seconds: float, kept: set[str]) -> dict:
        return {
            "engine": "tfmot",
            "rebuilt_from_keras3": ctx.model.flavor == "keras3",
            "kept_float": sorted(kept),
            "training": {"loss": choice.name, "loss_source": choice.source, "epochs": self.options.epochs,
                         "batch_size": self.options.batch_size, "learning_rate": self.options.learning_rate,
                         "optimizer": self.options.optimizer, "samples": len(ctx.training),
                         "history": history},
            "metrics": {**final_metrics(history), "train_seconds": seconds},
        }


class QAT(TrainingQuantizer):
    """Quantization-aware training (TF-MOT), then a full-integer int8 .tflite."""

    name = "tfmot.qat"
    Options = QATOptions

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        import tensorflow_model_optimization as tfmot

        from qpipe_tfmot.storage import convert_qat

        base, choice = self.prepare(ctx)
        keep = match_layers(base, self.options.keep_float, self.name)
        scheme = tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme(
            disable_per_axis=not self.options.per_channel)
        qat, kept = quantize_model(base, scheme, keep, self.options.unsupported, ctx.warn, self.name)
        history, seconds = self.train(qat, choice, ctx)
        ctx.report("converting")
        path = ctx.artifact_path(".tflite")
        path.write_bytes(convert_qat(qat, self.options.io))
        return Artifact(path=path, format="tflite", metadata=self.facts(ctx, choice, history, seconds, kept),
                        expects=Expects(smaller=True, quantized_weights=True, full_integer=True,
                                        keep_float=tuple(sorted(kept))))


class LowBit(TrainingQuantizer):
    """Base of binary and ternary: constrained weights, stored as 2- or 4-bit tensors."""

    mode: ClassVar[str] = "ternary"
    Options = LowBitOptions

    @property
    def threshold(self) -> float:
        return getattr(self.options, "threshold", 0.7)

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        from qpipe_tfmot import lowbit
        from qpipe_tfmot.storage import convert_float, store_low_bit

        opts = self.options
        base, choice = self.prepare(ctx)
        keep = match_layers(base, opts.keep_float, self.name)
        scheme, config_for, annotate_all = lowbit.scheme_and_configs(self.mode, self.threshold, opts.activations)
        qat, kept = quantize_model(base, scheme, keep, opts.unsupported, ctx.warn, self.name,
                                   config_for=config_for, annotate_all=annotate_all)
        history, seconds = self.train(qat, choice, ctx)
        ctx.report(f"storing {self.mode} weights")
        layers = lowbit.lowbit_layers(base, kept)
        with quiet():
            baked = lowbit.bake(base, qat, layers, self.mode, self.threshold)
        flatbuffer, bits_by_op = store_low_bit(convert_float(baked), layers, opts.activations, ctx.training)
        path = ctx.artifact_path(".tflite")
        path.write_bytes(flatbuffer)
        facts = self.facts(ctx, choice, history, seconds, kept)
        facts.update({"weights": self.mode, "weight_storage_bits": bits_by_op, "low_bit_layers": layers})
        return Artifact(path=path, format="tflite", metadata=facts, expects=Expects(
            smaller=True, quantized_weights=True, full_integer=opts.activations == "int8",
            keep_float=tuple(sorted(kept))))


class Ternary(LowBit):
    """Ternary weights {-a, 0, +a} per channel (TF-MOT QAT), stored as 2-bit tensors."""

    name = "tfmot.ternary"
    mode = "ternary"
    Options = TernaryOptions


class Binary(LowBit):
    """Binary weights {-a, +a} per channel (TF-MOT QAT), stored as 2-bit tensors."""

    name = "tfmot.binary"
    mode = "binary"
    Options = LowBitOptions
