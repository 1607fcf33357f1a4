"""Issue 5's acceptance test: a few extreme activation outliers in the calibration set.

The converter's min/max stretches the int8 range over the outliers, so ordinary values get
a handful of levels; percentile and MSE estimation clip them and stay close to float.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qpipe.testing import plugin_manager, run_pipeline_file, synthetic_digits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory, _tiny_session):
    root = tmp_path_factory.mktemp("outliers")
    project = _tiny_session.copy_to(root)
    x, y = synthetic_digits(200, seed=3)
    x[:2, 2:4, 2:4, 0] = 60.0  # two samples with a few pixels 60x brighter than anything else
    np.savez(root / "calib.npz", x=x, y=y)
    sample = {"method": "first", "count": 200}
    variants = [
        {"name": "int8_minmax", "quantizer": "tflite.int8"},
        {"name": "int8_percentile", "quantizer": "tflite.int8",
         "calibrator": {"name": "sample", "options": {**sample, "estimator": {"name": "percentile", "percentile": 99.9}}}},
        {"name": "int8_mse", "quantizer": "tflite.int8",
         "calibrator": {"name": "sample", "options": {**sample, "estimator": "mse"}}},
    ]
    data = {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
            "calibration": {"path": "calib.npz", "inputs": "x", "labels": "y"}}
    path = project.write_pipeline(variants, data=data, calibrator={"name": "sample", "options": sample},
                                  evaluators=["accuracy", "fidelity"])
    results = run_pipeline_file(path, plugin_manager(), output=root / "out")
    return root / "out", {v.name: v for v in results.variants}


def test_outliers_ruin_minmax_but_not_percentile_or_mse(outlier_run):
    _, outlier_run = outlier_run
    assert {name: v.status for name, v in outlier_run.items()} == {
        "float32": "ok", "int8_minmax": "ok", "int8_percentile": "ok", "int8_mse": "ok"}
    m = {name: v.metrics for name, v in outlier_run.items()}
    # percentile clips the outliers: less than half minmax's output error, and float's accuracy
    assert m["int8_percentile"]["mean_abs_error"] < 0.5 * m["int8_minmax"]["mean_abs_error"]
    assert m["int8_percentile"]["accuracy"] >= m["int8_minmax"]["accuracy"]
    assert m["int8_percentile"]["accuracy"] >= m["float32"]["accuracy"] - 0.01
    # MSE weighs a clipped outlier by its squared size, so it keeps the input range whole
    # but tightens the later ones: better than minmax, by less
    assert m["int8_mse"]["mean_abs_error"] < m["int8_minmax"]["mean_abs_error"]
    assert m["int8_mse"]["accuracy"] >= m["int8_minmax"]["accuracy"]


def test_estimated_input_range_clips_the_outliers(outlier_run):
    out, outlier_run = outlier_run
    facts = outlier_run["int8_percentile"].metadata["activation_ranges"]
    assert facts["estimator"] == "percentile" and facts["bits"] == 8 and facts["tensors"] >= 5
    ranges = json.loads((out / facts["file"]).read_text())
    image = next(name for name in ranges if name.startswith("serving_default"))
    assert ranges[image][1] == pytest.approx(1.0, abs=0.05)  # the 60.0 pixels are clipped away
    assert json.loads((out / "int8_mse.ranges.json").read_text())[image][1] == pytest.approx(60.0)
