"""Bad input to the training quantizers: one clear error per variant, the other variants still run."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from qpipe import QpipeError
from qpipe.testing import plugin_manager, run_pipeline_file

pytestmark = pytest.mark.slow

MODELS = '''
import os
from qpipe.tfenv import keras3, tf_keras


def conv_relu_bn():
    """Uncompiled tf_keras model: BatchNormalization after a Conv2D with an activation; tanh head."""
    k = tf_keras()
    return k.Sequential([
        k.layers.Input((8, 8, 1), name="image"),
        k.layers.Conv2D(4, 3, padding="same", activation="relu"),
        k.layers.BatchNormalization(name="bn"),
        k.layers.Flatten(),
        k.layers.Dense(4, activation="tanh"),
    ])


def dense_relu_bn():
    """tf_keras: BatchNormalization after a Dense with an activation, which nothing can fold."""
    k = tf_keras()
    return k.Sequential([
        k.layers.Input((8, 8, 1), name="image"),
        k.layers.Flatten(),
        k.layers.Dense(16, activation="relu"),
        k.layers.BatchNormalization(name="bn"),
        k.layers.Dense(4, activation="softmax"),
    ])


def subclassed():
    """A Keras 3 subclassed model (built through the functional constructor, so it has inputs)."""
    keras = keras3()

    class Net(keras.Model):
        def __init__(self):
            inputs = keras.Input((8, 8, 1), name="image")
            outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inputs))
            super().__init__(inputs, outputs)

    return Net()
'''


def data(training: bool = True) -> dict:
    sections = {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"}}
    if training:
        sections["training"] = {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}
    return sections


def run(project, variants, model=None, training=True):
    (project.root / "bad_models.py").write_text(textwrap.dedent(MODELS))
    extra = {"model": model} if model else {}
    path = project.write_pipeline(variants, data=data(training), evaluators=["accuracy"], **extra)
    return run_pipeline_file(path, plugin_manager(entry_points=["tfmot"]))


def test_training_variant_without_training_data_is_refused_before_any_work(project):
    from qpipe import ConfigError

    for quantizer in ("tfmot.qat", "tfmot.ternary", "tfmot.binary"):
        with pytest.raises(ConfigError, match=rf"data: variant 'v' \({quantizer}\) trains the model: add data.training"):
            run(project, [{"name": "v", "quantizer": quantizer}], training=False)


def test_unsupported_layer_and_uninferable_loss(project):
    results = run(project, [
        {"name": "strict", "quantizer": "tfmot.qat", "options": {"epochs": 1, "loss": "mse"}},
        {"name": "no_loss", "quantizer": "tfmot.qat", "options": {"epochs": 1, "unsupported": "float"}},
        {"name": "lenient", "quantizer": "tfmot.qat",
         "options": {"epochs": 1, "unsupported": "float", "loss": "mse", "io": "float32"}},
    ], model={"function": "bad_models:conv_relu_bn"})
    assert results.variant("float32").status == "ok"
    strict = results.variant("strict")
    assert strict.status == "failed"
    assert "'bn' (BatchNormalization) cannot be quantized" in strict.error
    assert "unsupported: float" in strict.error
    no_loss = results.variant("no_loss")
    assert no_loss.status == "failed" and "cannot infer a loss" in no_loss.error and "options.loss" in no_loss.error
    lenient = results.variant("lenient")
    assert lenient.status == "ok", lenient.error
    assert lenient.metadata["kept_float"] == ["bn"]
    assert any(w["code"] == "kept-float" and "kept in float" in w["message"] for w in lenient.warnings)


def test_a_batchnorm_nothing_can_fold_fails_or_stays_float_by_name(project):
    """TF-MOT accepts it, and the converter would leave it float: unsupported decides."""
    loss = "sparse_categorical_crossentropy"
    results = run(project, [
        {"name": "error", "quantizer": "tfmot.qat", "options": {"epochs": 1, "loss": loss}},
        {"name": "float", "quantizer": "tfmot.qat", "options": {"epochs": 1, "loss": loss, "unsupported": "float"}},
    ], model={"function": "bad_models:dense_relu_bn"})
    error = results.variant("error")
    assert error.status == "failed"
    assert "'bn' (BatchNormalization) cannot be quantized" in error.error and "unsupported: float" in error.error
    kept = results.variant("float")
    assert kept.status == "ok" and kept.metadata["kept_float"] == ["bn"]
    assert [w["code"] for w in kept.warnings] == ["kept-float"]  # its float ops are excused, not reported


def test_subclassed_keras3_model_is_named(project):
    results = run(project, [{"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1}}],
                  model={"function": "bad_models:subclassed"})
    assert results.variant("float32").status == "ok"
    qat = results.variant("qat")
    assert qat.status == "failed"
    assert "subclassed keras3 model (Net)" in qat.error and "Sequential" in qat.error


def test_custom_keras3_layer_is_named():
    from qpipe.tfenv import keras3
    from qpipe.keras.rebuild import rebuild_keras3

    keras = keras3()

    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2

    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2)(Doubler(name="doubler")(inputs)))
    with pytest.raises(QpipeError, match=r"layer 'doubler' \(Doubler\) is a custom layer"):
        rebuild_keras3(model, "tfmot.qat")


def test_keras3_functional_rebuild_reproduces_outputs():
    from qpipe.tfenv import keras3
    from qpipe.keras.rebuild import check_same_outputs, rebuild_keras3

    keras = keras3()
    inputs = keras.Input((6,), name="x")
    a = keras.layers.Dense(5, activation="relu")(inputs)
    b = keras.layers.Dense(5)(inputs)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Add()([a, b]))
    model = keras.Model(inputs, out)
    rebuilt = rebuild_keras3(model, "test")
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    assert check_same_outputs(model, rebuilt, x, "test") < 1e-5
    assert [layer.name for layer in rebuilt.layers[1:]] == [layer.name for layer in model.layers[1:]]


def test_loss_inference_rules():
    from qpipe.tfenv import tf_keras
    from qpipe.keras.loss import infer_loss

    k = tf_keras()

    def head(units, activation):
        return k.Sequential([k.layers.Input((3,)), k.layers.Dense(units, activation=activation)])

    assert infer_loss(head(4, "softmax"), np.array([0, 3, 1])) == "sparse_categorical_crossentropy"
    assert infer_loss(head(4, "softmax"), np.eye(4)[[0, 3, 1]]) == "categorical_crossentropy"
    assert infer_loss(head(1, "sigmoid"), np.array([0, 1, 1])) == "binary_crossentropy"
    assert infer_loss(head(1, None), np.array([0.5, 2.25, -1.0])) == "mse"
    logits = infer_loss(head(4, None), np.array([0, 3, 1]))
    assert type(logits).__name__ == "SparseCategoricalCrossentropy" and logits.get_config()["from_logits"]
    assert infer_loss(head(4, "tanh"), np.array([0, 3, 1])) is None
