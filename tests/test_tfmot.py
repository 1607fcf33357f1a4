"""TF-MOT training quantizers on the tiny model: QAT int8, ternary and binary weights in 2/4 bits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import qpipe
from qpipe.testing import TinyProject, plugin_manager, run_pipeline_file

pytestmark = pytest.mark.slow

TRAINING = {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}


def data_sections(training: bool = True) -> dict:
    sections = {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
                "calibration": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}}
    if training:
        sections["training"] = TRAINING
    return sections


class MetricsLog:
    """A tracker-like plugin recording every per-epoch metrics call."""

    def __init__(self):
        self.calls: list[tuple[str, dict, int | None]] = []

    @qpipe.hookimpl
    def qpipe_variant_metrics(self, variant, metrics, step):
        self.calls.append((variant, dict(metrics), step))


def copy_project(source: TinyProject, root) -> TinyProject:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(source.model_path, root / "model.keras")
    shutil.copy(source.data_path, root / "data.npz")
    return TinyProject(root, root / "model.keras", root / "data.npz")


@pytest.fixture(scope="module")
def last_dense(_tiny_session) -> str:
    """The tiny model's output layer's name (Keras numbers layers per process: not always dense_1)."""
    from qpipe.tfenv import tf_keras

    model = tf_keras().models.load_model(_tiny_session.model_path, compile=False)
    return [layer.name for layer in model.layers if type(layer).__name__ == "Dense"][-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _tiny_session, last_dense):
    """One run of every training variant on the tiny tf_keras model."""
    project = copy_project(_tiny_session, tmp_path_factory.mktemp("tfmot"))
    log = MetricsLog()
    path = project.write_pipeline([
        {"name": "int8", "quantizer": "tflite.int8"},
        {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 2, "learning_rate": 1e-4}},
        {"name": "qat_per_tensor", "quantizer": "tfmot.qat",
         "options": {"epochs": 1, "per_channel": False, "io": "float32"}},
        {"name": "qat_keep_dense", "quantizer": "tfmot.qat", "options": {"epochs": 1, "keep_float": [last_dense]}},
        {"name": "ternary", "quantizer": "tfmot.ternary", "options": {"epochs": 4}},
        {"name": "binary", "quantizer": "tfmot.binary", "options": {"epochs": 4}},
        {"name": "ternary_int8", "quantizer": "tfmot.ternary", "options": {"epochs": 4, "activations": "int8"}},
    ], data=data_sections(), evaluators=["accuracy", "fidelity", "size", "storage"])
    results = run_pipeline_file(path, plugin_manager(log, entry_points=["tfmot"]), output=project.root / "out")
    return project.root / "out", results, log


def test_training_variants_succeed_and_stay_accurate(trained):
    _, results, _ = trained
    assert {v.name: v.error for v in results.variants if v.status != "ok"} == {}
    base = results.variant("float32").metrics["accuracy"]
    assert results.variant("qat").metrics["accuracy"] >= base - 0.03
    assert results.variant("ternary").metrics["accuracy"] >= base - 0.10
    assert results.variant("binary").metrics["accuracy"] >= base - 0.15


def test_ternary_with_int8_activations_is_calibrated_and_accurate(trained):
    """int8 activations are calibrated on training samples (global min/max, shared with tflite)."""
    from ai_edge_litert.interpreter import Interpreter

    out, results, _ = trained
    base = results.variant("float32").metrics["accuracy"]
    v = results.variant("ternary_int8")
    assert v.status == "ok" and v.metrics["accuracy"] >= base - 0.10, v.error
    tensors = Interpreter(model_path=str(out / v.artifact)).get_input_details()
    assert tensors[0]["dtype"] == np.int8 and tensors[0]["quantization"][0] > 0  # calibrated int8 activations


def test_qat_is_full_integer_and_records_training(trained):
    out, results, log = trained
    qat = results.variant("qat")
    assert qat.metrics["float_ops"] == 0 and qat.metrics["bits_per_weight"] == 8
    history = qat.metadata["training"]["history"]
    assert len(history["loss"]) == 2 and qat.metadata["training"]["loss_source"] == "compile config"
    assert qat.metrics["train_loss"] == history["loss"][-1]
    steps = [(step, m["train_loss"]) for variant, m, step in log.calls if variant == "qat"]
    assert [s for s, _ in steps] == [1, 2] and steps[-1][1] == pytest.approx(history["loss"][-1], rel=1e-4)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(out / qat.artifact))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8


def test_float_ops_are_reported(trained, last_dense):
    _, results, _ = trained
    kept = results.variant("qat_keep_dense")
    assert kept.metadata["kept_float"] == [last_dense]
    assert kept.metrics["float_ops"] >= 1
    assert any("FULLY_CONNECTED" in op for op in kept.metadata["float_ops"])
    assert not [w for w in kept.warnings if w["code"] == "float-ops"]  # kept in float on purpose
    per_tensor = results.variant("qat_per_tensor")  # TF-MOT #1131: per-tensor Conv+BN stays float
    assert per_tensor.metrics["float_ops"] >= 1
    assert any(op.startswith("CONV_2D") for op in per_tensor.metadata["float_ops"])
    float_ops = [w["message"] for w in per_tensor.warnings if w["code"] == "float-ops"]
    assert float_ops and "CONV_2D" in float_ops[0]  # not asked for: a named warning


def _channels(values: np.ndarray) -> list[np.ndarray]:
    """Stored weights by output channel (TFLite keeps the output channel first)."""
    return [values[i].ravel() for i in range(values.shape[0])]


@pytest.mark.parametrize("name,most", [("ternary", 3), ("binary", 2)])
def test_low_bit_weights_take_few_values_per_channel(trained, name, most):
    from qpipe_litert.inspect import TFLiteModel

    out, results, _ = trained
    model = TFLiteModel(out / results.variant(name).artifact)
    weights = model.weights()
    assert {w.op: w.dtype for w in weights} == {"CONV_2D": "INT4", "FULLY_CONNECTED": "INT2"}
    for w in weights:
        for channel in _channels(model.weight_values(w.tensor)):
            assert len(np.unique(channel)) <= most, (w.tensor, np.unique(channel))
    variant = results.variant(name)
    assert variant.metrics["bits_per_weight"] < 3
    assert variant.metrics["size_bytes"] < results.variant("int8").metrics["size_bytes"] * 0.7
    assert {w["op"] for w in variant.metadata["wider_weights"]} == {"CONV_2D"}


def test_two_bit_storage_reproduces_the_trained_ternary_model(tmp_path, _tiny_session):
    """Train a ternary model, bake it, store it in 2/4 bits: the .tflite gives the same outputs."""
    from ai_edge_litert.interpreter import Interpreter

    from qpipe.tfenv import tf_keras
    from qpipe.testing import synthetic_digits
    from qpipe_tfmot import lowbit
    from qpipe_tfmot.annotate import quantize_model
    from qpipe_tfmot.storage import convert_float, store_low_bit

    base = tf_keras().models.load_model(_tiny_session.model_path)
    scheme, config_for, annotate_all = lowbit.scheme_and_configs("ternary", 0.7, "float")
    qat, _ = quantize_model(base, scheme, set(), "error", print, "test", config_for, annotate_all)
    x, y = synthetic_digits(200, seed=0)
    qat.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, verbose=0)
    layers = lowbit.lowbit_layers(base, set())
    twin = lowbit.bake(base, qat, layers, "ternary", 0.7)
    np.testing.assert_allclose(twin.predict(x, verbose=0), qat.predict(x, verbose=0), atol=1e-5)
    flatbuffer, bits = store_low_bit(convert_float(twin), layers, "float")
    assert bits == {"CONV_2D": 4, "FULLY_CONNECTED": 2}
    interpreter = Interpreter(model_content=flatbuffer)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    want = twin.predict(x, verbose=0)
    # dynamic-range kernels quantize activations at run time: close, not bit-exact
    assert np.abs(got - want).max() < 0.05
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.98


def test_keras3_model_goes_through_qat(keras3_project):
    path = keras3_project.write_pipeline(
        [{"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1}}],
        data=data_sections(), evaluators=["accuracy", "storage"])
    results = run_pipeline_file(path, plugin_manager(entry_points=["tfmot"]))
    qat = results.variant("qat")
    assert qat.status == "ok", qat.error
    assert qat.metadata["rebuilt_from_keras3"] is True
    assert qat.metrics["accuracy"] >= results.variant("float32").metrics["accuracy"] - 0.05
    assert qat.metrics["float_ops"] == 0
