"""Model sources (Keras 3, tf_keras, .h5, SavedModel, module:function) and data sources."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import yaml

from qpipe.data import DataError, bind_to_model, load_source
from qpipe.components import TensorInfo
from qpipe.errors import QpipeError
from qpipe.schema import DataSource
from qpipe.testing import run_pipeline_file, synthetic_digits


def run_with_model(project, pm, model_section, variants=None):
    path = project.write_pipeline(variants or [], model=model_section)
    return run_pipeline_file(path, pm)


def assert_ok(results):
    assert all(v.status == "ok" for v in results.variants), [(v.name, v.error) for v in results.variants]


def test_keras3_model_file(keras3_project, pm):
    results = run_with_model(keras3_project, pm, {"path": "model.keras"},
                             [{"name": "int8", "quantizer": "tflite.int8"}])
    assert_ok(results)
    assert results.model["flavor"] == "keras3"
    assert results.variant("int8").metrics["accuracy"] > 0.85


def test_tf_keras_h5_and_saved_model(project, pm):
    from qpipe.tfenv import tf_keras

    model = tf_keras().models.load_model(project.model_path)
    model.save(project.root / "model.h5")
    model.save(project.root / "exported")  # tf_keras SavedModel folder
    h5 = run_with_model(project, pm, {"path": "model.h5"})
    assert_ok(h5)
    assert h5.model["flavor"] == "tf_keras"
    saved = run_with_model(project, pm, {"path": "exported"}, [{"name": "keras", "quantizer": "keras.original"}])
    assert_ok(saved)
    assert saved.model["flavor"] == "saved_model"
    assert saved.variant("keras").metrics["max_abs_error"] < 1e-4
    assert saved.variant("float32").metrics["accuracy"] == h5.variant("float32").metrics["accuracy"]


def test_keras3_h5(keras3_project, pm):
    from qpipe.tfenv import keras3

    keras3().saving.load_model(keras3_project.model_path).save(keras3_project.root / "model3.h5")
    results = run_with_model(keras3_project, pm, {"path": "model3.h5"})
    assert_ok(results)
    assert results.model["flavor"] == "keras3"


def test_model_from_module_function(project, pm):
    (project.root / "make_model.py").write_text(textwrap.dedent("""
        from qpipe.testing import train_tiny_model
        def build():
            return train_tiny_model("keras3", epochs=3)
    """))
    results = run_with_model(project, pm, {"function": "make_model:build"})
    assert_ok(results)
    assert results.model["source"] == "make_model:build"


def test_missing_model_file_is_a_clear_error(project, pm):
    with pytest.raises(QpipeError, match=r"model: file not found: .*nope.keras \(paths are relative to the pipeline file\)"):
        run_with_model(project, pm, {"path": "nope.keras"})
    assert not (project.root / "out").exists()  # nothing half-written


def test_unsafe_keras3_model_needs_opt_in(tmp_path, pm, keras3_project):
    from qpipe.tfenv import keras3

    keras = keras3()
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Lambda(lambda t: t * 2.0, name="doubler"),
                              keras.layers.Dense(4, activation="softmax")])
    model.save(keras3_project.root / "lambda.keras")
    with pytest.raises(QpipeError, match="lambda.keras: refused in safe mode: layer 'doubler' is a Lambda layer.*"
                                         "safe_mode: false only if you trust"):
        run_with_model(keras3_project, pm, {"path": "lambda.keras"})
    results = run_with_model(keras3_project, pm, {"path": "lambda.keras", "safe_mode": False})
    assert results.variant("float32").status == "ok"


# --------------------------------------------------------------------------- data

IMAGE = [TensorInfo("image", (None, 8, 8, 1), "float32")]


def test_npz_rejects_pickled_arrays(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="cannot read bad.npz without unpickling"):
        load_source(DataSource(path="bad.npz", inputs="x"), tmp_path, "data.evaluation")


def test_npz_unknown_key_lists_keys(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 8, 8, 1)), y=np.zeros(2))
    with pytest.raises(DataError, match="data.evaluation: no array 'x_test'; the source has: images, y"):
        load_source(DataSource(path="d.npz", inputs="x_test"), tmp_path, "data.evaluation")


def test_shape_mismatch_names_input_and_shapes(tmp_path):
    raw = (np.zeros((5, 8, 8), np.float32), None)
    with pytest.raises(DataError, match=r"input 'image' has shape \(N, 8, 8\) but the model expects \(N, 8, 8, 1\)"):
        bind_to_model(raw, IMAGE, "data.evaluation")


def test_non_numeric_dtype_and_label_count(tmp_path):
    with pytest.raises(DataError, match="input 'image' has dtype <U1"):
        bind_to_model((np.full((2, 8, 8, 1), "a"), None), IMAGE, "data.evaluation")
    with pytest.raises(DataError, match="5 input rows but 4 labels"):
        bind_to_model((np.zeros((5, 8, 8, 1)), np.zeros(4)), IMAGE, "data.evaluation")


def test_empty_data_is_an_error():
    with pytest.raises(DataError, match=r"data.calibration: the data is empty \(0 rows\)"):
        bind_to_model((np.zeros((0, 8, 8, 1)), None), IMAGE, "data.calibration")


def test_data_functions_tuple_dict_and_tf_dataset(tmp_path):
    (tmp_path / "datafns.py").write_text(textwrap.dedent("""
        import numpy as np
        from qpipe.testing import synthetic_digits
        from qpipe.tfenv import tensorflow

        def as_tuple():
            return synthetic_digits(10)

        def as_dict():
            x, y = synthetic_digits(10)
            return {"pixels": x, "target": y}

        def as_dataset():
            x, y = synthetic_digits(10)
            return tensorflow().data.Dataset.from_tensor_slices((x, y)).batch(4)
    """))
    x_ref, y_ref = synthetic_digits(10)
    for fn, extra in (("as_tuple", {}), ("as_dict", {"inputs": "pixels", "labels": "target"}), ("as_dataset", {})):
        data = bind_to_model(load_source(DataSource(function=f"datafns:{fn}", **extra), tmp_path, "d"), IMAGE, "d")
        np.testing.assert_allclose(data.inputs["image"], x_ref)
        np.testing.assert_array_equal(data.labels, y_ref)


def test_data_shape_error_through_the_pipeline(project, pm):
    x, y = synthetic_digits(20)
    np.savez(project.root / "flat.npz", x=x.reshape(20, 64), y=y)
    path = project.write_pipeline([], data={"evaluation": {"path": "flat.npz"}})
    with pytest.raises(DataError, match=r"data.evaluation: input 'image' has shape \(N, 64\)"):
        run_pipeline_file(path, pm)


def test_relative_paths_resolve_against_the_pipeline_folder(project, pm, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = project.write_pipeline([])
    results = run_pipeline_file(path, pm)
    assert results.variant("float32").status == "ok"
    assert yaml.safe_load(path.read_text())["model"]["path"] == "model.keras"
