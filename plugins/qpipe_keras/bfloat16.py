"""``keras.bfloat16``: what bfloat16 weights (and optionally activations) cost, simulated in Keras.

No TFLite runtime here executes bfloat16 kernels, so this variant is a simulation, not a
deployable ``.tflite``: every weight is rounded to bfloat16 (round to nearest even) and
stored as raw bfloat16 bytes, so the artifact's size is exactly the bfloat16 weight bytes;
the ``keras.bfloat16`` backend rebuilds the model from the original with those weights (and,
with ``activations: true``, Keras 3's ``mixed_bfloat16`` policy: bfloat16 compute, float32
variables) and runs it in TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from pydantic import Field

import qpipe
from qpipe import Artifact, Backend, LoadedModel, QpipeError, Quantizer, Runner

from qpipe_keras import KerasRunner

FORMAT = "keras.bfloat16"
NOTE = "simulated: bfloat16 weights run in Keras/TensorFlow, not a deployable .tflite"


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 -> the upper 16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def from_bfloat16(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class Bfloat16Options(qpipe.Options):
    activations: bool = Field(False, description="also compute in bfloat16 (Keras 3 mixed_bfloat16 policy)")


class KerasBfloat16(Quantizer):
    """Weights rounded to bfloat16 and run in Keras (simulated, not a deployable .tflite)."""

    name = "keras.bfloat16"
    Options = Bfloat16Options
    default_backend = "keras.bfloat16"
    output_format = FORMAT

    def quantize(self, ctx: Any) -> Artifact:
        model = ctx.model
        if model.flavor not in ("keras3", "tf_keras"):
            raise QpipeError(f"keras.bfloat16 needs a Keras model, not a {model.flavor}")
        if self.options.activations and model.flavor != "keras3":
            raise QpipeError("keras.bfloat16: activations: true needs a Keras 3 model (mixed_bfloat16 policy)")
        weights = [np.asarray(w, dtype=np.float32) for w in model.model.get_weights()]
        path = ctx.artifact_path(".bf16")
        path.write_bytes(b"".join(to_bfloat16(w).tobytes() for w in weights))
        count = sum(w.size for w in weights)
        return Artifact(path=path, format=FORMAT, metadata={
            "engine": f"{model.flavor} (simulated)", "simulated": True, "note": NOTE,
            "recipe": "bfloat16 weights" + (" and activations (mixed_bfloat16)" if self.options.activations else ""),
            "activations": "bfloat16" if self.options.activations else "float32",
            "metrics": {"bfloat16_weight_bytes": float(2 * count), "simulated": 1.0}})


def mixed_bfloat16_clone(model: Any) -> Any:
    """A Keras 3 copy of ``model`` whose layers compute in bfloat16 (float32 variables)."""
    from qpipe.tfenv import keras3

    keras = keras3()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        return keras.models.clone_model(model, clone_function=lambda layer: layer.__class__.from_config(
            {**layer.get_config(), "dtype": "mixed_bfloat16"}))
    finally:
        keras.config.set_dtype_policy(previous)


class Bfloat16Runner(KerasRunner):
    """The original model rebuilt with the artifact's bfloat16 weights."""

    def __init__(self, artifact: Artifact, model: LoadedModel):
        raw = np.frombuffer(artifact.path.read_bytes(), dtype=np.uint16)
        shapes = [np.shape(w) for w in model.model.get_weights()]
        sizes = [int(np.prod(s)) for s in shapes]
        if sum(sizes) != raw.size:
            raise QpipeError(f"{artifact.path.name}: {raw.size} bfloat16 values, the model has {sum(sizes)} weights")
        offsets = np.cumsum([0, *sizes])
        weights = [from_bfloat16(raw[a:b]).reshape(s) for a, b, s in zip(offsets, offsets[1:], shapes, strict=False)]
        if artifact.metadata.get("activations") == "bfloat16":
            clone = mixed_bfloat16_clone(model.model)
        elif model.flavor == "keras3":
            from qpipe.tfenv import keras3

            clone = keras3().models.clone_model(model.model)
        else:
            from qpipe.tfenv import tf_keras

            clone = tf_keras().models.clone_model(model.model)
        clone.set_weights(weights)
        super().__init__(dataclasses.replace(model, model=clone))

    def predict_batch(self, inputs: dict[str, np.ndarray]) -> Any:
        out = super().predict_batch(inputs)
        if isinstance(out, dict):
            return {name: np.asarray(v, dtype=np.float32) for name, v in out.items()}
        return np.asarray(out, dtype=np.float32)


class KerasBfloat16Backend(Backend):
    """Runs keras.bfloat16 artifacts: the original model with bfloat16-rounded weights."""

    name = "keras.bfloat16"
    formats = (FORMAT,)

    def load(self, artifact: Artifact, model: LoadedModel) -> Runner:
        return Bfloat16Runner(artifact, model)
