"""The public toolkit a third-party quantizer builds on (qpipe.keras, qpipe.tflite), on real
models: a private tf_keras copy, the loss choice, and conversion to float32/int8 .tflite."""

from __future__ import annotations

import numpy as np
import pytest

from qpipe import Dataset, QpipeError
from qpipe.conversion import predict_tflite
from qpipe.keras import choose_loss, tf_keras_copy
from qpipe.testing import synthetic_digits
from qpipe.tflite import convert_keras


@pytest.fixture(scope="module")
def data():
    x_train, y_train = synthetic_digits(300, seed=0)
    x_test, y_test = synthetic_digits(120, seed=1)
    return Dataset({"x": x_train}, y_train), Dataset({"x": x_test}, y_test)


@pytest.mark.parametrize("fixture", ["project", "keras3_project"])
def test_the_tf_keras_copy_converts_to_int8_that_agrees_with_the_float_model(request, fixture, data):
    from qpipe.schema import ModelSource
    from qpipe_keras import qpipe_load_model

    train, test = data
    project = request.getfixturevalue(fixture)
    loaded = qpipe_load_model(ModelSource(path=project.model_path.name), project.root)
    sample = train.inputs["x"][:32]
    copy = tf_keras_copy(loaded, sample, "test")
    assert copy is not loaded.model and type(copy).__module__.startswith("tf_keras")
    reference = np.asarray(loaded.model(test.inputs["x"]))
    float_tflite = predict_tflite(convert_keras(copy, "float32"), test)
    np.testing.assert_allclose(float_tflite, reference, atol=1e-4)
    int8 = convert_keras(copy, "int8", samples=train.take(range(100)), io="int8")
    predicted = predict_tflite(int8, test)
    agree = float(np.mean(predicted.argmax(1) == reference.argmax(1)))
    assert agree > 0.9, agree
    assert len(int8) < len(convert_keras(copy, "float32")) / 2
    assert choose_loss(None, loaded.model, train.labels, "test").name in (
        "sparse_categorical_crossentropy", "SparseCategoricalCrossentropy")


def test_full_integer_conversion_without_samples_says_what_to_give(project):
    from qpipe.schema import ModelSource
    from qpipe_keras import qpipe_load_model

    loaded = qpipe_load_model(ModelSource(path=project.model_path.name), project.root)
    with pytest.raises(QpipeError, match="needs calibration samples"):
        convert_keras(loaded.model, "int8")
