"""engine: auto on a depthwise-separable model, fallback's plain int8, latency spread and the cache."""

from __future__ import annotations

import pytest

from qpipe.testing import make_tiny_project, run_pipeline_file, synthetic_digits, tiny_project
from qpipe.tfenv import tf_keras

FIDELITY = ["accuracy", "fidelity", "size"]


def depthwise_model():
    """A tiny MobileNet-style net: conv stem, depthwise 3x3, pointwise 1x1, each with BatchNorm."""
    keras = tf_keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        layers.Input((8, 8, 1), name="image"),
        layers.Conv2D(8, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU(6.0),
        layers.DepthwiseConv2D(3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU(6.0),
        layers.Conv2D(16, 1, use_bias=False), layers.BatchNormalization(), layers.ReLU(6.0),
        layers.GlobalAveragePooling2D(),
        layers.Dense(4, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    x, y = synthetic_digits(600, seed=0)
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def depthwise(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("depthwise"), model=depthwise_model())


def test_auto_keeps_the_engine_closer_to_float_on_a_depthwise_model(depthwise):
    variants = [{"name": f"{kind}-{engine}", "quantizer": f"tflite.{kind}", "options": {"engine": engine}}
                for kind in ("int8", "dynamic") for engine in ("auto", "converter", "ai-edge-quantizer")]
    # evaluated on the data auto's comparison drew its (calibration) samples from
    data = {"evaluation": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"},
            "calibration": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}}
    out = depthwise.root / "auto"
    results = run_pipeline_file(depthwise.write_pipeline(variants, data=data, evaluators=FIDELITY, cache=False,
                                                         calibrator={"name": "sample", "options": {"count": 200}}),
                                output=out)
    v = {r.name: r for r in results.variants}
    assert all(r.status == "ok" for r in results.variants), [r.error for r in results.variants]

    auto = v["int8-auto"]
    errors = auto.metadata["engine_errors"]
    chosen = auto.metadata["engine"]
    other = "converter" if chosen == "ai-edge-quantizer" else "ai-edge-quantizer"
    assert errors[chosen if chosen != "tflite-converter" else "converter"] <= errors[other] * (1 + 1e-3)  # TIE
    assert "both engines quantized it" in auto.metadata["engine_reason"]
    twin = v["int8-converter"] if chosen == "tflite-converter" else v["int8-ai-edge-quantizer"]
    assert (out / auto.artifact).read_bytes() == (out / twin.artifact).read_bytes()
    conv = v["int8-converter"].metrics["mean_abs_error"]
    assert auto.metrics["mean_abs_error"] <= conv * 1.01 + 1e-7

    # dynamic: the converter, whose error was lower on every benchmarked model
    dyn = v["dynamic-auto"]
    assert dyn.metadata["engine"] == "tflite-converter" and "dynamic-range error" in dyn.metadata["engine_reason"]
    assert dyn.metrics["mean_abs_error"] <= v["dynamic-ai-edge-quantizer"].metrics["mean_abs_error"]
    assert v["int8-converter"].metadata["engine_reason"] == "engine: converter in the pipeline"


def test_fallback_starts_from_the_plain_int8_variant(depthwise):
    variants = [{"name": "int8", "quantizer": "tflite.int8"},
                {"name": "fixed", "quantizer": "tflite.int8",
                 "options": {"fallback": "auto", "fallback_max_layers": 1}}]
    # an accuracy gain no int8 model makes: plain int8 misses, one layer is kept in float
    results = run_pipeline_file(depthwise.write_pipeline(variants, evaluators=FIDELITY, cache=False,
                                                         constraints=["accuracy_delta >= 0.5"]),
                                output=depthwise.root / "fallback")
    int8, fixed = results.variant("int8"), results.variant("fixed")
    plain = fixed.metadata["fallback"]["plain_int8"]
    assert plain["engine"] == int8.metadata["engine"]
    for metric in ("accuracy", "mean_abs_error", "size_bytes"):
        assert plain["metrics"][metric] == int8.metrics[metric]
    assert len(fixed.metadata["fallback"]["float_layers"]) == 1
    assert fixed.metadata["engine"] == "tflite-converter"
    assert "fallback kept 1 layer(s) in float" in fixed.metadata["engine_reason"]


def test_latency_reports_its_spread_and_is_remeasured_on_a_cache_hit(tmp_path):
    project = tiny_project(tmp_path)
    evaluators = ["accuracy", {"name": "latency", "options": {"runs": 12, "rounds": 4, "warmup": 1}}]
    pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}], evaluators=evaluators)
    first = run_pipeline_file(pipeline, output=tmp_path / "one")
    for v in first.variants:
        assert v.metrics["latency_spread"] >= 0 and v.metrics["latency_noisy"] in (0.0, 1.0)
        assert v.metadata["latency"]["runs"] == 12 and v.metadata["latency"]["rounds"] == 4
        assert "remeasured" not in v.metadata
    assert "measured in this run for 2 of 2" in (tmp_path / "one" / "summary.md").read_text()

    second = run_pipeline_file(pipeline, output=tmp_path / "two")
    for old, new in zip(first.variants, second.variants, strict=False):
        assert new.metadata["cache"] == "hit"
        assert "latency_ms_p50" in new.metadata["remeasured"]
        assert new.metrics["accuracy"] == old.metrics["accuracy"]  # the artifact's metrics are replayed
        assert new.metadata["latency"]["measured"] >= old.metadata["latency"]["measured"]
        assert new.metrics["latency_ms_p50"] != old.metrics["latency_ms_p50"]  # timed again
    summary = (tmp_path / "two" / "summary.md").read_text()
    assert "re-measured after a cache hit: float32, int8" in summary


def test_a_spread_over_the_limit_is_flagged(tmp_path):
    project = tiny_project(tmp_path)
    evaluators = [{"name": "latency", "options": {"runs": 10, "warmup": 0, "max_spread": 1e-12}}]
    results = run_pipeline_file(project.write_pipeline([], evaluators=evaluators, cache=False),
                                output=tmp_path / "out")
    base = results.variants[0]
    assert base.metrics["latency_noisy"] == 1.0 and base.metadata["latency"]["noisy"] is True
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "too noisy to rank" in summary and "float32" in summary


def test_output_error_is_zero_for_the_same_model_and_small_for_int8(depthwise):
    from qpipe.conversion import output_error
    from qpipe.data import Dataset
    from qpipe.tfenv import tensorflow

    tf = tensorflow()
    model = tf_keras().models.load_model(depthwise.model_path)
    float_bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    x, _ = synthetic_digits(40, seed=3)
    data = Dataset(inputs={"image": x})
    errors = output_error(float_bytes, {"same": float_bytes}, data)
    assert errors == {"same": 0.0}
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(len(x)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    int8 = converter.convert()  # int8 input and output: quantized in, dequantized out
    assert 0 < output_error(float_bytes, {"int8": int8}, data, limit=10)["int8"] < 0.2
