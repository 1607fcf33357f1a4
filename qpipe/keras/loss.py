"""Which loss to fine-tune with: the option, else the saved compile config, else inferred.

Inference covers the usual heads only: softmax classifiers (sparse or one-hot labels), a
single sigmoid unit (binary labels), linear outputs (logits with integer labels, or a
regressor with real-valued targets). Anything else asks for ``options.loss``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from qpipe import QpipeError
from qpipe.tfenv import tf_keras


@dataclass
class LossChoice:
    """The tf_keras loss, the metrics to track, and where the choice came from."""

    loss: Any
    metrics: list[str]
    source: str  # "option", "compile config" or "inferred"

    @property
    def name(self) -> str:
        return self.loss if isinstance(self.loss, str) else type(self.loss).__name__


def choose_loss(requested: str | None, original: Any, labels: np.ndarray, what: str) -> LossChoice:
    """The loss to train ``original`` (a Keras 3 or tf_keras model) on ``labels``."""
    if requested:
        try:
            tf_keras().losses.get(requested)  # only checks that Keras knows the name
        except (ValueError, TypeError):
            raise QpipeError(f"{what}: unknown loss '{requested}'; give a Keras loss name such as "
                             "sparse_categorical_crossentropy or mse") from None
        return LossChoice(requested, _metrics_for(requested), "option")
    compiled = _compiled_loss(original)
    if compiled is not None:
        return LossChoice(compiled, _metrics_for(compiled), "compile config")
    inferred = infer_loss(original, labels)
    if inferred is None:
        activation = _output_activation(original)
        raise QpipeError(f"{what}: cannot infer a loss for an output with activation '{activation}' and labels "
                         f"of shape {tuple(labels.shape)} ({labels.dtype}); the model was saved without a "
                         "compile config: set options.loss (e.g. sparse_categorical_crossentropy or mse)")
    return LossChoice(inferred, _metrics_for(inferred), "inferred")


def _metrics_for(loss: Any) -> list[str]:
    name = loss if isinstance(loss, str) else type(loss).__name__
    return ["accuracy"] if "crossentropy" in name.lower().replace("_", "") else []


def _compiled_loss(model: Any) -> Any:
    """The loss saved with the model, as a tf_keras loss (None if not compiled)."""
    loss = getattr(model, "loss", None)
    if loss is None or isinstance(loss, (list, dict)):
        return None
    if isinstance(loss, str):
        return loss
    k2 = tf_keras()
    if isinstance(loss, k2.losses.Loss):
        return loss
    if callable(loss) and hasattr(loss, "get_config"):  # a Keras 3 Loss object
        cls = getattr(k2.losses, type(loss).__name__, None)
        if cls is not None:
            accepted = set(inspect.signature(cls.__init__).parameters)
            config = {k: v for k, v in loss.get_config().items() if k in accepted and k != "reduction"}
            return cls(**config)
    name = getattr(loss, "__name__", None)
    return name if name and hasattr(k2.losses, name) else None


def _output_activation(model: Any) -> str:
    layer = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(layer, "activation", None)
    if activation is None:
        return type(layer).__name__.lower() if layer is not None else "unknown"
    return getattr(activation, "__name__", str(activation))


def infer_loss(model: Any, labels: np.ndarray) -> str | Any | None:
    """A loss for a standard classifier or regressor head, or None."""
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        return None
    units = outputs[0].shape[-1]
    activation = _output_activation(model)
    labels = np.asarray(labels)
    integer = labels.dtype.kind in "iub" or (labels.size and np.all(np.mod(labels, 1) == 0))
    flat = labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)
    if activation == "softmax" and units and units > 1:
        if flat and integer:
            return "sparse_categorical_crossentropy"
        if labels.ndim == 2 and labels.shape[1] == units:
            return "categorical_crossentropy"
    if activation == "sigmoid" and units == 1 and flat and set(np.unique(labels)) <= {0, 1}:
        return "binary_crossentropy"
    if activation == "linear":
        if units and units > 1 and flat and integer and labels.min() >= 0 and labels.max() < units:
            return tf_keras().losses.SparseCategoricalCrossentropy(from_logits=True)
        # real-valued targets; or one output and more than two values (integral targets such as
        # counts or scikit-learn's diabetes progression are still a regression)
        regression = not integer or ((units or 1) == 1 and len(np.unique(labels)) > 2)
        if regression and labels.reshape(len(labels), -1).shape[1] == (units or 1):
            return "mse"
    return None
