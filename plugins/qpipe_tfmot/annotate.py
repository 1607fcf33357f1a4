"""Wrap a tf_keras model for quantization-aware training, keeping chosen layers in float.

Layers named in ``keep_float`` (by layer name or class name) are left unannotated, which is
TF-MOT's way (``quantize_annotate_layer``) of keeping them in float. A layer TF-MOT cannot
quantize (a BatchNormalization that does not directly follow a linear convolution, an
unknown layer type) is a clear error, or with ``unsupported: float`` is kept in float too.

Integer inputs (token ids) get no fake-quant: TF-MOT puts a ``QuantizeLayer`` after every
input, which fails on int32 tensors, so those inputs are taken out of its layout transform.
``Embedding`` layers, which TF-MOT's registry leaves out, are quantized with their own
config (8-bit symmetric table, 8-bit output): the converter makes them an int8 GATHER.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from qpipe import QpipeError
from qpipe.tfenv import quiet, tf_keras

from qpipe_tfmot.fold import unfoldable_batchnorms

_UNSUPPORTED = re.compile(r"Layer (?P<name>[^:\s]+):<class '(?P<cls>[^']+)'> is not supported")


def match_layers(model: Any, patterns: list[str], what: str) -> set[str]:
    """Names of the layers matching ``patterns`` (layer names or class names); unknown ones fail."""
    names = {layer.name: type(layer).__name__ for layer in model.layers}
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n, cls in names.items() if pattern in (n, cls)}
        if not hits:
            raise QpipeError(f"{what}: keep_float: no layer is named or of type '{pattern}'; layers: "
                             + ", ".join(f"{n} ({c})" for n, c in names.items()))
        chosen |= hits
    return chosen


def quantize_model(model: Any, scheme: Any, keep_float: set[str], unsupported: str, warn: Callable[..., None],
                   what: str, config_for: Callable[[Any], Any] | None = None,
                   annotate_all: bool = True) -> tuple[Any, set[str]]:
    """The QAT model and the names of the layers left in float.

    ``config_for(layer)`` gives a custom ``QuantizeConfig`` (or None for the scheme's own);
    with ``annotate_all=False`` only layers with a custom config are annotated.
    """
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras
    config_for = _with_embeddings(config_for) if annotate_all else config_for
    scheme = _skip_inputs(scheme, integer_inputs(model))
    kept = set(keep_float)
    if annotate_all:  # TF-MOT wraps these without complaint, and the converter leaves them float
        for name in unfoldable_batchnorms(model):
            if name not in kept:
                _unsupported(name, "BatchNormalization", unsupported, warn, what)
                kept.add(name)
    for _ in range(len(model.layers) + 1):
        def annotate(layer: Any) -> Any:
            if layer.name in kept or type(layer).__name__ == "InputLayer":
                return layer
            config = config_for(layer) if config_for is not None else None
            if config is None and not annotate_all:
                return layer
            return qk.quantize_annotate_layer(layer, quantize_config=config)

        annotated = tf_keras().models.clone_model(model, clone_function=annotate)
        try:
            with quiet(), qk.quantize_scope(_custom_objects(config_for, model)):
                return qk.quantize_apply(annotated, scheme), kept
        except RuntimeError as exc:
            found = _UNSUPPORTED.search(str(exc))
            if found is None:
                raise QpipeError(f"{what}: TF-MOT cannot quantize the model: {exc}") from exc
            name, cls = found["name"], found["cls"].rsplit(".", 1)[-1]
            _unsupported(name, cls, unsupported, warn, what)
            kept.add(name)
        except ValueError as exc:
            raise QpipeError(f"{what}: TF-MOT cannot quantize the model: {str(exc).splitlines()[0]}") from exc
    raise QpipeError(f"{what}: TF-MOT could not quantize any layer of the model")


def _unsupported(name: str, cls: str, unsupported: str, warn: Callable[..., None], what: str) -> None:
    """A layer TF-MOT cannot quantize: raise (``unsupported: error``) or warn that it stays float."""
    hint = (" (TF-MOT supports BatchNormalization only directly after a Conv2D or DepthwiseConv2D without "
            "activation; qpipe folds it into a directly preceding linear Dense)") if cls.endswith("BatchNormalization") else ""
    if unsupported != "float":
        raise QpipeError(f"{what}: layer '{name}' ({cls}) cannot be quantized by TF-MOT{hint}; set "
                         f"unsupported: float to keep it in float, or list it in keep_float") from None
    warn(f"layer '{name}' ({cls}) cannot be quantized by TF-MOT{hint}; kept in float", code="kept-float")


def _custom_objects(config_for: Any, model: Any) -> dict[str, Any]:
    objects: dict[str, Any] = {}
    if config_for is None:
        return objects
    for layer in model.layers:
        config = config_for(layer)
        if config is not None:
            objects[type(config).__name__] = type(config)
    return objects


# --------------------------------------------------------------------------- integer inputs


def integer_inputs(model: Any) -> set[str]:
    """Names of the model's input layers that take integers (token ids): no fake-quant on them."""
    import numpy as np

    names = set()
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer" and np.dtype(layer.dtype).kind in "biu":
            names.add(layer.name)
    return names


def _skip_inputs(scheme: Any, names: set[str]) -> Any:
    """``scheme`` whose layout transform leaves the input layers ``names`` alone (no QuantizeLayer)."""
    if not names:
        return scheme

    class SkipInputs:
        def __init__(self, inner: Any):
            self.inner = inner

        def apply(self, model: Any, layer_quantize_map: dict) -> Any:
            kept = {k: v for k, v in layer_quantize_map.items() if k not in names}
            return self.inner.apply(model, kept)

    class IntegerInputsScheme:
        """The wrapped scheme (its registry), with the layout transform above."""

        def get_layout_transformer(self) -> Any:
            return SkipInputs(scheme.get_layout_transformer())

        def get_quantize_registry(self) -> Any:
            return scheme.get_quantize_registry()

    return IntegerInputsScheme()


_EMBEDDING_CONFIG: list[Any] = []


def embedding_config_class() -> Any:
    """A TF-MOT ``QuantizeConfig`` for ``Embedding``: 8-bit symmetric table, 8-bit output."""
    if _EMBEDDING_CONFIG:
        return _EMBEDDING_CONFIG[0]
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras

    class EmbeddingQuantizeConfig(qk.QuantizeConfig):
        def get_weights_and_quantizers(self, layer: Any) -> list:
            return [(layer.embeddings, qk.quantizers.LastValueQuantizer(
                num_bits=8, per_axis=False, symmetric=True, narrow_range=True))]

        def get_activations_and_quantizers(self, layer: Any) -> list:
            return []

        def set_quantize_weights(self, layer: Any, quantize_weights: list) -> None:
            layer.embeddings = quantize_weights[0]

        def set_quantize_activations(self, layer: Any, quantize_activations: list) -> None:
            return None

        def get_output_quantizers(self, layer: Any) -> list:
            return [qk.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                         narrow_range=False)]

        def get_config(self) -> dict:
            return {}

    _EMBEDDING_CONFIG.append(EmbeddingQuantizeConfig)
    return EmbeddingQuantizeConfig


def _with_embeddings(config_for: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """``config_for`` that also gives Embedding layers their config (TF-MOT has none)."""
    def config(layer: Any) -> Any:
        own = config_for(layer) if config_for is not None else None
        if own is None and type(layer).__name__ == "Embedding":
            return embedding_config_class()()
        return own

    return config
