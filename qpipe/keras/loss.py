"""Which loss to fine-tune with: the option, else the saved compile config, else inferred.

Inference covers the usual heads only: softmax classifiers (sparse or one-hot labels), a
single sigmoid unit (binary labels), linear outputs (logits with integer labels, or a
regressor with real-valued targets). Anything else asks for ``options.loss``.

A model with several outputs trains on the outputs that have labels (``{output: array}``),
each with its own loss: the option (the same for all), else the compile config's loss for
that output (a dict or list of losses), else inferred from that output's head and labels.
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

    loss: Any  # one loss, or {output name: loss} for a model with several outputs
    metrics: Any  # list[str], or {output name: list[str]}
    source: str  # "option", "compile config" or "inferred"

    @property
    def name(self) -> str:
        if isinstance(self.loss, dict):
            return ", ".join(f"{output}: {_name(loss)}" for output, loss in self.loss.items())
        return _name(self.loss)


def _name(loss: Any) -> str:
    return loss if isinstance(loss, str) else type(loss).__name__


def choose_loss(requested: str | None, original: Any, labels: Any, what: str) -> LossChoice:
    """The loss to train ``original`` (a Keras 3 or tf_keras model) on ``labels`` (``{output:
    array}`` for a model with several outputs: ``choose_losses``)."""
    if isinstance(labels, dict):
        return choose_losses(requested, original, labels, what)
    if requested:
        return LossChoice(_check_name(requested, what), _metrics_for(requested), "option")
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


def _check_name(requested: str, what: str) -> str:
    try:
        tf_keras().losses.get(requested)  # only checks that Keras knows the name
    except (ValueError, TypeError):
        raise QpipeError(f"{what}: unknown loss '{requested}'; give a Keras loss name such as "
                         "sparse_categorical_crossentropy or mse") from None
    return requested


def choose_losses(requested: str | None, original: Any, labels: dict[str, np.ndarray], what: str) -> LossChoice:
    """One loss per labelled output of a multi-output model: the option, else the compile
    config's loss for that output, else inferred from its head; an output none of these gives
    is an error naming it."""
    names = list(getattr(original, "output_names", None) or [])
    compiled = getattr(original, "loss", None)
    unknown = [name for name in labels if name not in names]
    if unknown:
        raise QpipeError(f"{what}: labels for output '{unknown[0]}', but the model's outputs are: {', '.join(names)}")
    losses: dict[str, Any] = {}
    sources = set()
    for i, name in enumerate(names):
        if name not in labels:
            continue
        y = np.asarray(labels[name])
        if requested:
            losses[name], source = _check_name(requested, what), "option"
        elif (found := _compiled_for(compiled, name, i)) is not None:
            losses[name], source = found, "compile config"
        else:
            inferred = _infer_head(original, i, y)
            if inferred is None:
                raise QpipeError(f"{what}: output '{name}': cannot infer a loss for its activation "
                                 f"'{_activation(_output_layer(original, i))}' and labels of shape {tuple(y.shape)} "
                                 f"({y.dtype}), and the compile config has no loss for it: compile the model with "
                                 "a loss per output or set options.loss")
            losses[name], source = inferred, "inferred"
        sources.add(source)
    return LossChoice(losses, {name: _metrics_for(loss) for name, loss in losses.items()}, " and ".join(sorted(sources)))


def _compiled_for(compiled: Any, name: str, index: int) -> Any:
    """The compile config's loss for output ``name`` (number ``index``), as a tf_keras loss."""
    if compiled is None:
        return None
    if hasattr(compiled, "keys"):  # a dict (tracked by TensorFlow: not always a dict instance)
        return _as_tf_keras(compiled.get(name)) if name in compiled.keys() else None
    if isinstance(compiled, (list, tuple)) or hasattr(compiled, "__len__") and not isinstance(compiled, str):
        return _as_tf_keras(compiled[index]) if index < len(compiled) else None
    return _as_tf_keras(compiled)  # one loss for every output


def _output_layer(model: Any, index: int) -> Any:
    try:
        tensor = model.outputs[index]
        history = getattr(tensor, "_keras_history", None)
        return history[0] if history is not None else model.get_layer(model.output_names[index])
    except (AttributeError, IndexError, ValueError):
        return None


def _activation(layer: Any) -> str:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return type(layer).__name__.lower() if layer is not None else "unknown"
    return getattr(activation, "__name__", str(activation))


def _infer_head(model: Any, index: int, labels: np.ndarray) -> Any:
    units = model.outputs[index].shape[-1]
    return _infer(units, _activation(_output_layer(model, index)), labels)


def _metrics_for(loss: Any) -> list[str]:
    name = loss if isinstance(loss, str) else type(loss).__name__
    return ["accuracy"] if "crossentropy" in name.lower().replace("_", "") else []


def _compiled_loss(model: Any) -> Any:
    """The loss saved with the model, as a tf_keras loss (None if not compiled)."""
    loss = getattr(model, "loss", None)
    if loss is None or isinstance(loss, (list, dict)):
        return None
    return _as_tf_keras(loss)


def _as_tf_keras(loss: Any) -> Any:
    """A saved loss (a name, a tf_keras or Keras 3 loss) as a tf_keras loss; None if not one."""
    if loss is None:
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
    return _activation(model.layers[-1] if getattr(model, "layers", None) else None)


def infer_loss(model: Any, labels: np.ndarray) -> str | Any | None:
    """A loss for a standard classifier or regressor head, or None."""
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        return None
    return _infer(outputs[0].shape[-1], _output_activation(model), labels)


def _infer(units: Any, activation: str, labels: Any) -> str | Any | None:
    """A loss for one head of ``units`` values with ``activation``, trained on ``labels``."""
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
