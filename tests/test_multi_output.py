"""Every output of a multi-output model is measured: labels and tasks per output, metrics named
``<output>/<metric>``, fidelity for every output, selection over them, and deltas in their units.

The model: scikit-learn's wine data, a species softmax head and a regression head predicting a
feature (the colour intensity, dropped from the inputs), built in both head orders. Every check
compares qpipe's numbers with a direct LiteRT evaluation of the variant's .tflite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from qpipe.errors import QpipeError
from qpipe.testing import run_pipeline_file

VARIANTS = [{"name": "float32", "quantizer": "tflite.float32"},
            {"name": "dynamic", "quantizer": "tflite.dynamic"},
            {"name": "float16", "quantizer": "tflite.float16"},
            {"name": "int8", "quantizer": "tflite.int8"}]


def wine_data() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_wine

    wine = load_wine()
    x = wine.data.astype(np.float32)
    target = x[:, 9].copy()  # colour intensity: the regression head's target
    x = np.delete(x, 9, axis=1)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    order = np.random.default_rng(0).permutation(len(x))
    x, species, target = x[order], wine.target[order].astype(np.int64), target[order]
    return {"x_train": x[:120], "x_test": x[120:], "species_train": species[:120], "species_test": species[120:],
            "quality_train": target[:120], "quality_test": target[120:]}


def build(order: str, flavor: str = "tf_keras") -> object:
    """A compiled, trained two-head Keras model; ``order`` "cls" or "reg" puts that head first."""
    from qpipe.tfenv import keras3, tf_keras

    k2 = tf_keras() if flavor == "tf_keras" else keras3()
    k2.utils.set_random_seed(0)
    data = wine_data()
    inp = k2.Input((12,), name="features")
    hidden = k2.layers.Dense(24, activation="relu")(inp)
    species = k2.layers.Dense(3, activation="softmax", name="species")(hidden)
    quality = k2.layers.Dense(1, name="quality")(k2.layers.Dense(16, activation="relu")(hidden))
    model = k2.Model(inp, [species, quality] if order == "cls" else [quality, species])
    model.compile(optimizer=k2.optimizers.Adam(0.01),
                  loss={"species": "sparse_categorical_crossentropy", "quality": "mse"})
    model.fit(data["x_train"], {"species": data["species_train"], "quality": data["quality_train"]},
              epochs=60, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module", params=[("cls", "tf_keras"), ("reg", "keras3")], ids=["cls-first-tf_keras",
                                                                                   "reg-first-keras3"])
def project(request, tmp_path_factory) -> Path:
    order, flavor = request.param
    root = tmp_path_factory.mktemp(f"wine-{order}-{flavor}")
    build(order, flavor).save(root / "model.keras")
    np.savez(root / "data.npz", **wine_data())
    return root


def write(root: Path, name: str, variants=VARIANTS, labels=None, **extra) -> Path:
    labels = labels if labels is not None else {"species": "species_test", "quality": "quality_test"}
    config = {"name": "wine", "model": {"path": "model.keras"},
              "data": {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": labels},
                       "calibration": {"path": "data.npz", "inputs": "x_train"}},
              "calibrator": {"name": "sample", "options": {"count": 60}},
              "variants": variants, "evaluators": ["accuracy", "regression", "fidelity", "size"],
              "baseline": "float32", "tracking": False, "cache": False, **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def direct(tflite: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of a .tflite on ``x``, by signature name, dequantized: the test's own evaluation."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite))
    runner = interpreter.get_signature_runner("serving_default")
    (name, detail), = runner.get_input_details().items()
    values = x
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        values = np.clip(np.rint(x / scale + zero), -128, 127).astype(detail["dtype"])
    out = runner(**{name: values})
    details = runner.get_output_details()
    result = {}
    for key, array in out.items():
        scale, zero = details[key]["quantization"]
        result[key] = (array.astype(np.float32) - zero) * scale if scale else array.astype(np.float32)
    return result


def by_head(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(species scores, quality values) among a .tflite's outputs, told apart by width."""
    species = next(v for v in outputs.values() if v.shape[-1] == 3)
    quality = next(v for v in outputs.values() if v.shape[-1] == 1)
    return species, quality.reshape(-1)


def test_every_output_is_measured_and_matches_a_direct_evaluation(project):
    results = run_pipeline_file(write(project, "all"))
    data = np.load(project / "data.npz")
    x, species, quality = data["x_test"], data["species_test"], data["quality_test"]
    assert results.tasks["species"]["name"] == "classification"
    assert results.tasks["quality"]["name"] == "regression"
    base = by_head(direct(project / "out" / "float32.tflite", x))
    for v in results.variants:
        assert v.status == "ok", v.error
        scores, values = by_head(direct(project / "out" / v.artifact, x))
        assert v.metrics["species/accuracy"] == pytest.approx(np.mean(scores.argmax(1) == species), abs=1e-9)
        assert v.metrics["quality/mae"] == pytest.approx(np.mean(np.abs(values - quality)), rel=1e-5)
        assert v.metrics["quality/max_abs_error"] == pytest.approx(np.max(np.abs(values - base[1])), rel=1e-4, abs=1e-6)
        assert v.metrics["species/top1_agreement"] == pytest.approx(np.mean(scores.argmax(1) == base[0].argmax(1)))
        assert "accuracy" not in v.metrics and "mae" not in v.metrics  # no unnamed metric of one head
        assert "size_bytes" in v.metrics  # costs once, unprefixed
    int8 = results.variant("int8")
    assert int8.metrics["quality/mae_delta"] == pytest.approx(
        int8.metrics["quality/mae"] - results.variant("float32").metrics["quality/mae"], abs=1e-9)
    shown = [h["metric"] for h in results.headline]
    assert {"species/accuracy", "quality/mae", "quality/rmse", "size_bytes"} <= set(shown)


def test_constraint_on_one_outputs_metric_is_honoured(project):
    path = write(project, "constrained", constraints=["quality/mae_delta <= 0.0"],
                 objective={"maximize": "size_ratio"})
    results = run_pipeline_file(path)
    chosen = results.selected["variant"]
    assert chosen is not None
    assert results.variant(chosen).metrics["quality/mae_delta"] <= 0.0
    for name, why in results.selected["rejected"].items():
        if name != "float32":
            assert "quality/mae_delta" in why
            assert results.variant(name).metrics["quality/mae_delta"] > 0.0


def test_a_variant_that_wrecks_an_unconstrained_head_is_not_selected(project):
    """Only the species head is constrained; ternary weights keep its accuracy but not the
    quality head's error: the implied guard (select.output_tolerance) rejects it."""
    if "keras3" in project.name:  # there ternary weights happen to help the quality head: nothing to guard
        pytest.skip("the wrecked head is measured on the tf_keras model")
    variants = [VARIANTS[0], VARIANTS[3], {"name": "ternary", "quantizer": "tfmot.ternary", "options": {"epochs": 2}}]
    training = {"path": "data.npz", "inputs": "x_train",
                "labels": {"species": "species_train", "quality": "quality_train"}}
    path = write(project, "guard", variants=variants, constraints=["accuracy_delta >= -0.02"],
                 objective={"maximize": "size_ratio"})
    config = yaml.safe_load(path.read_text())
    config["data"]["training"] = training
    path.write_text(yaml.safe_dump(config))
    results = run_pipeline_file(path)
    ternary = results.variant("ternary")
    assert ternary.status == "ok", ternary.error  # trained with a loss per output from the compile config
    assert "compile config" in ternary.metadata["training"]["loss_source"]
    base = results.variant("float32").metrics["quality/mae"]
    assert ternary.metrics["species/accuracy_delta"] >= -0.02  # the constrained head is fine
    assert ternary.metrics["quality/mae_delta"] > 0.05 * base  # the other head is not
    assert results.selected["variant"] != "ternary"
    assert "quality/mae_delta" in results.selected["rejected"]["ternary"]
    assert any("quality/mae_delta" in c for c in results.selected["implied"])


def test_an_unlabelled_output_gets_a_warning_and_fidelity(project):
    from qpipe.config import load_config, resolve
    from qpipe.pipeline import run_pipeline
    from qpipe.registry import Registry
    from qpipe.testing import plugin_manager

    variants = [*VARIANTS[:2], {"name": "original", "quantizer": "keras.original"}]  # and the Keras backend
    path = write(project, "unlabelled", variants=variants, labels={"species": "species_test"})
    pm = plugin_manager()
    results, warnings = run_pipeline(pm, resolve(load_config(path), Registry.from_plugins(pm)),
                                     project / "out-unlabelled", {"no_tracking": True})
    assert any("quality" in w and "without labels" in w for w in warnings)
    assert results.extra["unlabelled_outputs"] == ["quality"]
    dynamic = results.variant("dynamic")
    assert "species/accuracy" in dynamic.metrics and "quality/mae" not in dynamic.metrics
    assert "quality/mean_abs_error" in dynamic.metrics and "quality/r2" in dynamic.metrics
    original = results.variant("original")  # the Keras model itself, every output
    assert original.status == "ok", original.error
    assert original.metrics["species/accuracy"] == results.variant("float32").metrics["species/accuracy"]
    assert original.metrics["quality/max_abs_error"] < 1e-3


def test_wrong_output_names_are_one_line_naming_the_outputs(project):
    with pytest.raises(QpipeError) as caught:
        run_pipeline_file(write(project, "badlabel", variants=VARIANTS[:1],
                                labels={"species": "species_test", "qualty": "quality_test"}))
    message = str(caught.value)
    assert "qualty" in message and "species" in message and "quality" in message and "\n" not in message
    with pytest.raises(QpipeError, match="say which output"):
        run_pipeline_file(write(project, "onelabel", variants=VARIANTS[:1], labels="species_test"))
    with pytest.raises(QpipeError) as caught:
        run_pipeline_file(write(project, "badconstraint", variants=VARIANTS[:1], constraints=["qualty/mae_delta <= 0"]))
    assert "qualty/mae_delta" in str(caught.value) and "species, quality" in str(caught.value).replace("quality, species", "species, quality")


def test_a_cached_rerun_restores_every_output(project):
    path = write(project, "cached", variants=VARIANTS[:2], cache={"dir": str(project / "cache")})
    first = run_pipeline_file(path)
    second = run_pipeline_file(path)
    for a, b in zip(first.variants, second.variants, strict=True):
        assert b.metadata["cache"] == "hit"
        assert {k: v for k, v in a.metrics.items() if k != "cache_hit"} == \
               {k: v for k, v in b.metrics.items() if k != "cache_hit"}


def test_deltas_are_printed_in_their_unit(project):
    from qpipe.report import delta_text, summary_markdown

    results = run_pipeline_file(write(project, "units", variants=[VARIANTS[0], VARIANTS[3]]))
    table = summary_markdown(results)
    header = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    row = [c.strip() for c in next(line for line in table.splitlines() if line.startswith("| int8")).strip("|").split("|")]
    cells = dict(zip(header, row, strict=True))
    int8 = results.variant("int8").metrics
    assert cells["Δ species/accuracy"].endswith(" pt")
    mae = cells["Δ quality/mae"]
    assert "pt" not in mae and mae.startswith(f"{int8['quality/mae_delta']:+.4f}") and "%" in mae
    assert delta_text(0.279 - 0.162, 0.279) == "+0.1170 (+72%)"  # a GRU's MAE 0.162 -> 0.279
