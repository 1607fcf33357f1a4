"""The task (classification, binary, regression): inferred or declared, and what follows from it:
the evaluators that run, the headline metrics of the summary, charts and MLflow parent, and
fidelity measures that mean something for the output's shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from qpipe import ConfigError, DataError, EvalContext
from qpipe.config import load_config, resolve
from qpipe.registry import Registry
from qpipe.task import infer_task, output_width
from qpipe.testing import plugin_manager, run_pipeline_file


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("width, labels, task", [
    (10, np.array([0, 3, 9, 2]), "classification"),  # integer class ids
    (3, np.eye(3)[[0, 2, 1, 1]], "classification"),  # one-hot rows
    (1, np.array([0, 1, 1, 0]), "binary"),  # one sigmoid unit, 0/1 labels
    (1, np.array([[0.0], [1.0], [1.0]]), "binary"),
    (1, np.array([151.0, 75.0, 141.0]), "regression"),  # integer-valued targets (load_diabetes)
    (1, np.array([0.25, 1.5, -3.0]), "regression"),  # non-integer targets
    (2, np.array([[0.5, 1.0], [2.0, 0.0]]), "regression"),  # two targets per sample
    (None, np.array([0, 1, 2]), "classification"),
])
def test_the_task_is_inferred_from_outputs_and_labels(width, labels, task):
    assert infer_task(width, labels).name == task


def test_unknown_without_labels_and_refused_when_labels_do_not_fit():
    assert infer_task(10, None).name is None
    with pytest.raises(DataError, match=r"labels from 0 to 12 do not index the model's 10 outputs.*'task:'"):
        infer_task(10, np.array([0, 12]))
    assert output_width((None, 4, 3)) == 12 and output_width((None,)) == 1 and output_width((None, None)) is None


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


BASE = ("name: x\nmodel: {path: m.keras}\ndata: {evaluation: {path: d.npz}}\n"
        "variants: [{name: a, quantizer: tflite.float32}, {name: b, quantizer: tflite.dynamic}]\n")


def check(tmp_path, text):
    return resolve(load_config(write(tmp_path, text)), Registry.from_plugins(plugin_manager()))


def test_task_key_is_checked_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"p.yaml:5: task: unknown task 'regresion' \(did you mean 'regression'\?\)"):
        load_config(write(tmp_path, BASE + "task: regresion\n"))
    assert check(tmp_path, BASE + "task: regression\n").config.task == "regression"


def test_an_evaluator_for_another_task_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluators\[0\]: evaluator 'accuracy' measures classification or "
                                          r"binary models, but this model's task is regression \(set by 'task:'"):
        check(tmp_path, BASE + "task: regression\nevaluators: [accuracy, size]\n")
    with pytest.raises(ConfigError, match=r"constraints\[0\]: no evaluator measures 'accuracy_delta' for the "
                                          r"task regression.*measure: .*mae"):
        check(tmp_path, BASE + "task: regression\nconstraints: [accuracy_delta >= -0.01]\n")


# --------------------------------------------------------------------------- a regression model


def diabetes_project(root: Path) -> Path:
    """A small MLP trained on scikit-learn's diabetes data (targets 25..346) and its data."""
    from sklearn.datasets import load_diabetes

    from qpipe.tfenv import tf_keras

    keras = tf_keras()
    keras.utils.set_random_seed(0)
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = y.astype(np.float32)
    model = keras.Sequential([keras.layers.Input((10,), name="features"), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x[:350], y[:350], epochs=120, batch_size=32, verbose=0)
    root.mkdir(parents=True, exist_ok=True)
    model.save(root / "model.keras")
    np.savez(root / "data.npz", x_train=x[:350], y_train=y[:350], x_test=x[350:], y_test=y[350:])
    return root


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> Path:
    return diabetes_project(tmp_path_factory.mktemp("diabetes"))


def diabetes_pipeline(project: Path, folder: Path, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.keras", "data.npz"):
        (folder / name).write_bytes((project / name).read_bytes())
    config = {"name": "diabetes", "model": {"path": "model.keras"},
              "data": {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
                       "calibration": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}},
              "variants": [{"name": "float32", "quantizer": "tflite.float32"},
                           {"name": "dynamic", "quantizer": "tflite.dynamic"},
                           {"name": "int8", "quantizer": "tflite.int8"}],
              "tracking": False, "cache": False, **sections}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_regression_pipeline_reports_mae_and_rmse_everywhere(diabetes, tmp_path, capsys):
    from qpipe_mlflow.testing import parent_runs

    from qpipe.display import print_summary
    from qpipe.report import quality_chart_data

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = diabetes_pipeline(diabetes, tmp_path / "run", constraints=["mae_delta <= 5"],  # default evaluators
                             tracking={"uri": uri, "log_models": False})
    pm = plugin_manager(entry_points=["mlflow"])
    results = run_pipeline_file(path, pm, output=tmp_path / "out", settings={"tracking_uri": uri})
    assert results.task["name"] == "regression" and results.task["source"] == "inferred"
    assert [h["metric"] for h in results.headline if h["role"] == "quality"] == ["mae", "rmse"]
    for v in results.variants:
        assert v.status == "ok", v.error
        assert 20 < v.metrics["mae"] < 80 and v.metrics["rmse"] >= v.metrics["mae"]
        assert not any(k.startswith("accuracy") or k.startswith("cosine") for k in v.metrics)
    assert results.selected["variant"] in ("dynamic", "int8")  # never the baseline

    print_summary(results)
    terminal = capsys.readouterr().out
    assert "mae" in terminal and "rmse" in terminal and "accuracy" not in terminal
    md = (tmp_path / "out" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    assert "| mae | Δ mae | rmse | Δ rmse |" in header and "accuracy" not in md
    assert "Pareto front (mae against size, lower is better)" in md
    csv_header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"mae", "rmse", "mae_delta"} <= set(csv_header) and not any("accuracy" in c for c in csv_header)
    chart = quality_chart_data(results)
    assert chart["metric"] == "mae" and chart["lower_is_better"] is True
    best = min(chart["points"], key=lambda p: p[2])  # the lowest MAE is never dominated
    assert best[0] in chart["front"]
    assert (tmp_path / "out" / "quality_vs_size.png").is_file()

    (parent,) = parent_runs(uri, "diabetes")
    assert parent.data.tags["qpipe.task"] == "regression"
    assert parent.data.tags["qpipe.headline"].startswith("mae, rmse")
    chosen = results.variant(results.selected["variant"])
    assert parent.data.metrics["selected.mae"] == pytest.approx(chosen.metrics["mae"])
    assert not any("accuracy" in key for key in parent.data.metrics)


def test_accuracy_listed_for_a_regression_model_fails_before_any_variant(diabetes, tmp_path):
    path = diabetes_pipeline(diabetes, tmp_path / "run", evaluators=["accuracy", "size"])
    with pytest.raises(ConfigError, match=r"evaluator 'accuracy' measures .* but this model's task is regression "
                                          r"\(inferred: one output and integer targets.*set 'task:'"):
        run_pipeline_file(path, output=tmp_path / "out")
    assert not (tmp_path / "out" / "int8.tflite").exists()


def test_fidelity_of_a_constant_output_is_not_perfect(diabetes):
    """A variant that predicts one value for every sample (what a clamped output gives) agrees
    with nothing: R² about 0 and a relative error about 1, even though its cosine would be 1."""
    from qpipe.tfenv import tf_keras
    from qpipe_metrics import Fidelity

    model = tf_keras().models.load_model(diabetes / "model.keras")
    x = np.load(diabetes / "data.npz")["x_test"]
    baseline = model.predict(x, verbose=0)
    constant = np.full_like(baseline, baseline.mean())
    assert np.all(baseline > 0)  # single positive outputs: cosine similarity would be exactly 1
    fidelity = Fidelity()
    broken = fidelity.evaluate(EvalContext(variant="v", work_dir=Path("."), outputs=constant,
                                           baseline_outputs=baseline))
    assert abs(broken["r2"]) < 1e-6 and broken["relative_error"] == pytest.approx(1.0, rel=0.05)
    assert "cosine_similarity" not in broken and "top1_agreement" not in broken
    close = fidelity.evaluate(EvalContext(variant="v", work_dir=Path("."), outputs=baseline * 1.01,
                                          baseline_outputs=baseline))
    assert close["r2"] > 0.95 and close["relative_error"] < 0.1
