"""Bad values are errors, not meaningless numbers: NaN/Inf in any data section, float64 values
that overflow the model's float32, and class labels that are not class ids (out of range,
fractions, one-hot of the wrong width), each named with the array and its first bad index."""

from __future__ import annotations

import numpy as np
import pytest

import qpipe.datacheck
import qpipe.lazyarray
from qpipe.components import TensorInfo
from qpipe.config import load_config, resolve
from qpipe.data import Dataset, bind_to_model, load_source
from qpipe.errors import DataError
from qpipe.inputs import load_inputs
from qpipe.lazyarray import LazyArray
from qpipe.registry import Registry
from qpipe.schema import DataSource
from qpipe.testing import run_pipeline_file, run_variant

IMAGE = [TensorInfo("image", (None, 8, 8, 1), "float32")]


def rewrite(project, **arrays):
    """Replace arrays of the project's data.npz."""
    with np.load(project.data_path) as npz:
        data = {k: npz[k] for k in npz.files}
    data.update(arrays)
    np.savez(project.data_path, **data)


def inputs_of(project, pm, **data):
    path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}], **data)
    return load_inputs(pm, resolve(load_config(path), Registry.from_plugins(pm)))


def test_nan_in_evaluation_or_calibration_data_is_an_error_naming_the_array_and_index(project, pm):
    with np.load(project.data_path) as npz:
        x_test, x_train = npz["x_test"].copy(), npz["x_train"].copy()
    x_test[17, 2, 3, 0] = np.nan
    rewrite(project, x_test=x_test)
    with pytest.raises(DataError, match=r"data.evaluation: input 'image' has nan at index \(17, 2, 3, 0\); .*"
                                        r"allow_nonfinite"):
        inputs_of(project, pm)
    rewrite(project, x_test=np.nan_to_num(x_test))
    x_train[3, 0, 0, 0] = -np.inf
    rewrite(project, x_train=x_train)
    with pytest.raises(DataError, match=r"data.calibration: input 'image' has -inf at index \(3, 0, 0, 0\)"):
        inputs_of(project, pm)


def test_allow_nonfinite_turns_the_error_into_a_warning(project, pm, capsys):
    with np.load(project.data_path) as npz:
        x_test = npz["x_test"].copy()
    x_test[5, 1, 1, 0] = np.inf
    rewrite(project, x_test=x_test)
    data = {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
            "calibration": {"path": "data.npz", "inputs": "x_train"}, "allow_nonfinite": True}
    inputs = inputs_of(project, pm, data=data)
    assert np.isinf(inputs.evaluation.inputs["image"][5, 1, 1, 0])
    assert "warning: data.evaluation: input 'image' has inf at index (5, 1, 1, 0) (allowed by " \
           "data.allow_nonfinite)" in capsys.readouterr().err


def test_nan_labels_and_float64_overflow_are_errors(monkeypatch):
    monkeypatch.setattr(qpipe.datacheck, "CHECK_BLOCK", 100)  # checked in blocks of one row here
    x = np.zeros((6, 8, 8, 1))
    with pytest.raises(DataError, match=r"data.training: the label array has nan at index 4"):
        bind_to_model((x, np.array([0.1, 0.2, 0.3, 0.4, np.nan, 0.5])), IMAGE, "data.training")
    x[2, 7, 7, 0] = 1e39  # finite in float64, inf in float32
    with pytest.raises(DataError, match=r"input 'image' has 1e\+39 at index \(2, 7, 7, 0\), outside the range of "
                                        r"the model's float32"):
        bind_to_model((x, None), IMAGE, "data.evaluation")
    x[2, 7, 7, 0] = np.inf  # allowed inf is not also an overflow
    assert np.isinf(bind_to_model((x, None), IMAGE, "d", allow_nonfinite=True).inputs["image"][2, 7, 7, 0])
    two = [TensorInfo("image", (None, 8, 8, 1), "float32"), TensorInfo("meta", (None, 3), "int8")]
    meta = np.zeros((6, 3), np.int64)
    meta[4, 2] = 300  # wraps around in int8
    with pytest.raises(DataError, match=r"input 'meta' has 300 at index \(4, 2\), outside the range of the "
                                        r"model's int8 \(-128 to 127\)"):
        bind_to_model(({"image": np.zeros((6, 8, 8, 1)), "meta": meta}, None), two, "data.evaluation")
    # regression targets are floats: fine
    y = np.linspace(-3.5, 2.25, 6)
    assert np.array_equal(bind_to_model((np.zeros((6, 8, 8, 1)), y), IMAGE, "d").labels, y)


def test_streamed_arrays_are_checked_as_they_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(qpipe.lazyarray, "LAZY_MIN_BYTES", 0)
    x = np.zeros((50, 8, 8, 1), np.float64)
    x[41, 0, 5, 0] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    raw = load_source(DataSource(path="d.npz"), tmp_path, "data.evaluation")
    assert isinstance(raw[0], LazyArray)
    data = bind_to_model(raw, IMAGE, "data.evaluation")  # no full pass here
    assert isinstance(data.inputs["image"], LazyArray) and data.inputs["image"].dtype == np.float32
    assert next(data.batches(32))["image"].shape == (32, 8, 8, 1)
    with pytest.raises(DataError, match=r"data.evaluation: input 'image' has nan at index \(41, 0, 5, 0\)"):
        list(data.batches(32))


@pytest.mark.parametrize("labels, pattern", [
    (np.array([0, 1, 7, 2]), r"labels have 7 at index 2, outside \[0, 4\) for a model with 4 outputs"),
    (np.array([0, -1, 2, 3]), r"labels have -1 at index 1, outside \[0, 4\)"),
    (np.array([1.0, 243.0, 0.0, 1.0]), r"labels have 243 at index 1, outside \[0, 4\).*regression evaluator"),
    (np.array([0.0, 1.0, 2.7, 1.0]), r"labels have 2.7 at index 2, not a class id"),
    (np.array([0.0, np.nan, 2.0, 1.0]), r"labels have nan at index 1, not a class id"),
    (np.eye(3)[[0, 1, 2, 1]], r"one-hot rows of width 3, but the model has 4 outputs"),
])
def test_labels_that_are_not_class_ids_are_refused(labels, pattern):
    data = Dataset(inputs={"x": np.zeros((4, 2))}, labels=labels)
    with pytest.raises(DataError, match=pattern):
        data.class_labels(classes=4)


def test_good_class_labels_pass():
    assert Dataset({"x": np.zeros(3)}, np.array([0.0, 3.0, 1.0])).class_labels(4).tolist() == [0, 3, 1]
    assert Dataset({"x": np.zeros(3)}, np.eye(4)[[2, 0, 3]]).class_labels(4).tolist() == [2, 0, 3]
    assert Dataset({"x": np.zeros(3)}, np.array([[1], [0], [1]])).class_labels(1).tolist() == [1, 0, 1]
    assert Dataset({"x": np.zeros(3)}, np.array([5, 0, 9])).class_labels().tolist() == [5, 0, 9]  # no range known
    with pytest.raises(DataError, match="a negative class id"):
        Dataset({"x": np.zeros(3)}, np.array([5, -2, 9])).class_labels()
    with pytest.raises(DataError, match=r"outside \[0, 2\) for a model with 1 output \(a binary classifier"):
        Dataset({"x": np.zeros(3)}, np.array([151.0, 75.0, 141.0])).class_labels(1)


def test_out_of_range_labels_are_refused_before_any_variant_is_scored(project):
    with np.load(project.data_path) as npz:
        y_test = npz["y_test"].copy()
    y_test[9] = 11
    rewrite(project, y_test=y_test)
    with pytest.raises(DataError, match=r"labels have 11 at index 9, outside \[0, 4\) for a model with 4 outputs"):
        run_variant(project, "tflite.float32", evaluators=["accuracy"])
    # with 'task:' set nothing is inferred: the accuracy evaluator refuses the label, failing the variant
    path = project.write_pipeline([], name="explicit.yaml", evaluators=["accuracy"], task="classification", cache=False)
    result = run_pipeline_file(path).variant("float32")
    assert result.status == "failed" and "accuracy" not in result.metrics
    assert "labels have 11 at index 9, outside [0, 4) for a model with 4 outputs" in result.error
