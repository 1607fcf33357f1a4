"""Binary and ternary weights for TF-MOT: a weight quantizer, its QuantizeConfig and schemes.

Weights of Conv2D, DepthwiseConv2D and Dense layers are constrained per output channel to
``{-a, +a}`` (binary, ``a`` = mean |w|) or ``{-a, 0, +a}`` (ternary: weights with
``|w| <= threshold * mean |w|`` become 0, ``a`` = mean |w| of the others), with a
straight-through gradient estimator. With ``activations: float`` only those weights are
quantized; with ``int8`` every layer also gets TF-MOT's default 8-bit activation
quantization. ``bake`` turns the trained model back into a plain float model whose kernels
hold the constrained values, ready for conversion.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from qpipe.tfenv import tensorflow, tf_keras

#: layer class -> the attribute holding its weights
WEIGHT_ATTRS = {"Conv2D": "kernel", "Dense": "kernel", "DepthwiseConv2D": "depthwise_kernel"}


def constrain(weights: Any, mode: str, threshold: float, depthwise: bool = False, ste: bool = True) -> Any:
    """Binary or ternary values per output channel; ``ste`` passes the gradient straight through."""
    tf = tensorflow()
    w = tf.convert_to_tensor(weights)
    rank = len(w.shape)
    axes = list(range(rank - 2)) if depthwise else list(range(rank - 1))
    magnitude = tf.abs(w)
    if mode == "binary":
        alpha = tf.reduce_mean(magnitude, axis=axes, keepdims=True)
        q = alpha * tf.where(w >= 0, tf.ones_like(w), -tf.ones_like(w))
    else:
        delta = threshold * tf.reduce_mean(magnitude, axis=axes, keepdims=True)
        mask = tf.cast(magnitude > delta, w.dtype)
        count = tf.maximum(tf.reduce_sum(mask, axis=axes, keepdims=True), 1.0)
        alpha = tf.reduce_sum(magnitude * mask, axis=axes, keepdims=True) / count
        q = alpha * tf.sign(w) * mask
    return w + tf.stop_gradient(q - w) if ste else q


def _classes() -> tuple[type, type, type, type]:
    """The TF-MOT-derived classes, defined on first use (TF-MOT imports TensorFlow)."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as registry_mod,
    )
    from tensorflow_model_optimization.python.core.quantization.keras.quantize_layout_transform import (
        QuantizeLayoutTransform,
    )

    class LowBitWeightQuantizer(qk.quantizers.Quantizer):
        """Constrains a weight tensor to binary or ternary values (straight-through gradient)."""

        def __init__(self, mode: str = "ternary", threshold: float = 0.7, depthwise: bool = False):
            self.mode, self.threshold, self.depthwise = mode, threshold, depthwise

        def build(self, tensor_shape: Any, name: str, layer: Any) -> dict:
            return {}

        def __call__(self, inputs: Any, training: Any, weights: Any, **kwargs: Any) -> Any:
            return constrain(inputs, self.mode, self.threshold, self.depthwise)

        def get_config(self) -> dict:
            return {"mode": self.mode, "threshold": self.threshold, "depthwise": self.depthwise}

        def __eq__(self, other: Any) -> bool:
            return isinstance(other, LowBitWeightQuantizer) and self.get_config() == other.get_config()

        def __ne__(self, other: Any) -> bool:
            return not self.__eq__(other)

    class LowBitWeightsConfig(qk.QuantizeConfig):
        """Quantize only the layer's weights (float activations)."""

        def __init__(self, attr: str = "kernel", mode: str = "ternary", threshold: float = 0.7):
            self.attr, self.mode, self.threshold = attr, mode, threshold
            self.quantizer = LowBitWeightQuantizer(mode, threshold, attr == "depthwise_kernel")

        def get_weights_and_quantizers(self, layer: Any) -> list:
            return [(getattr(layer, self.attr), self.quantizer)]

        def get_activations_and_quantizers(self, layer: Any) -> list:
            return []

        def set_quantize_weights(self, layer: Any, quantize_weights: list) -> None:
            setattr(layer, self.attr, quantize_weights[0])

        def set_quantize_activations(self, layer: Any, quantize_activations: list) -> None:
            pass

        def get_output_quantizers(self, layer: Any) -> list:
            return []

        def get_config(self) -> dict:
            return {"attr": self.attr, "mode": self.mode, "threshold": self.threshold}

    class LowBitRegistry(registry_mod.Default8BitQuantizeRegistry):
        """TF-MOT's 8-bit registry with binary/ternary weight quantizers for Conv and Dense."""

        def __init__(self, mode: str, threshold: float):
            super().__init__()
            self.mode, self.threshold = mode, threshold

        def get_quantize_config(self, layer: Any) -> Any:
            config = super().get_quantize_config(layer)
            attr = WEIGHT_ATTRS.get(type(layer).__name__)
            if attr is not None and hasattr(config, "weight_quantizer"):
                config = copy.copy(config)
                config.weight_quantizer = LowBitWeightQuantizer(self.mode, self.threshold,
                                                                attr == "depthwise_kernel")
            return config

    class LowBitScheme(qk.default_8bit.Default8BitQuantizeScheme):
        """int8 activations (TF-MOT's defaults), binary/ternary weights."""

        def __init__(self, mode: str, threshold: float):
            super().__init__()
            self.mode, self.threshold = mode, threshold

        def get_quantize_registry(self) -> Any:
            return LowBitRegistry(self.mode, self.threshold)

    class WeightsOnlyScheme(qk.QuantizeScheme):
        """Only the annotated layers' weights: no layout rewrites, no activation quantization."""

        def get_layout_transformer(self) -> Any:
            class Identity(QuantizeLayoutTransform):
                def apply(self, model: Any, layer_quantize_map: dict) -> tuple:
                    return model, layer_quantize_map

            return Identity()

        def get_quantize_registry(self) -> Any:
            class Nothing(qk.QuantizeRegistry):
                def supports(self, layer: Any) -> bool:
                    return False

                def get_quantize_config(self, layer: Any) -> Any:
                    return None

            return Nothing()

    _CACHE = (LowBitWeightQuantizer, LowBitWeightsConfig, LowBitScheme, WeightsOnlyScheme)
    return _CACHE


_CACHE: tuple | None = None


def scheme_and_configs(mode: str, threshold: float, activations: str) -> tuple[Any, Any, bool]:
    """(TF-MOT scheme, ``config_for(layer)``, annotate_all) for ``quantize_model``."""
    _, config_cls, lowbit_scheme, weights_only = _classes()
    if activations == "int8":
        return lowbit_scheme(mode, threshold), None, True

    def config_for(layer: Any) -> Any:
        attr = WEIGHT_ATTRS.get(type(layer).__name__)
        return None if attr is None else config_cls(attr, mode, threshold)

    return weights_only(), config_for, False


def lowbit_layers(base: Any, kept: set[str]) -> list[str]:
    """Names of the layers whose weights are made binary/ternary."""
    return [layer.name for layer in base.layers if type(layer).__name__ in WEIGHT_ATTRS and layer.name not in kept]


def bake(base: Any, trained: Any, layers: list[str], mode: str, threshold: float) -> Any:
    """A float tf_keras copy of ``base`` with ``trained``'s weights, ``layers`` constrained exactly."""
    k2 = tf_keras()
    twin = k2.models.clone_model(base)
    names = {layer.name for layer in twin.layers}
    for layer in trained.layers:
        inner = getattr(layer, "layer", layer)  # a QuantizeWrapper holds the original layer
        if inner.name not in names or not layer.weights:
            continue
        # the wrapper's variables hold the trained weights (it swaps the inner layer's kernel
        # attribute for its quantized tensor), next to its quantizer state: match by short name
        by_name = {_short(v.name): v for v in layer.weights}
        target = twin.get_layer(inner.name)
        target.set_weights([by_name[_short(v.name)].numpy() for v in target.weights])
    for name in layers:
        layer = twin.get_layer(name)
        attr = WEIGHT_ATTRS[type(layer).__name__]
        variable = getattr(layer, attr)
        values = constrain(variable, mode, threshold, attr == "depthwise_kernel", ste=False)
        variable.assign(np.asarray(values, dtype=np.float32))
    return twin


def _short(name: str) -> str:
    """'quant_dense/dense/kernel:0' -> 'kernel'."""
    return name.rsplit("/", 1)[-1].split(":", 1)[0]
