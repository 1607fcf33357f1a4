"""litert.mixed (per-layer widths under a size budget or constraints) on a tiny depthwise CNN."""

from __future__ import annotations

import csv

import pytest

from qpipe.testing import make_tiny_project, plugin_manager, run_pipeline_file, synthetic_digits


def _depthwise_model():
    from qpipe.tfenv import keras3

    keras = keras3()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        layers.Input((8, 8, 1), name="image"),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.DepthwiseConv2D(3, padding="same", activation="relu"),
        layers.Conv2D(32, 1, activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(4, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = synthetic_digits(600, 0)
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    project = make_tiny_project(root, model=_depthwise_model())
    path = project.write_pipeline([
        {"name": "int8", "quantizer": "tflite.dynamic"},
        {"name": "budget", "quantizer": "litert.mixed", "options": {"budget": {"size_bytes": 60000}}},
        {"name": "roomy", "quantizer": "litert.mixed", "options": {"budget": {"size_ratio": 2.5}}},
        {"name": "constrained", "quantizer": "litert.mixed", "options": {"widths": ["int4"]}},  # + int8
        {"name": "impossible", "quantizer": "litert.mixed", "options": {"budget": {"size_ratio": 100}}},
    ], evaluators=["accuracy", "size", "storage"], constraints=["accuracy_delta >= -0.02"])
    return root / "out", run_pipeline_file(path, plugin_manager(), output=root / "out")


def _stored_bits(path):
    from qpipe_litert.inspect import TFLiteModel

    return {w.output: w.bits for w in TFLiteModel(path).weights()}


def test_budget_is_met_and_the_file_stores_the_recorded_widths(mixed_run):
    out, results = mixed_run
    assert {v.name: v.error for v in results.variants if v.status != "ok"} == {}
    budget = results.variant("budget")
    assert budget.metrics["size_bytes"] <= 60000
    assert budget.metrics["size_bytes"] < results.variant("int8").metrics["size_bytes"]
    layers = budget.metadata["layers"]
    stored = _stored_bits(out / budget.artifact)
    assert {layer["tensor"]: layer["bits"] for layer in layers} == stored  # every weight op, at its width
    assert {layer["width"] for layer in layers} & {"int2", "int4"}, "the budget forced some layers narrower"
    depthwise = [layer for layer in layers if layer["op"] == "DEPTHWISE_CONV_2D"]
    assert depthwise and all(layer["offered"] == ["int8", "float"] for layer in depthwise)
    assert all(layer["width"] != "float" or layer.get("reason") for layer in layers)
    assert budget.metrics["bits_per_weight"] == pytest.approx(budget.metadata["bits_per_weight_assigned"], abs=1e-3)
    assert 0 < budget.metrics["accuracy"] <= 1  # LiteRT ran it
    search = budget.metadata["search"]
    assert search["measured"]["size_bytes"] == budget.metrics["size_bytes"]
    assert "mixed_predicted_probe_accuracy_delta" in budget.metrics


def test_a_roomy_budget_keeps_the_most_sensitive_layers_float(mixed_run):
    out, results = mixed_run
    roomy, tight = results.variant("roomy"), results.variant("budget")
    search = roomy.metadata["search"]
    assert roomy.metrics["size_bytes"] <= search["target_bytes"] and search["meets"]
    # spare bytes are spent: the file is the largest of every trial that fit (prefix walk, then undos)
    fitting = [t["size_bytes"] for t in search["trials"] if t["size_bytes"] <= search["target_bytes"]]
    assert roomy.metrics["size_bytes"] == max(fitting)
    widths = {layer["tensor"]: layer["width"] for layer in roomy.metadata["layers"]}
    kept = [tensor for tensor, width in widths.items() if width == "float"]
    assert kept and set(widths.values()) - {"float"}, "some layers float, the rest quantized"
    stored = _stored_bits(out / roomy.artifact)
    assert all(stored[tensor] == 32 for tensor in kept)  # really float in the file
    assert all("kept in float" in layer["reason"] for layer in roomy.metadata["layers"] if layer["width"] == "float")
    assert roomy.metrics["bits_per_weight"] > tight.metrics["bits_per_weight"]


def test_constraint_search_widens_until_the_constraint_holds(mixed_run):
    _, results = mixed_run
    variant = results.variant("constrained")
    assert variant.metrics["accuracy_delta"] >= -0.02
    search = variant.metadata["search"]
    walk = [trial for trial in search["trials"] if "also" not in trial]  # one layer up a width per trial
    assert search["meets"] and walk[-1]["unmet"] == []
    assert all(trial["unmet"] for trial in walk[:-1])  # widened only while failing
    assert [t["steps"] for t in walk] == list(range(walk[0]["steps"], walk[-1]["steps"] - 1, -1))
    layers = variant.metadata["layers"]
    assert {layer["width"] for layer in layers} <= {"int4", "int8"}
    assert [layer["width"] for layer in layers if layer["op"] == "DEPTHWISE_CONV_2D"] == ["int8"]


def test_unreachable_budget_is_a_warning_not_a_silent_pass(mixed_run):
    _, results = mixed_run
    variant = results.variant("impossible")
    assert not variant.metadata["search"]["meets"]
    assert any(w["code"] == "mixed_unmet" and "not reachable" in w["message"] for w in variant.warnings)


def test_sensitivity_csv_and_a_chart_per_width(mixed_run):
    out, results = mixed_run
    with open(out / "budget.widths.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["width"] for r in rows} == {"int2", "int4", "int8"}
    depthwise = [r for r in rows if r["op"] == "DEPTHWISE_CONV_2D" and r["width"] != "int8"]
    assert depthwise and all(r["runs"] == "False" and r["note"] for r in depthwise)
    for width in ("int2", "int4", "int8"):
        assert (out / f"budget.widths.{width}.png").stat().st_size > 1000
    assert "budget.widths.csv" in results.variant("budget").metadata["files"]  # the tracker logs these


def test_mixed_without_budget_or_constraints_fails_clearly(tmp_path, project):
    path = project.write_pipeline([{"name": "mixed", "quantizer": "litert.mixed"}], evaluators=["size"])
    results = run_pipeline_file(path, plugin_manager(), output=tmp_path / "out")
    assert "needs options.budget" in results.variant("mixed").error


def test_accuracy_chart_draws_the_budget_sweep_against_the_uniform_variants(mixed_run):
    from qpipe.report import QUALITY_CHART, quality_chart_data

    out, results = mixed_run
    data = quality_chart_data(results)
    sweep = data["sweeps"]["litert.mixed"]
    assert sorted(sweep) == ["budget", "constrained", "impossible", "roomy"]
    sizes = [results.variant(name).metrics["size_bytes"] for name in sweep]
    assert sizes == sorted(sizes)
    assert set(data["sweeps"]) == {"litert.mixed"}  # one variant per uniform quantizer: no line
    assert (out / QUALITY_CHART).read_bytes().startswith(b"\x89PNG")


def test_analyze_reports_every_width_for_a_mixed_variant(mixed_run, tmp_path):
    from qpipe_tflite.analyze import analyze_variant

    out, _ = mixed_run
    rows, files = analyze_variant(plugin_manager(), out.parent / "pipeline.yaml", "budget", tmp_path / "an")
    assert {(r["op"], r["width"]) for r in rows if r["runs"]} >= {("DEPTHWISE_CONV_2D", "int8"),
                                                                 ("FULLY_CONNECTED", "int4")}
    assert all(r["bytes_saved"] > 0 for r in rows if r["runs"] and r["width"].startswith("int"))
    # static int8 weights with int8 / int16 activations, calibrated, each layer alone
    static = [r for r in rows if r["width"] in ("w8a8", "w8a16")]
    assert len(static) == 2 * len({r["layer"] for r in rows}) and all(r["runs"] for r in static)
    assert all(0 <= r["error"] < 0.1 for r in static)
    assert files["csv"].is_file() and (tmp_path / "an" / "budget.widths.int4.png").is_file()
