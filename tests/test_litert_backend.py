"""The litert backend: batching, quantized I/O, multi-input models, threads."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from qpipe.conversion import dequantize_array, quantize_array
from qpipe.data import Dataset
from qpipe.testing import run_pipeline_file, synthetic_digits
from qpipe_litert import LiteRTBackend


def test_quantize_dequantize_round_trip():
    detail = {"dtype": np.int8, "quantization": (0.5, -3)}
    values = np.array([-10.0, 0.0, 1.2, 50.0, 100.0], dtype=np.float32)
    q = quantize_array(values, detail)
    assert q.dtype == np.int8
    assert q.tolist() == [-23, -3, -1, 97, 127]  # 100/0.5-3 = 197 clips to 127
    assert dequantize_array(q, detail).tolist() == [-10.0, 0.0, 1.0, 50.0, 65.0]


@pytest.fixture(scope="module")
def tflites(tmp_path_factory, _tiny_session):
    from qpipe.testing import plugin_manager

    root = tmp_path_factory.mktemp("backend")
    project = _tiny_session.copy_to(root)
    path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8", "options": {"io": "int8"}},
                                   {"name": "keras", "quantizer": "keras.original"}])
    results = run_pipeline_file(path, plugin_manager(), output=root / "out")
    assert all(v.status == "ok" for v in results.variants), [v.error for v in results.variants]
    return root / "out", results


def _backend(**options):
    return LiteRTBackend(LiteRTBackend.Options(**options))


def test_batched_prediction_equals_per_sample(tflites):
    out, _ = tflites
    from qpipe import Artifact

    x, _ = synthetic_digits(37, seed=5)
    data = Dataset(inputs={"image": x})
    runner = _backend(threads=1).load(Artifact(out / "float32.tflite"), None)
    batched = runner.predict(data, batch_size=16)  # 16, 16, 5: resized twice
    single = np.concatenate([runner.predict_batch({"image": x[i:i + 1]}) for i in range(len(x))])
    assert batched.shape == (37, 4)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_int8_io_is_transparent(tflites):
    out, results = tflites
    from qpipe import Artifact

    x, _ = synthetic_digits(64, seed=7)
    data = Dataset(inputs={"image": x})
    floats = _backend().load(Artifact(out / "float32.tflite"), None).predict(data, 64)
    ints = _backend().load(Artifact(out / "int8.tflite"), None).predict(data, 64)
    assert ints.dtype == np.float32  # dequantized from int8 outputs
    assert np.abs(ints - floats).max() < 0.1  # softmax probabilities
    assert np.mean(ints.argmax(1) == floats.argmax(1)) > 0.95
    assert results.variant("int8").metrics["top1_agreement"] > 0.95


def test_keras_reference_matches_float32_tflite(tflites):
    _, results = tflites
    keras = results.variant("keras").metrics
    assert keras["max_abs_error"] < 1e-4  # against the float32 baseline
    assert keras["accuracy"] == results.variant("float32").metrics["accuracy"]


def test_threads_option_builds_a_new_interpreter(tflites):
    out, _ = tflites
    from qpipe import Artifact

    runner = _backend(threads=1).load(Artifact(out / "float32.tflite"), None)
    assert runner.with_threads(1) is runner
    two = runner.with_threads(2)
    assert two is not runner and two.threads == 2
    x, _ = synthetic_digits(4, seed=1)
    np.testing.assert_allclose(two.predict_batch({"image": x}), runner.predict_batch({"image": x}), atol=1e-6)


def test_multi_input_keras3_model_through_all_quantizers(tmp_path, pm):
    from qpipe.tfenv import keras3

    keras = keras3()
    keras.utils.set_random_seed(0)
    img = keras.Input((6,), name="img")
    meta = keras.Input((3,), name="meta")
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([img, meta]))
    model = keras.Model([img, meta], keras.layers.Dense(2, activation="softmax")(hidden))
    model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    a = rng.random((300, 6)).astype("float32")
    b = rng.random((300, 3)).astype("float32")
    y = (a[:, 0] + b[:, 0] > 1).astype("int64")
    model.fit([a, b], y, epochs=30, verbose=0)
    model.save(tmp_path / "two.keras")
    np.savez(tmp_path / "two.npz", first=a, second=b, y=y)
    pipeline = {
        "name": "two-inputs",
        "model": {"path": "two.keras"},
        "data": {"evaluation": {"path": "two.npz", "inputs": {"img": "first", "meta": "second"}, "labels": "y"},
                 "calibration": {"path": "two.npz", "inputs": {"img": "first", "meta": "second"}}},
        "variants": [{"name": "float32", "quantizer": "tflite.float32"},
                     {"name": "keras", "quantizer": "keras.original"},
                     {"name": "int8", "quantizer": "tflite.int8"},
                     {"name": "int16x8", "quantizer": "tflite.int16x8"}],
        "tracking": False,
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    results = run_pipeline_file(tmp_path / "p.yaml", pm)
    assert {v.name: v.status for v in results.variants} == {n: "ok" for n in ("float32", "keras", "int8", "int16x8")}, \
        [v.error for v in results.variants]
    assert results.variant("keras").metrics["max_abs_error"] < 1e-4
    assert results.variant("int8").metrics["top1_agreement"] > 0.9
