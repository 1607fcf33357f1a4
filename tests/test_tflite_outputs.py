"""qpipe.conversion.tflite_outputs / output_error: every output of a .tflite, at a fixed or a free
batch, integer inputs kept, each output's error over its own spread."""

from __future__ import annotations

import numpy as np

from qpipe import Dataset
from qpipe.conversion import output_error, predict_tflite, relative_errors, tflite_outputs


def _two_outputs(batch):
    """A token model (int32 ids) with a softmax head and a regression head, its float .tflite
    converted from a SavedModel exported at ``batch`` (None: free)."""
    import tempfile

    from qpipe.tfenv import keras3, tensorflow

    keras, tf = keras3(), tensorflow()
    keras.utils.set_random_seed(0)
    ids = keras.layers.Input((6,), dtype="int32", name="ids")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 8)(ids))
    model = keras.Model(ids, [keras.layers.Dense(3, activation="softmax")(pooled),
                              keras.layers.Dense(1)(pooled)])
    with tempfile.TemporaryDirectory() as folder:
        model.export(folder, input_signature=[tf.TensorSpec([batch, 6], tf.int32)], verbose=False)
        return model, bytes(tf.lite.TFLiteConverter.from_saved_model(folder).convert())


def test_every_output_at_a_free_and_a_fixed_batch_with_integer_inputs():
    model, free = _two_outputs(None)
    _, fixed = _two_outputs(1)
    x = np.random.default_rng(0).integers(0, 20, size=(7, 6)).astype("int32")
    data = Dataset({"ids": x})
    expected = [np.asarray(o) for o in model(x)]
    for flatbuffer in (free, fixed):
        outputs = tflite_outputs(flatbuffer, data, batch_size=4)  # 4 + 3 (padded at batch 1: 7 runs)
        assert list(outputs) == ["output_0", "output_1"]
        for got, want in zip(outputs.values(), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
        assert predict_tflite(flatbuffer, data).shape == (7, 3)
        assert len(tflite_outputs(flatbuffer, data, limit=5)["output_1"]) == 5
    errors = relative_errors({"a": expected[0], "b": expected[1]},
                             {"a": expected[0], "b": expected[1] + expected[1].std()})
    assert errors["a"] == 0 and errors["b"] > 0.5  # the regression head, in its own spread
    assert max(output_error(free, {"same": free, "fixed": fixed}, data).values()) < 1e-5
