"""Objective and constraints, the selected variant, the CI gate's exit codes, option grids."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from qpipe.config import load_config, resolve
from qpipe.errors import ConfigError
from qpipe.registry import Registry
from qpipe.results import VariantResult
from qpipe.selection import Constraint, select


def test_constraint_parsing_and_checks():
    c = Constraint.parse("accuracy_delta >= -0.01")
    assert (c.metric, c.op, c.value) == ("accuracy_delta", ">=", -0.01)
    assert c.check({"accuracy_delta": -0.005}) is None
    assert c.check({"accuracy_delta": -0.02}) == "accuracy_delta = -0.02, needs >= -0.01"
    assert c.check({}) == "accuracy_delta was not measured"
    assert Constraint.parse("latency_ms_p50<1e-1").check({"latency_ms_p50": 0.05}) is None
    with pytest.raises(ValueError, match="must look like 'METRIC >= NUMBER'"):
        Constraint.parse("accuracy is high")


def v(name, status="ok", **metrics):
    return VariantResult(name=name, quantizer="q", status=status, metrics=metrics,
                         error=None if status == "ok" else "broke")


def test_select_best_eligible_variant():
    variants = [v("float32", accuracy_delta=0.0, size_ratio=1.0), v("int8", accuracy_delta=-0.002, size_ratio=3.6),
                v("tiny", accuracy_delta=-0.05, size_ratio=9.0), v("crashed", status="failed")]
    record = select(variants, [Constraint.parse("accuracy_delta >= -0.01")], ("maximize", "size_ratio"))
    assert record["variant"] == "int8"
    assert "maximizes size_ratio (3.6)" in record["reason"] and "accuracy_delta >= -0.01" in record["reason"]
    assert record["rejected"] == {"tiny": "accuracy_delta = -0.05, needs >= -0.01", "crashed": "failed: broke"}
    nothing = select(variants, [Constraint.parse("accuracy_delta >= 0.5")], ("maximize", "size_ratio"))
    assert nothing["variant"] is None and nothing["reason"] == "no variant meets the constraints"


def test_bad_constraint_and_objective_are_config_errors(tmp_path):
    base = "name: x\nmodel: {path: m.keras}\ndata: {evaluation: {path: d.npz}}\nvariants: [{name: a, quantizer: tflite.float32}]\n"
    (tmp_path / "p.yaml").write_text(base + "constraints: ['accuracy high']\n")
    with pytest.raises(ConfigError, match=r"p.yaml:5: constraints\[0\]: constraint 'accuracy high' must look like"):
        load_config(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(base + "objective: {maximize: size_ratio, minimize: latency_ms_p50}\n")
    with pytest.raises(ConfigError, match="objective needs exactly one of 'maximize' or 'minimize'"):
        load_config(tmp_path / "p.yaml")


def test_option_lists_expand_into_a_grid(project, pm):
    path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8",
                                    "options": {"per_channel": [True, False], "io": ["int8", "float32"]}}])
    resolved = resolve(load_config(path), Registry.from_plugins(pm))
    names = [rv.config.name for rv in resolved.variants]
    assert names == ["float32", "int8-per_channel-true-io-int8", "int8-per_channel-true-io-float32",
                     "int8-per_channel-false-io-int8", "int8-per_channel-false-io-float32"]
    last = resolved.variants[-1].quantizer.component.options
    assert (last.per_channel, last.io) == (False, "float32")
    only = resolve(load_config(path), Registry.from_plugins(pm), only=["int8-per_channel-false-io-int8"])
    assert [rv.config.name for rv in only.variants] == ["float32", "int8-per_channel-false-io-int8"]


def qpipe_run(*args):
    return subprocess.run([sys.executable, "-m", "qpipe.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_grid_selection_and_gate_exit_codes(project):
    variants = [{"name": "int8", "quantizer": "tflite.int8", "options": {"per_channel": [True, False]}},
                {"name": "dynamic", "quantizer": "tflite.dynamic"}]
    passing = project.write_pipeline(variants, name="pass.yaml", objective={"maximize": "size_ratio"},
                                     constraints=["accuracy_delta >= -0.05"], gate=True,
                                     evaluators=["accuracy", "size"])
    proc = qpipe_run(passing, "--output", project.root / "pass")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((project.root / "pass" / "results.json").read_text())
    ratios = {v["name"]: v["metrics"]["size_ratio"] for v in results["variants"]}
    eligible = {v["name"] for v in results["variants"] if v["metrics"]["accuracy_delta"] >= -0.05}
    assert results["selected"]["variant"] == max(eligible, key=ratios.get)
    assert results["gate"]["passed"] is True
    assert f"selected: {results['selected']['variant']}" in proc.stdout

    failing = project.write_pipeline(variants, name="fail.yaml", constraints=["accuracy_delta >= 0.5"],
                                     evaluators=["accuracy", "size"])
    proc = qpipe_run(failing, "--output", project.root / "fail")
    assert proc.returncode == 0, proc.stderr  # without --gate a miss is reported, not fatal
    proc = qpipe_run(failing, "--output", project.root / "fail-gated", "--gate")
    assert proc.returncode == 3, proc.stderr
    assert "error: gate: no quantized variant meets the constraints (accuracy_delta >= 0.5)" in proc.stderr
    gate = json.loads((project.root / "fail-gated" / "results.json").read_text())["gate"]
    assert gate["passed"] is False and set(gate["failures"]) == {"float32", "int8-per_channel-true",
                                                                 "int8-per_channel-false", "dynamic"}


def test_the_baseline_is_the_reference_not_a_candidate():
    variants = [v("float32", accuracy_delta=0.0, size_ratio=1.0), v("int8", accuracy_delta=-0.2, size_ratio=3.6)]
    constraints = [Constraint.parse("accuracy_delta >= -0.01")]
    record = select(variants, constraints, ("maximize", "size_ratio"), baseline="float32")
    assert record["variant"] is None and record["reason"] == "no quantized variant meets the constraints"
    assert "reference" in record["rejected"]["float32"] and "needs >= -0.01" in record["rejected"]["int8"]
    allowed = select(variants, constraints, ("maximize", "size_ratio"))  # select.allow_baseline: true
    assert allowed["variant"] == "float32"


def outlier_model(project):
    """The tiny classifier plus one hidden unit that sees every input with weight 200 and feeds
    nothing: float outputs are unchanged, but that unit stretches the layer's activation range
    to ~15,000, so a per-tensor int8 scale (~57 per step) wipes out the units that matter (< 3)."""
    from qpipe.tfenv import tf_keras

    keras = tf_keras()
    model = keras.models.load_model(project.model_path)
    layers = keras.layers
    wide = keras.Sequential([layers.Input((8, 8, 1), name="image"), layers.Conv2D(8, 3, padding="same", use_bias=False),
                             layers.BatchNormalization(), layers.ReLU(), layers.MaxPooling2D(), layers.Flatten(),
                             layers.Dense(33, activation="relu"), layers.Dense(4, activation="softmax")])
    for source, target in zip(model.layers[:5], wide.layers[:5], strict=False):
        target.set_weights(source.get_weights())
    kernel, bias = model.layers[5].get_weights()
    wide.layers[5].set_weights([np.concatenate([kernel, np.full((len(kernel), 1), 200.0, np.float32)], axis=1),
                                np.append(bias, 0.0)])
    kernel, bias = model.layers[6].get_weights()
    wide.layers[6].set_weights([np.concatenate([kernel, np.zeros((1, kernel.shape[1]), np.float32)]), bias])
    wide.save(project.root / "outlier.keras")
    return wide


@pytest.mark.slow
def test_the_gate_fails_with_exit_3_when_every_quantized_variant_misses(project):
    from typer.testing import CliRunner

    from qpipe.cli import build_app
    from qpipe.testing import plugin_manager, run_pipeline_file

    outlier_model(project)
    sections = dict(model={"path": "outlier.keras"}, constraints=["accuracy_delta >= -0.05"], gate=True,
                    evaluators=["accuracy", "size"], cache=False)
    gated = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}], name="gate.yaml", **sections)
    proc = CliRunner().invoke(build_app(plugin_manager()), ["run", str(gated), "--output", str(project.root / "gated")])
    assert proc.exit_code == 3, proc.output
    assert "error: gate: no quantized variant meets the constraints (accuracy_delta >= -0.05)" in proc.output
    results = json.loads((project.root / "gated" / "results.json").read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    assert by_name["float32"]["metrics"]["accuracy"] > 0.9  # the float model is fine ...
    assert by_name["int8"]["metrics"]["accuracy_delta"] < -0.3  # ... its int8 version is not
    assert results["gate"]["passed"] is False and "int8" in results["gate"]["failures"]
    assert results["selected"]["variant"] is None

    allowed = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}], name="allowed.yaml",
                                     select={"allow_baseline": True}, **sections)
    results = run_pipeline_file(allowed, output=project.root / "allowed")
    assert results.gate["passed"] is True and results.selected["variant"] == "float32"
