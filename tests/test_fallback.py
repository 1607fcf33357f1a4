"""Per-layer sensitivity, `qpipe analyze`, and `fallback: auto` on a model int8 hurts in one layer."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import yaml

from qpipe.testing import run_pipeline_file


def fragile_model(root):
    """Dense 'fragile' carries its signal in weights ~0.01 beside a weight of 100 on a
    feature that is always zero: per-channel int8 rounds the signal away, float keeps it."""
    from qpipe.tfenv import tf_keras

    keras = tf_keras()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 16)).astype("float32")
    x[:, 0] = 0.0
    y = ((x[:, 1:] @ rng.normal(size=15)) > 0).astype("int64") + 2 * ((x[:, 1] * x[:, 2]) > 0).astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((16,), name="features"),
                              keras.layers.Dense(32, activation="relu", name="fragile"),
                              keras.layers.Dense(32, activation="relu", name="mid"),
                              keras.layers.Dense(4, activation="softmax", name="head")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=40, verbose=0)
    kernel, bias = model.get_layer("fragile").get_weights()
    mid_kernel, mid_bias = model.get_layer("mid").get_weights()
    kernel, bias = kernel * 0.01, bias * 0.01  # relu(0.01 z) = 0.01 relu(z): the next layer undoes it
    kernel[0, :] = 100.0  # multiplies a feature that is always 0: no effect in float
    model.get_layer("fragile").set_weights([kernel, bias])
    model.get_layer("mid").set_weights([mid_kernel * 100.0, mid_bias])
    model.save(root / "fragile.keras")
    np.savez(root / "fragile.npz", x_train=x[:600], y_train=y[:600], x_test=x[600:], y_test=y[600:])


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    root = tmp_path_factory.mktemp("fragile")
    fragile_model(root)
    pipeline = {
        "name": "fragile",
        "model": {"path": "fragile.keras"},
        "data": {"evaluation": {"path": "fragile.npz", "inputs": "x_test", "labels": "y_test"},
                 "calibration": {"path": "fragile.npz", "inputs": "x_train", "labels": "y_train"}},
        "calibrator": {"name": "sample", "options": {"count": 100}},
        "variants": [{"name": "float32", "quantizer": "tflite.float32"},
                     {"name": "int8", "quantizer": "tflite.int8", "options": {"io": "float32"}},
                     {"name": "int8-auto", "quantizer": "tflite.int8",
                      "options": {"io": "float32", "fallback": "auto", "analyze": True}}],
        "evaluators": ["accuracy", "size", {"name": "latency", "options": {"runs": 5}}],
        "objective": {"maximize": "size_ratio"},
        "constraints": ["accuracy_delta >= -0.02"],
        "tracking": False,
    }
    (root / "fragile.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return root


@pytest.mark.slow
def test_plain_int8_fails_and_fallback_keeps_the_hurt_layer_in_float(fragile):
    results = run_pipeline_file(fragile / "fragile.yaml")
    float32, plain, auto = (results.variant(n) for n in ("float32", "int8", "int8-auto"))
    assert float32.metrics["accuracy"] > 0.9
    assert plain.metrics["accuracy_delta"] < -0.3  # int8 ruins it
    assert auto.metrics["accuracy_delta"] >= -0.02
    fallback = auto.metadata["fallback"]
    assert fallback["plain_int8"]["meets_constraints"] is False
    assert fallback["meets_constraints"] is True
    assert [layer["tensor"].split("/")[1] for layer in fallback["float_layers"]] == ["fragile"]
    assert auto.metrics["fallback_float_layers"] == 1.0
    assert auto.metrics["fallback_size_cost_bytes"] > 0  # float weights cost bytes
    assert "fallback_latency_cost_ms" in auto.metrics
    assert auto.metadata["sensitivity"][0]["tensor"].split("/")[1] == "fragile"
    out = fragile / "out"
    assert (out / "int8-auto.sensitivity.csv").is_file() and (out / "int8-auto.sensitivity.png").is_file()
    assert results.selected["variant"] == "int8-auto"
    assert "accuracy_delta" in results.selected["rejected"]["int8"]


def test_fallback_without_constraints_is_refused_before_any_work(fragile):
    from qpipe import ConfigError

    data = yaml.safe_load((fragile / "fragile.yaml").read_text())
    data.pop("constraints")
    data.pop("objective")
    data["variants"] = data["variants"][:1] + data["variants"][2:]
    (fragile / "noconstraints.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"variants\[1\].options: variant 'int8-auto' \(tflite.int8\) searches "
                                          r"until the pipeline's constraints hold, but none are declared"):
        run_pipeline_file(fragile / "noconstraints.yaml", output=fragile / "nc")
    assert not (fragile / "nc").exists()


@pytest.mark.slow
def test_analyze_command_ranks_the_hurt_layer_first(fragile):
    proc = subprocess.run([sys.executable, "-m", "qpipe.cli", "analyze", str(fragile / "fragile.yaml"),
                           "--variant", "int8", "--output", str(fragile / "analysis")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(fragile / "analysis" / "int8.sensitivity.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["tensor"].split("/")[1] == "fragile"
    assert float(rows[0]["rmse_over_scale"]) > 10 * float(rows[1]["rmse_over_scale"])
    assert (fragile / "analysis" / "int8.sensitivity.png").stat().st_size > 1000
    assert "fragile" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "qpipe.cli", "analyze", str(fragile / "fragile.yaml"),
                          "--variant", "float32"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "is not a full-integer int8 converter variant" in bad.stderr and "Traceback" not in bad.stderr
