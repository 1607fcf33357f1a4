"""Model-centric MLflow 3 logging on a real temporary sqlite store: a LoggedModel per variant
with its params and metrics, the data as dataset inputs, final metrics at step 0 and training
curves with their steps, short grid names, an idempotent ``qpipe log``, and a registered
variant that loads and serves in an environment without qpipe."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qpipe.cli import build_app
from qpipe.testing import TinyProject, plugin_manager, run_pipeline_file
from qpipe_mlflow.testing import bare_venv, child_runs, free_port, parent_runs, sqlite_store

pytestmark = pytest.mark.slow

EXPERIMENT = "tiny-models"
STAMP = "20260102-030405"
VARIANTS = [{"name": "int8", "quantizer": "tflite.int8", "options": {"io": "int8"}},
            {"name": "grid", "quantizer": "tflite.int8", "options": {"per_channel": [True, False]}},
            {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 2}}]


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sqlite_store(tmp_path_factory.mktemp("models-store") / "mlflow.db", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tracked(_tiny_session, tmp_path_factory, store):
    """One tracked run: float32, int8 (registered), a two-point grid and a 2-epoch QAT."""
    tiny: TinyProject = _tiny_session.copy_to(tmp_path_factory.mktemp("models"))
    data = tiny.pipeline_dict([])["data"]
    data["training"] = data["calibration"]
    path = tiny.write_pipeline(VARIANTS, name="models.yaml", data=data, tracking={
        "uri": store, "experiment": EXPERIMENT, "register": {"name": "tiny-served", "variant": "int8"}})
    output = tiny.root / f"tiny-{STAMP}"
    results = run_pipeline_file(path, plugin_manager(entry_points=["mlflow"]), output=output,
                                settings={"tracking_uri": None})
    (parent,) = parent_runs(store, EXPERIMENT)
    return tiny, results, parent, child_runs(store, parent), output


def by_variant(kids):
    return {k.data.tags["qpipe.variant"]: k for k in kids.values()}


def test_the_experiment_opens_on_its_runs(tracked, store):
    parent = tracked[2]
    tags = client(store).get_experiment(parent.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_variant_is_a_logged_model_with_its_params_and_metrics(tracked, store):
    _, results, parent, kids, _ = tracked
    models = client(store).search_logged_models([parent.info.experiment_id])
    assert len(models) == len(results.variants) == 5
    variants = by_variant(kids)
    for model in models:
        name = model.tags["qpipe.variant"]
        result, child = results.variant(name), variants[name]
        assert model.source_run_id == child.info.run_id and model.name == child.info.run_name
        assert model.status.to_proto() == 2 or str(model.status).endswith("READY")
        assert model.params["quantizer"] == result.quantizer
        metrics = {m.key: m for m in model.metrics}
        for key in ("accuracy", "size_bytes", "latency_ms_p50"):
            assert metrics[key].value == pytest.approx(result.metrics[key], rel=1e-5), (name, key)
            assert metrics[key].step == 0 and metrics[key].dataset_name == "data-evaluation"
        assert metrics["size_bytes"].value == result.metrics["size_bytes"], "whole numbers exact"
        assert [o.model_id for o in child.outputs.model_outputs] == [model.model_id]


def test_data_are_dataset_inputs_with_digest_source_and_schema(tracked, store):
    tiny, results, parent, kids, _ = tracked

    def inputs(run):
        return {i.tags[0].value: i.dataset for i in client(store).get_run(run.info.run_id).inputs.dataset_inputs}

    found = inputs(parent)
    assert set(found) == {"evaluation", "calibration", "training"}
    evaluation = found["evaluation"]
    assert evaluation.name == "data-evaluation"
    assert evaluation.digest == results.data["evaluation"]["sha256"][:12]
    assert json.loads(evaluation.source)["uri"] == tiny.data_path.resolve().as_uri()
    columns = {c["name"]: c for c in json.loads(evaluation.schema)["mlflow_colspec"]}
    x_test = np.load(tiny.data_path, allow_pickle=False)["x_test"]
    assert columns["x_test"]["shape"] == list(x_test.shape) and columns["x_test"]["role"] == "input"
    assert set(columns) == {"x_test", "y_test"}
    variants = by_variant(kids)
    assert set(inputs(variants["float32"])) == {"evaluation"}
    assert set(inputs(variants["int8"])) == {"evaluation", "calibration"}
    assert set(inputs(variants["qat"])) == {"evaluation", "training"}


def test_final_metrics_at_step_0_and_training_curves_with_their_steps(tracked, store):
    _, results, _, kids, _ = tracked
    c = client(store)
    for name, child in by_variant(kids).items():
        history = c.get_metric_history(child.info.run_id, "accuracy")
        assert [m.step for m in history] == [0], name
    qat = by_variant(kids)["qat"]
    loss = c.get_metric_history(qat.info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2]
    recorded = results.variant("qat").metadata["training"]["history"]["loss"]
    assert [m.value for m in loss] == pytest.approx(recorded, abs=1e-6)  # results.json keeps 6 decimals
    assert [m.step for m in c.get_metric_history(qat.info.run_id, "train_loss")] == [0]


def test_names_and_params_read_well(tracked, store):
    _, results, parent, kids, output = tracked
    assert results.timestamp and parent.info.run_name == f"tiny-{results.timestamp}", \
        "the run's one timestamp (the one default output folders are named with), not a second one"
    grid = {k.data.tags["qpipe.variant"]: k for k in kids.values() if k.data.tags["qpipe.variant"].startswith("grid-")}
    assert sorted(grid) == ["grid-per_channel-false", "grid-per_channel-true"]
    for name, child in grid.items():
        assert child.info.run_name == name.replace("per_channel-", "pc") and len(child.info.run_name) <= 12
        assert child.data.tags["qpipe.quantizer"] == "tflite.int8"
        assert child.data.params["quantizer.per_channel"] == name.endswith("true") and "True" or "False"
    params, metrics = parent.data.params, parent.data.metrics
    assert int(params["variants"]) == len(results.variants) == metrics["variants_ok"] + metrics["variants_failed"]


def qpipe_log(output, uri):
    return CliRunner().invoke(build_app(plugin_manager(entry_points=["mlflow"])),
                              ["log", str(output), "--tracking-uri", uri])


def test_qpipe_log_is_idempotent_and_keeps_the_curves(tracked, store, tmp_path, tmp_path_factory):
    _, results, parent, _, output = tracked
    out = qpipe_log(output, store)
    assert out.exit_code == 0, out.output
    assert "already in experiment" in out.output and parent.info.run_id in out.output
    assert [p.info.run_id for p in parent_runs(store, EXPERIMENT)] == [parent.info.run_id]

    other = sqlite_store(tmp_path / "other.db", tmp_path_factory.getbasetemp())
    assert qpipe_log(output, other).exit_code == 0
    (copy,) = parent_runs(other, EXPERIMENT)
    kids = by_variant(child_runs(other, copy))
    assert sorted(kids) == sorted(v.name for v in results.variants)
    loss = client(other).get_metric_history(kids["qat"].info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2], "per-epoch history replayed from results.json"
    assert len(client(other).search_logged_models([copy.info.experiment_id])) == len(results.variants)

    out = qpipe_log(output, other)
    assert out.exit_code == 0 and "already in experiment" in out.output
    assert len(parent_runs(other, EXPERIMENT)) == 1

    client(other).delete_run(kids["int8"].info.run_id)  # an incomplete copy is replaced, not duplicated
    out = qpipe_log(output, other)
    assert out.exit_code == 0 and "already in experiment" not in out.output
    (again,) = parent_runs(other, EXPERIMENT)
    assert again.info.run_id != copy.info.run_id
    assert again.data.tags["qpipe.replayed"] == "true"
    assert client(other).get_run(copy.info.run_id).info.lifecycle_stage == "deleted"
    assert len(by_variant(child_runs(other, again))) == len(results.variants)
    assert len(client(other).search_logged_models([copy.info.experiment_id])) == len(results.variants)


NO_QPIPE = """
import importlib.util, json, sys
import numpy as np
assert importlib.util.find_spec("qpipe") is None and importlib.util.find_spec("qpipe_mlflow") is None, sys.path
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
x = np.load(sys.argv[2], allow_pickle=False)["x_test"]
requirements = open(mlflow.pyfunc.get_model_dependencies(sys.argv[1])).read()
print(json.dumps({"predictions": model.predict(x).tolist(), "signature": model.metadata.signature.to_dict(),
                  "requirements": requirements}))
"""


def test_registered_variant_loads_and_serves_without_qpipe(tracked, store, tmp_path):
    tiny, results, parent, _, output = tracked
    assert parent.data.tags["qpipe.registered_model"] == "models:/tiny-served/1"
    python = bare_venv(tmp_path / "venv")
    env = {"MLFLOW_TRACKING_URI": store, "PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([str(python), "-c", NO_QPIPE, "models:/tiny-served/1", str(tiny.data_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    predicted = np.asarray(loaded["predictions"], np.float32)
    y = np.load(tiny.data_path, allow_pickle=False)["y_test"]
    assert float(np.mean(predicted.argmax(axis=1) == y)) == pytest.approx(results.variant("int8").metrics["accuracy"])
    assert "tensor" in loaded["signature"]["inputs"] and "tensor" in loaded["signature"]["outputs"]
    requirements = loaded["requirements"].lower()
    assert "ai-edge-litert" in requirements and "numpy" in requirements and "qpipe" not in requirements

    port = free_port()
    serve = subprocess.Popen([str(python), "-m", "mlflow", "models", "serve", "-m", "models:/tiny-served/1",
                              "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
                             start_new_session=True)
    try:
        x = np.load(tiny.data_path, allow_pickle=False)["x_test"][:3]
        body = json.dumps({"inputs": x.tolist()}).encode()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and serve.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.5)
        assert answer is not None, serve.stdout.read().decode()[-3000:] if serve.poll() is not None else "no answer"
        np.testing.assert_allclose(np.asarray(answer["predictions"], np.float32), predicted[:3], rtol=1e-6)
    finally:
        import os
        import signal

        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=30)


def load_ui_check():
    """benchmarks/ui_check.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ui_check.py"
    spec = importlib.util.spec_from_file_location("ui_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ui_check"] = module
    spec.loader.exec_module(module)
    return module


def test_the_mlflow_ui_shows_runs_models_and_artifacts(tracked, store, tmp_path):
    """benchmarks/ui_check.py in headless Chromium: the runs table on arrival, every variant
    with its metrics on the Models tab, a variant's .tflite among its artifacts. Needs
    Playwright (the test extra) and Debian's chromium (`make test` installs it as root)."""
    import shutil

    check = load_ui_check()
    if not any(Path(c).is_file() for c in check.CHROMIUM) and not shutil.which("chromium"):
        pytest.fail("no Chromium: install Debian's (apt-get install -y chromium); `make test` does as root")
    output = tracked[4]
    shots = check.check(output, store)
    assert shots == output / "ui"
    for name in ("1-runs.png", "2-models.png", "3-models-chart.png", "4-artifacts.png"):
        assert (shots / name).stat().st_size > 10_000, name

    copy = tmp_path / "copy"  # a check that fails says which
    shutil.copytree(output, copy, ignore=shutil.ignore_patterns("ui"))
    data = json.loads((copy / "results.json").read_text())
    data["extra"]["mlflow"]["run_name"] = "no-such-run"
    (copy / "results.json").write_text(json.dumps(data))
    check.TIMEOUT_MS = 10_000
    with pytest.raises(check.Failed, match="does not list run no-such-run"):
        check.check(copy, store)
