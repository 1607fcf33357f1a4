"""Fold each BatchNormalization that directly follows a Dense into that Dense, before QAT.

TF-MOT folds batch norm only into a preceding Conv2D/DepthwiseConv2D. After a Dense it wraps
the BatchNormalization anyway, and the converter then leaves a float FULLY_CONNECTED with a
float32 kernel (the file is larger than the float model's). Folded first, the Dense carries
``kernel * gamma / sqrt(var + eps)`` and ``(bias - mean) * gamma / sqrt(var + eps) + beta``,
TF-MOT quantizes it like any Dense and the result is full-integer. A batch norm anywhere else
(after an activation, before any layer) is left for ``unfoldable_batchnorms`` to report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qpipe import QpipeError
from qpipe.tfenv import tf_keras

#: layers TF-MOT folds a following BatchNormalization into itself
TFMOT_FOLDS = ("Conv2D", "DepthwiseConv2D")


def _single(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def _own(model: Any, nodes: list) -> list:
    """The nodes that belong to ``model`` (a layer reused by a clone has nodes in other graphs)."""
    keys = getattr(model, "_network_nodes", None)
    if keys is None:
        return list(nodes)
    return [n for n in nodes if f"{n.layer.name}_ib-{n.layer._inbound_nodes.index(n)}" in keys]


def _producer(model: Any, bn: Any) -> Any:
    """The one layer feeding ``bn`` (None when it is called several times or on several inputs)."""
    nodes = _own(model, getattr(bn, "_inbound_nodes", []))
    if len(nodes) != 1:
        return None
    inbound = _single(nodes[0].inbound_layers)
    return None if isinstance(inbound, (list, tuple)) else inbound


def _linear(layer: Any) -> bool:
    return getattr(getattr(layer, "activation", None), "__name__", "") == "linear"


def _last_axis(model: Any, bn: Any) -> bool:
    """Whether ``bn`` normalizes the last axis of its input (the Dense's units)."""
    rank = len(_own(model, bn._inbound_nodes)[0].outputs.shape)
    return [a % rank for a in np.atleast_1d(bn.axis)] == [rank - 1]


def dense_batchnorm_pairs(model: Any) -> dict[str, str]:
    """``{batch norm name: Dense name}`` for every foldable pair: a linear Dense used once, whose
    only consumer is a BatchNormalization over its last axis."""
    pairs = {}
    for layer in model.layers:
        if type(layer).__name__ != "BatchNormalization":
            continue
        dense = _producer(model, layer)
        if (dense is not None and type(dense).__name__ == "Dense" and _linear(dense)
                and len(_own(model, dense._inbound_nodes)) == 1 and len(_own(model, dense._outbound_nodes)) == 1
                and _last_axis(model, layer)):
            pairs[layer.name] = dense.name
    return pairs


def unfoldable_batchnorms(model: Any) -> list[str]:
    """BatchNormalization layers TF-MOT cannot fold into a linear Conv2D/DepthwiseConv2D before them
    (they would stay float); call it once the Dense ones are folded."""
    out = []
    for layer in model.layers:
        if type(layer).__name__ != "BatchNormalization":
            continue
        producer = _producer(model, layer)
        if producer is None or type(producer).__name__ not in TFMOT_FOLDS or not _linear(producer):
            out.append(layer.name)
    return out


def _rename(value: Any, renames: dict[str, str]) -> Any:
    """Replace layer names in a Functional config's inbound nodes / output layers."""
    if isinstance(value, list):
        if value and isinstance(value[0], str) and value[0] in renames and len(value) >= 3:
            return [renames[value[0]], *value[1:]]
        return [_rename(v, renames) for v in value]
    return value


def folded_weights(dense: Any, bn: Any) -> list[np.ndarray]:
    """The Dense's kernel and bias with the batch norm applied."""
    weights = dense.get_weights()
    kernel = weights[0]
    bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[-1], kernel.dtype)
    values = {w.name.rsplit("/", 1)[-1].split(":", 1)[0]: w.numpy() for w in bn.weights}
    gamma = values.get("gamma", np.ones_like(bias))
    beta = values.get("beta", np.zeros_like(bias))
    scale = gamma / np.sqrt(values["moving_variance"] + bn.epsilon)
    return [(kernel * scale).astype(kernel.dtype), ((bias - values["moving_mean"]) * scale + beta).astype(bias.dtype)]


def fold_dense_batchnorm(model: Any, what: str, keep: Any = ()) -> tuple[Any, list[str]]:
    """A tf_keras copy of ``model`` with every Dense→BatchNormalization pair folded into the
    Dense, except batch norms named in ``keep``; the names of the folded batch norms (``model``
    itself when there is none)."""
    keep = set(keep)
    pairs = {bn: dense for bn, dense in dense_batchnorm_pairs(model).items()
             if bn not in keep and "BatchNormalization" not in keep}
    if not pairs:
        return model, []
    config = model.get_config()
    layers = config["layers"]
    for entry in layers:
        if entry["config"].get("name") in pairs.values():
            entry["config"]["use_bias"] = True
    config["layers"] = [e for e in layers if e["config"].get("name") not in pairs]
    if "output_layers" in config:  # Functional: whatever read a batch norm reads its Dense
        for entry in config["layers"]:
            entry["inbound_nodes"] = _rename(entry.get("inbound_nodes", []), pairs)
        config["output_layers"] = _rename(config["output_layers"], pairs)
    k2 = tf_keras()
    try:
        folded = type(model).from_config(config) if type(model) is k2.Sequential else \
            k2.Model.from_config(config)
    except Exception as exc:
        raise QpipeError(f"{what}: cannot fold BatchNormalization into Dense: {type(exc).__name__}: {exc}") from exc
    dense_to_bn = {d: b for b, d in pairs.items()}
    for layer in folded.layers:
        original = model.get_layer(layer.name)
        if layer.name in dense_to_bn:
            layer.set_weights(folded_weights(original, model.get_layer(dense_to_bn[layer.name])))
        else:
            layer.set_weights(original.get_weights())
    return folded, sorted(pairs)
