"""A private tf_keras copy of the model for TF-MOT: Keras 3 Sequential/Functional models are
rebuilt layer by layer.

TF-MOT 0.8 works only with Keras 2 (``tf_keras``). A Keras 3 model made of standard layers
is rebuilt in tf_keras from the same layer configurations, its weights are copied, and the
rebuild must reproduce the original's outputs before anything trains on it. A subclassed
model or a custom layer cannot be rebuilt: the error names the model kind or the layer.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from qpipe import LoadedModel, QpipeError
from qpipe.tfenv import keras3, tf_keras

#: keys every tf_keras layer accepts besides its constructor's own arguments
_BASE_KEYS = {"name", "trainable", "dtype"}


def tf_keras_copy(loaded: LoadedModel, sample: np.ndarray | dict[str, np.ndarray], what: str) -> Any:
    """A private copy of the model as a tf_keras Sequential/Functional model TF-MOT can train.

    ``sample`` (model inputs) checks that a Keras 3 rebuild gives the original's outputs;
    ``what`` starts every error message (e.g. the quantizer's name). The copy is the caller's
    to train or prune: the shared ``loaded.model`` is never changed.
    """
    if loaded.flavor == "tf_keras":
        check_graph_model(loaded.model, "tf_keras", what)
        return loaded.copy()
    if loaded.flavor == "keras3":
        check_graph_model(loaded.model, "keras3", what)
        rebuilt = rebuild_keras3(loaded.model, what)
        check_same_outputs(loaded.model, rebuilt, sample, what)
        return rebuilt
    raise QpipeError(f"{what}: TF-MOT trains Keras models; a {loaded.flavor} model cannot be fine-tuned "
                     "(give the .keras or .h5 file instead)")


def check_graph_model(model: Any, flavor: str, what: str) -> None:
    """Raise unless ``model`` is a Sequential or Functional model (TF-MOT cannot wrap others)."""
    if flavor == "tf_keras":
        ok = bool(getattr(model, "_is_graph_network", False)) and type(model).__module__.startswith("tf_keras.")
    else:
        from keras.src.models.functional import Functional

        ok = type(model) in (keras3().Sequential, Functional)
    if not ok:
        raise QpipeError(f"{what}: the model is a subclassed {flavor} model ({type(model).__name__}); TF-MOT "
                         "quantizes only Sequential and Functional models: rebuild it with keras.Sequential "
                         "or keras.Model(inputs, outputs)")


# --------------------------------------------------------------------------- layers


def _plain(value: Any) -> Any:
    """Keras 3 serialized objects -> the {'class_name', 'config'} form tf_keras reads."""
    if isinstance(value, dict):
        if "class_name" in value and "config" in value:
            if value.get("class_name") == "DTypePolicy":
                return value["config"].get("name", "float32")
            config = _plain(value["config"])
            cls = _nested_class(value["class_name"])
            if cls is not None and isinstance(config, dict):  # drop Keras 3-only arguments
                config = {k: v for k, v in config.items() if k in _accepted(cls)}
            return {"class_name": value["class_name"], "config": config}
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _nested_class(name: str) -> Any:
    """The tf_keras initializer, regularizer or constraint class called ``name`` (or None)."""
    k2 = tf_keras()
    for module in (k2.initializers, k2.regularizers, k2.constraints):
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            return cls
    return None


def _accepted(cls: Any) -> set[str]:
    """Constructor arguments of ``cls``, following ``**kwargs`` up to the base classes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names - {"self"}


def rebuild_layer(layer: Any, what: str) -> Any:
    """A tf_keras layer with the same configuration as the Keras 3 ``layer`` (no weights yet)."""
    cls_name = type(layer).__name__
    module = type(layer).__module__
    target = getattr(tf_keras().layers, cls_name, None)
    if not module.startswith("keras.") or target is None:
        raise QpipeError(f"{what}: layer '{layer.name}' ({cls_name}) is a custom layer with no tf_keras "
                         "equivalent, so the Keras 3 model cannot be rebuilt for TF-MOT; use standard layers "
                         "or train in tf_keras")
    config = _plain(layer.get_config())
    accepted = _accepted(target) | _BASE_KEYS
    dropped = {k: v for k, v in config.items() if k not in accepted}
    blocking = {k: v for k, v in dropped.items() if v not in (None, False, 0, "", [], {})}
    if blocking:
        keys = ", ".join(f"{k}={v!r}" for k, v in blocking.items())
        raise QpipeError(f"{what}: layer '{layer.name}' ({cls_name}) uses Keras 3 settings tf_keras does not "
                         f"have ({keys}); the model cannot be rebuilt for TF-MOT")
    try:
        return target.from_config({k: v for k, v in config.items() if k in accepted})
    except Exception as exc:
        raise QpipeError(f"{what}: cannot rebuild layer '{layer.name}' ({cls_name}) in tf_keras: "
                         f"{type(exc).__name__}: {exc}") from exc


def rebuild_keras3(model: Any, what: str) -> Any:
    """Rebuild a Keras 3 Sequential/Functional model in tf_keras, with its weights."""
    k2 = tf_keras()
    built: dict[int, Any] = {}  # id(Keras 3 tensor) -> tf_keras tensor
    layers: dict[str, Any] = {}
    inputs = []
    for tensor in model.inputs:
        shape = tuple(tensor.shape[1:])
        name = tensor.name
        new = k2.Input(shape=shape, name=name, dtype=tensor.dtype)
        built[id(tensor)] = new
        inputs.append(new)

    def produce(tensor: Any) -> Any:
        if id(tensor) in built:
            return built[id(tensor)]
        op, node_index, tensor_index = tensor._keras_history
        node = op._inbound_nodes[node_index]
        if op.name not in layers:
            layers[op.name] = rebuild_layer(op, what)
        args = _map_tensors(node.arguments.args, produce)
        kwargs = _map_tensors(node.arguments.kwargs, produce)
        outputs = layers[op.name](*args, **kwargs)
        flat = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for original, new in zip(node.output_tensors, flat, strict=False):
            built[id(original)] = new
        return built[id(tensor)]

    outputs = [produce(t) for t in model.outputs]
    rebuilt = k2.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name)
    for name, new_layer in layers.items():
        old = model.get_layer(name)
        old_weights = old.get_weights()
        if [w.shape for w in old_weights] != [tuple(w.shape) for w in new_layer.weights]:
            raise QpipeError(f"{what}: layer '{name}' ({type(old).__name__}) has weights "
                             f"{[w.shape for w in old_weights]} in Keras 3 but "
                             f"{[tuple(w.shape) for w in new_layer.weights]} when rebuilt in tf_keras")
        new_layer.set_weights(old_weights)
    return rebuilt


def _map_tensors(structure: Any, produce: Any) -> Any:
    keras = keras3()
    if isinstance(structure, keras.KerasTensor):
        return produce(structure)
    if isinstance(structure, (list, tuple)):
        return type(structure)(_map_tensors(s, produce) for s in structure)
    if isinstance(structure, dict):
        return {k: _map_tensors(v, produce) for k, v in structure.items()}
    return structure


def check_same_outputs(original: Any, rebuilt: Any, sample: Any, what: str, tolerance: float = 1e-4,
                       label: str = "the tf_keras rebuild of the Keras 3 model") -> float:
    """Raise unless the rebuild gives the original's outputs on ``sample``; return the max difference."""
    args = sample if not isinstance(sample, dict) or len(sample) > 1 else next(iter(sample.values()))
    want = original(args, training=False)
    got = rebuilt(args, training=False)
    want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
    got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
    diff = max(float(np.max(np.abs(w - g))) for w, g in zip(want, got, strict=False))
    scale = max(1.0, max(float(np.max(np.abs(w))) for w in want))
    if not np.isfinite(diff) or diff > tolerance * scale:
        raise QpipeError(f"{what}: {label} does not reproduce the model's outputs "
                         f"(max difference {diff:.3g}); a layer behaves differently in tf_keras")
    return diff
