"""The ``sample`` calibrator on a real model: each sampler, statistics sharing, and bad options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qpipe import CalibrateContext, ConfigError, Dataset, QpipeError
from qpipe.config import load_config, resolve
from qpipe.registry import Registry
from qpipe.schema import ModelSource
from qpipe.testing import plugin_manager, run_pipeline_file
from qpipe_calibration import Sample, SampleOptions


@pytest.fixture(scope="module")
def loaded(_tiny_session):
    """The tiny tf_keras model as the pipeline loads it, and its calibration data."""
    pm = plugin_manager()
    model = pm.hook.qpipe_load_model(source=ModelSource(path=_tiny_session.model_path.name),
                                     base_dir=_tiny_session.root)
    with np.load(_tiny_session.data_path, allow_pickle=False) as npz:
        data = Dataset(inputs={model.inputs[0].name: npz["x_train"]}, labels=npz["y_train"])
    return model, data


def calibrate(loaded, data=None, **options):
    model, default = loaded
    ctx = CalibrateContext(variant="v", work_dir=Path("."), model=model, data=data or default)
    return Sample(SampleOptions(**options)).calibrate(ctx)


def test_first_takes_the_first_rows(loaded):
    cal = calibrate(loaded, method="first", count=25)
    assert cal.metadata["indices"] == list(range(25))
    np.testing.assert_array_equal(cal.samples.single_input(), loaded[1].single_input()[:25])
    assert cal.ranges == {} and cal.ranges_for(16) == {}  # no estimator: the converter calibrates


def test_random_is_seeded_and_distinct(loaded):
    a, b, c = (calibrate(loaded, method="random", count=40, seed=s).metadata["indices"] for s in (1, 1, 2))
    assert a == b != c
    assert len(set(a)) == 40


def test_stratified_balances_the_classes(loaded):
    cal = calibrate(loaded, method="stratified", count=40)
    counts = np.bincount(cal.samples.labels, minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]


def test_diverse_covers_the_feature_space_better_than_random(loaded):
    """k-center greedy on penultimate features: every row has a chosen row close to it."""
    model, data = loaded
    ctx = CalibrateContext(variant="v", work_dir=Path("."), model=model, data=data)
    features = Sample(SampleOptions(method="diverse")).features(ctx)
    assert features.shape == (len(data), 32)  # the Dense(32) feeding the classifier

    def radius(indices):
        d = ((features[:, None, :] - features[None, indices, :]) ** 2).sum(-1)
        return float(np.sqrt(d.min(axis=1).max()))

    diverse = calibrate(loaded, method="diverse", count=20, seed=0).metadata["indices"]
    assert diverse == calibrate(loaded, method="diverse", count=20, seed=0).metadata["indices"]
    randoms = [calibrate(loaded, method="random", count=20, seed=s).metadata["indices"] for s in range(5)]
    assert radius(diverse) < min(radius(r) for r in randoms)
    assert len(set(diverse)) == 20


def test_statistics_are_shared_across_estimators_of_one_selection(loaded):
    first = calibrate(loaded, method="first", count=30, estimator="percentile")
    second = calibrate(loaded, method="first", count=30, estimator={"name": "mse"})
    other = calibrate(loaded, method="first", count=31, estimator="mse")
    s1, s2, s3 = (c.metadata["statistics"] for c in (first, second, other))
    assert s2["reused"] and s1["key"] == s2["key"]
    assert not s3["reused"] and s3["key"] != s1["key"]
    assert first.ranges.keys() == second.ranges.keys() and len(first.ranges) >= 5
    assert first.ranges != second.ranges
    assert first.metadata["estimator"] == {"name": "percentile", "percentile": 99.99}
    # each quantizer asks for its own activation width: entropy clips at 8 bits, not at 16
    entropy = calibrate(loaded, method="first", count=30, estimator="entropy")
    assert entropy.metadata["statistics"]["reused"]
    assert entropy.ranges_for(8) == entropy.ranges
    assert entropy.ranges_for(16) != entropy.ranges


def test_count_above_the_rows_is_a_clear_error(loaded):
    with pytest.raises(QpipeError, match=r"count 700 is more than the 600 rows of data.calibration; "
                                         r"lower count to at most 600"):
        calibrate(loaded, count=700)


def test_stratified_without_labels_is_a_clear_error(loaded):
    unlabeled = Dataset(inputs=dict(loaded[1].inputs))
    with pytest.raises(QpipeError, match="method 'stratified' needs labels; add 'labels:' to data.calibration"):
        calibrate(loaded, data=unlabeled, method="stratified", count=10)


@pytest.mark.parametrize("options, message", [
    ({"count": 0}, "calibrator.options.count: count must be at least 1 (got 0)"),
    ({"method": "kmeans"}, "calibrator.options.method: Input should be 'first', 'random', 'stratified' or 'diverse'"),
    ({"count": 10, "estimator": {"percentile": 99}}, "calibrator.options.estimator: estimator needs a 'name'"),
])
def test_bad_options_fail_at_validate_time(project, options, message):
    path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}],
                                  calibrator={"name": "sample", "options": options})
    with pytest.raises(ConfigError) as info:
        resolve(load_config(path), Registry.from_plugins(plugin_manager()))
    assert message in str(info.value)


@pytest.mark.slow
def test_a_failing_calibration_fails_only_its_variant(project):
    path = project.write_pipeline([
        {"name": "too_many", "quantizer": "tflite.int8",
         "calibrator": {"name": "sample", "options": {"count": 5000}}},
        {"name": "diverse_entropy", "quantizer": "tflite.int8",
         "calibrator": {"name": "sample", "options": {"method": "diverse", "count": 40, "estimator": "entropy"}}},
    ])
    results = run_pipeline_file(path, plugin_manager())
    assert results.variant("too_many").status == "failed"
    assert "count 5000 is more than the 600 rows" in results.variant("too_many").error
    ok = results.variant("diverse_entropy")
    assert ok.status == "ok" and ok.metrics["accuracy"] > 0.9
    assert ok.metadata["calibration"]["method"] == "diverse"


@pytest.mark.slow
def test_keras3_models_get_estimated_ranges(keras3_project):
    path = keras3_project.write_pipeline([
        {"name": "int8_percentile", "quantizer": "tflite.int8",
         "calibrator": {"name": "sample", "options": {"count": 50, "estimator": "percentile"}}},
    ], evaluators=["accuracy"])
    results = run_pipeline_file(path, plugin_manager())
    v = results.variant("int8_percentile")
    assert v.status == "ok", v.error
    assert v.metadata["activation_ranges"]["tensors"] >= 5
    assert v.metrics["accuracy"] >= results.variant("float32").metrics["accuracy"] - 0.05
