"""QAT on models that used to break silently: a regression MLP with targets in the hundreds, and
Dense followed by BatchNormalization."""

from __future__ import annotations

import numpy as np
import pytest

from qpipe import Artifact, Dataset
from qpipe.testing import make_tiny_project, plugin_manager, run_pipeline_file

pytestmark = pytest.mark.slow


def _diabetes_project(root):
    """scikit-learn's diabetes data (targets 25-346) and a small Keras 3 MLP trained on it."""
    from sklearn.datasets import load_diabetes

    from qpipe.tfenv import keras3

    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = y.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:331], order[331:]
    keras = keras3()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((10,), name="x"), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    model.fit(x[train], y[train], epochs=30, batch_size=32, verbose=0)
    root.mkdir(parents=True, exist_ok=True)
    model.save(root / "model.keras")
    np.savez(root / "data.npz", x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])
    return root


def _predict(path, x):
    from qpipe_litert import LiteRTBackend

    runner = LiteRTBackend().load(Artifact(path))
    try:
        return runner.predict(Dataset(inputs={"x": x}), 256)[:, 0]
    finally:
        runner.close()


def test_qat_on_regression_stays_within_ten_percent_of_float_mae(tmp_path):
    import yaml

    root = _diabetes_project(tmp_path / "diabetes")
    section = {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}
    pipeline = {"name": "diabetes", "model": {"path": "model.keras"},
                "data": {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
                         "training": section},
                "variants": [{"name": "float32", "quantizer": "tflite.float32"},
                             {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 3}}],
                "evaluators": ["size"], "tracking": False, "cache": False}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    results = run_pipeline_file(root / "pipeline.yaml", plugin_manager(entry_points=["tfmot"]))
    qat = results.variant("qat")
    assert qat.status == "ok" and qat.warnings == [], (qat.error, qat.warnings)
    assert qat.metadata["range_calibration"]["ranges"] >= 3
    data = np.load(root / "data.npz")
    x, y = data["x_test"], data["y_test"]
    out = root / "out"
    float_pred, qat_pred = _predict(out / "float32.tflite", x), _predict(out / qat.artifact, x)
    float_mae, qat_mae = np.abs(float_pred - y).mean(), np.abs(qat_pred - y).mean()
    assert qat_mae <= 1.1 * float_mae, (qat_mae, float_mae)
    assert qat_pred.std() > 0.5 * float_pred.std()  # not clamped to a constant


def test_dense_batchnorm_is_folded_into_a_full_integer_model(tmp_path):
    from qpipe.tfenv import keras3
    from qpipe.testing import synthetic_digits

    keras = keras3()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([layers.Input((8, 8, 1), name="image"), layers.Flatten(), layers.Dense(32),
                              layers.BatchNormalization(name="bn"), layers.ReLU(),
                              layers.Dense(4, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(*synthetic_digits(600, 0), epochs=3, verbose=0)
    project = make_tiny_project(tmp_path, model=model)
    training = {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}
    path = project.write_pipeline([
        {"name": "int8", "quantizer": "tflite.int8"},
        {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1}},
        {"name": "ternary", "quantizer": "tfmot.ternary", "options": {"epochs": 1}},
    ], evaluators=["accuracy", "size", "storage"], strict=True,
        data={**project.pipeline_dict([])["data"], "training": training})
    results = run_pipeline_file(path, plugin_manager(entry_points=["tfmot"]))
    assert {v.name: (v.status, v.error) for v in results.variants if v.status != "ok"} == {}
    qat, int8 = results.variant("qat"), results.variant("int8")
    assert qat.metadata["folded_batchnorm"] == ["bn"]
    assert qat.metrics["float_ops"] == 0 and qat.metrics["bits_per_weight"] == 8
    assert qat.metrics["size_bytes"] <= int8.metrics["size_bytes"]
    assert qat.metrics["accuracy"] >= results.variant("float32").metrics["accuracy"] - 0.05
    ternary = results.variant("ternary")
    assert ternary.metrics["bits_per_weight"] <= 4 and ternary.warnings == []


def test_a_regressor_with_integral_targets_trains_with_mse():
    """scikit-learn's diabetes targets are whole numbers stored as floats: still a regression."""
    from qpipe.tfenv import tf_keras
    from qpipe.keras.loss import infer_loss

    k2 = tf_keras()
    regressor = k2.Sequential([k2.layers.Input((10,)), k2.layers.Dense(1)])
    assert infer_loss(regressor, np.array([25.0, 151.0, 346.0, 75.0])) == "mse"
    assert infer_loss(regressor, np.array([0.0, 1.0, 1.0, 0.0])) is None  # logits or 0/1 targets: ask
