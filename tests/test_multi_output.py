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


def build(order: str) -> object:
    """A compiled, trained two-head tf_keras model; ``order`` "cls" or "reg" puts that head first."""
    from qpipe.tfenv import tf_keras

    k2 = tf_keras()
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


@pytest.fixture(scope="module", params=["cls", "reg"])
def project(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"wine-{request.param}")
    build(request.param).save(root / "model.keras")
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
