"""MLflow tracking on a real temporary sqlite store: parent and child runs, params, metrics,
tags, artifacts, the registered pyfunc model, ``qpipe log``, ``qpipe compare``, Ctrl-C and
crashes, an unreachable server and the URI precedence. One store for the whole module."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import qpipe
from qpipe.cli import build_app
from qpipe.report import REPORT_FILES
from qpipe.results import read_results
from qpipe.testing import TinyProject, plugin_manager, run_pipeline_file
from qpipe_mlflow.testing import child_runs, parent_runs

pytestmark = pytest.mark.slow


class BrokenQuantizer(qpipe.Quantizer):
    """Always fails, like a converter that rejects the model."""

    name = "test.broken"

    def quantize(self, ctx):
        raise RuntimeError("converter exploded on op FOO")


class BrokenPlugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(BrokenQuantizer)


def tracked_pm(*plugins):
    return plugin_manager(BrokenPlugin(), *plugins, entry_points=["mlflow"])


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from qpipe_mlflow.testing import sqlite_store

    return sqlite_store(tmp_path_factory.mktemp("store") / "mlflow.db", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tiny(_tiny_session, tmp_path_factory) -> TinyProject:
    root = tmp_path_factory.mktemp("tracked")
    return _tiny_session.copy_to(root)


VARIANTS = [{"name": "dynamic", "quantizer": "tflite.dynamic"},
            {"name": "int8", "quantizer": "tflite.int8", "options": {"io": "int8", "analyze": True}},
            {"name": "broken", "quantizer": "test.broken"}]


@pytest.fixture(scope="module")
def tracked(tiny, store):
    """The same pipeline run twice against the store, int8 registered each time."""
    path = tiny.write_pipeline(VARIANTS, name="tracked.yaml", tracking={
        "uri": store, "experiment": "tiny-tracked", "register": {"name": "tiny-int8", "variant": "int8"}})
    runs = [run_pipeline_file(path, tracked_pm(), output=tiny.root / f"run-{i}", settings={"tracking_uri": None})
            for i in (1, 2)]
    return runs


def test_each_run_is_a_parent_with_one_child_per_variant(tracked, store, tiny):
    found = parent_runs(store, "tiny-tracked")
    assert len(found) == 2, "two runs, two parent runs"
    for i, (parent, results) in enumerate(zip(found, tracked, strict=False), start=1):
        assert parent.info.status == "FINISHED"
        assert parent.info.run_name == f"tiny-{results.timestamp}"  # the run's one timestamp
        assert Path(parent.data.tags["qpipe.output_dir"]) == (tiny.root / f"run-{i}").resolve()
        kids = child_runs(store, parent)
        assert sorted(kids) == sorted(v.name for v in results.variants) == ["broken", "dynamic", "float32", "int8"]
        for name, child in kids.items():
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert child.info.status == ("FAILED" if name == "broken" else "FINISHED")
        assert results.extra["mlflow"]["run_id"] == parent.info.run_id
    assert read_results(Path(found[0].data.tags["qpipe.output_dir"])).extra["mlflow"]["run_id"] == found[0].info.run_id


def test_children_carry_params_metrics_and_tags(tracked, store):
    results = tracked[0]
    kids = child_runs(store, parent_runs(store, "tiny-tracked")[0])
    keys = None
    for v in results.variants:
        child = kids[v.name]
        params, tags, metrics = child.data.params, child.data.tags, child.data.metrics
        assert params["quantizer"] == v.quantizer
        assert tags["qpipe.variant"] == v.name and tags["qpipe.quantizer"] == v.quantizer
        assert tags["qpipe.status"] == v.status and tags["qpipe.version"] == qpipe.__version__
        assert tags["qpipe.model_sha256"] == results.model["sha256"]
        assert tags["qpipe.data.evaluation_sha256"] == results.data["evaluation"]["sha256"]
        if v.status != "ok":
            continue
        assert params["backend"] == "litert"
        assert params["backend.threads"] == str(v.backend["options"]["threads"])
        assert params["backend.batch_size"] == str(v.backend["options"]["batch_size"])
        for key, value in v.metrics.items():
            if key.startswith("cache_hit"):  # a tag in MLflow, not a metric to chart
                assert key not in metrics and tags["qpipe.cache"] == v.metadata["cache"]
                continue
            assert metrics[key] == pytest.approx(value, rel=1e-5), key  # 6 significant digits
        keys = set(v.metrics) if keys is None else keys
        assert set(v.metrics) == keys, "the same metric keys on every child"
    int8 = kids["int8"].data.params
    assert int8["quantizer.io"] == "int8" and int8["calibrator"] == "sample" and int8["calibrator.count"] == "50"
    assert int8["engine"] == results.variant("int8").metadata["engine"]
    assert kids["dynamic"].data.params["engine"] == "tflite-converter"
    assert kids["int8"].data.tags["qpipe.engine_reason"] == results.variant("int8").metadata["engine_reason"]
    files = {f.path for f in client(store).list_artifacts(kids["int8"].info.run_id)}
    assert {"int8.sensitivity.csv", "int8.sensitivity.png"} <= files  # reports the quantizer wrote
    assert kids["dynamic"].data.params["calibrator"] == "none"


def test_a_failed_variant_is_a_failed_child_with_its_error(tracked, store):
    broken = child_runs(store, parent_runs(store, "tiny-tracked")[0])["broken"]
    assert broken.info.status == "FAILED"
    assert broken.data.tags["qpipe.status"] == "failed"
    assert "converter exploded on op FOO" in broken.data.tags["qpipe.error"]
    files = {f.path for f in client(store).list_artifacts(broken.info.run_id)}
    assert files == {"result.json", "traceback.txt"}


def test_artifacts_of_children_and_parent(tracked, store, tmp_path):
    results = tracked[0]
    parent = parent_runs(store, "tiny-tracked")[0]
    out = Path(parent.data.tags["qpipe.output_dir"])
    c = client(store)
    for name in ("float32", "int8"):
        child = child_runs(store, parent)[name]
        files = {f.path for f in c.list_artifacts(child.info.run_id)}
        assert {f"{name}.tflite", "result.json"} <= files
        local = c.download_artifacts(child.info.run_id, f"{name}.tflite", str(tmp_path))
        assert sha256(local) == sha256(out / results.variant(name).artifact) == child.data.tags["qpipe.artifact_sha256"]
    files = {f.path for f in c.list_artifacts(parent.info.run_id)}
    assert {"pipeline.yaml", "results.json", *REPORT_FILES} <= files
    assert Path(c.download_artifacts(parent.info.run_id, "pipeline.yaml", str(tmp_path))).read_text() == \
        (out / "pipeline.yaml").read_text()
    tags = parent.data.tags
    assert tags["qpipe.version"] == qpipe.__version__
    assert tags["qpipe.tensorflow_version"].startswith("2.") and tags["qpipe.litert_version"]
    assert parent.data.metrics == {"variants_ok": 3.0, "variants_failed": 1.0}
    # local sqlite store: artifacts beside the database, never in the working directory
    assert c.get_experiment(parent.info.experiment_id).artifact_location.startswith(
        Path(store[len("sqlite:///"):]).parent.as_uri())
    assert not (Path.cwd() / "mlruns").exists() and not (Path.cwd() / "mlartifacts").exists()


def test_registered_variant_predicts_like_the_litert_backend(tracked, store, tiny, monkeypatch):
    import mlflow.pyfunc

    from qpipe import Artifact
    from qpipe.registry import Registry

    versions = client(store).search_model_versions("name = 'tiny-int8'")
    assert sorted(int(v.version) for v in versions) == [1, 2], "registered once per run"
    int8 = tracked[0].variant("int8")
    parent = parent_runs(store, "tiny-tracked")[0]
    assert parent.data.tags["qpipe.registered_model"] == "models:/tiny-int8/1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model = mlflow.pyfunc.load_model("models:/tiny-int8/1")
    x = np.load(tiny.data_path, allow_pickle=False)["x_test"]
    y = np.load(tiny.data_path, allow_pickle=False)["y_test"]
    predicted = model.predict(x)

    entry = Registry.from_plugins(plugin_manager()).get("backend", "litert")
    backend = entry.cls(entry.cls.Options.model_validate(int8.backend["options"]))
    runner = backend.load(Artifact(Path(parent.data.tags["qpipe.output_dir"]) / int8.artifact, "tflite"), None)
    expected = runner.predict(qpipe.Dataset(inputs={"image": x}), backend.batch_size)
    np.testing.assert_array_equal(predicted, expected)
    assert float(np.mean(predicted.argmax(axis=1) == y)) == pytest.approx(int8.metrics["accuracy"])


def test_compare_prints_the_latest_or_the_given_run(tracked, store):
    first, second = parent_runs(store, "tiny-tracked")
    app = build_app(tracked_pm())
    out = CliRunner().invoke(app, ["compare", "--experiment", "tiny-tracked", "--tracking-uri", store])
    assert out.exit_code == 0, out.output
    assert second.info.run_id in out.output and first.info.run_id not in out.output
    for name in ("float32", "dynamic", "int8", "broken"):
        assert name in out.output
    assert "converter exploded" in out.output
    assert "Δ accuracy" in out.output and "ratio" in out.output  # the headline columns, as in qpipe run
    out = CliRunner().invoke(app, ["compare", "--run", first.info.run_id, "--tracking-uri", store, "--json"])
    assert out.exit_code == 0, out.output
    import json

    data = json.loads(out.output)
    assert data["run_id"] == first.info.run_id
    assert {v["name"]: v["metrics"].get("accuracy") for v in data["variants"]}["int8"] == pytest.approx(
        tracked[0].variant("int8").metrics["accuracy"])
    out = CliRunner().invoke(app, ["compare", "--experiment", "nope", "--tracking-uri", store])
    assert out.exit_code == 2 and "no MLflow experiment 'nope'" in out.output and "tiny-tracked" in out.output


@pytest.mark.parametrize("damage", ["not_sqlite", "truncated", "headline_tag"])
def test_compare_on_a_damaged_store_or_tag_is_one_line_naming_it(tracked, store, tmp_path, damage):
    import shutil

    db = tmp_path / "copy.db"
    shutil.copy(store[len("sqlite:///"):], db)
    uri = f"sqlite:///{db}"
    if damage == "not_sqlite":
        db.write_bytes(b"this is not an MLflow database\n" * 100)
    elif damage == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[:len(data) // 3])
    else:
        latest = parent_runs(uri, "tiny-tracked")[-1]
        client(uri).set_tag(latest.info.run_id, "qpipe.headline_spec", "{not json")
    out = CliRunner().invoke(build_app(tracked_pm()), ["compare", "--experiment", "tiny-tracked", "--tracking-uri", uri])
    lines = out.output.strip().splitlines()
    assert out.exit_code == 2, out.output
    assert len(lines) == 1 and lines[0].startswith("error: "), out.output
    assert "internal error" not in out.output and "Traceback" not in out.output
    if damage == "headline_tag":
        assert "qpipe.headline_spec is damaged" in lines[0], lines[0]
    else:
        assert f"cannot read the MLflow store at {uri}" in lines[0], lines[0]


def test_untracked_run_writes_the_report_and_qpipe_log_sends_it_later(tiny, store):
    path = tiny.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], name="later.yaml",
                               tracking={"experiment": "tiny-later"})
    output = tiny.root / "later-out"
    results = run_pipeline_file(path, tracked_pm(), output=output, settings={"no_tracking": True})
    assert all((output / name).is_file() for name in REPORT_FILES)
    assert not (tiny.root / "mlflow.db").exists(), "--no-tracking touches no store"

    out = CliRunner().invoke(build_app(tracked_pm()), ["log", str(output), "--tracking-uri", store])
    assert out.exit_code == 0, out.output
    (parent,) = parent_runs(store, "tiny-later")
    assert parent.info.status == "FINISHED" and parent.data.tags["qpipe.replayed"] == "true"
    assert parent.info.start_time == pytest.approx(
        __import__("datetime").datetime.fromisoformat(results.started).timestamp() * 1000)
    kids = child_runs(store, parent)
    assert sorted(kids) == ["dynamic", "float32"]
    assert kids["dynamic"].data.metrics["accuracy"] == pytest.approx(results.variant("dynamic").metrics["accuracy"])
    files = {f.path for f in client(store).list_artifacts(kids["dynamic"].info.run_id)}
    assert "dynamic.tflite" in files


class Crash(BaseException):
    """Something that escapes a variant's own error handling (like a MemoryError in the runner)."""


class Stopper:
    """Stops the run as ``variant`` makes progress (converts, or is restored from the cache):
    Ctrl-C, or a crash. Its child run is open by then."""

    def __init__(self, variant: str, error: BaseException):
        self.variant, self.error = variant, error

    @qpipe.hookimpl
    def qpipe_variant_progress(self, variant, message):
        if variant == self.variant:
            raise self.error


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"), (Crash("boom"), "FAILED")])
def test_ctrl_c_or_a_crash_leaves_nothing_running(tiny, store, error, status):
    experiment = f"tiny-stop-{status.lower()}"
    path = tiny.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], name=f"{experiment}.yaml",
                               tracking={"uri": store, "experiment": experiment})
    with pytest.raises((KeyboardInterrupt, Crash)):
        run_pipeline_file(path, tracked_pm(Stopper("dynamic", error)), output=tiny.root / experiment,
                          settings={"tracking_uri": None})
    (parent,) = parent_runs(store, experiment)
    assert parent.info.status == status
    assert parent.data.tags["qpipe.status"] == ("interrupted" if status == "KILLED" else "crashed")
    kids = child_runs(store, parent)
    assert kids["float32"].info.status == "FINISHED"
    assert kids["dynamic"].info.status == status
    c = client(store)
    running = c.search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []
    assert read_results(tiny.root / experiment).status == ("interrupted" if status == "KILLED" else "crashed")


def test_sigterm_ends_the_open_runs_killed(tiny, store):
    """``kill`` (or a CI timeout) on ``qpipe run`` closes its runs like Ctrl-C: exit 143."""
    import signal

    experiment = "tiny-sigterm"
    path = tiny.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], name=f"{experiment}.yaml",
                               tracking={"uri": store, "experiment": experiment},
                               evaluators=["accuracy", {"name": "latency", "options": {"runs": 10_000_000}}])
    output = tiny.root / experiment
    proc = subprocess.Popen([sys.executable, "-m", "qpipe.cli", "run", str(path), "-o", str(output), "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tiny.root)
    seen = []
    for line in proc.stdout:  # the float32 child run is open while its latency is measured
        seen.append(line)
        if "float32: evaluating: latency" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    assert "error: terminated (SIGTERM)" in out and "Traceback" not in out
    (parent,) = parent_runs(store, experiment)
    assert parent.info.status == "KILLED"
    assert child_runs(store, parent)["float32"].info.status == "KILLED"
    assert client(store).search_runs([parent.info.experiment_id], "attributes.status = 'RUNNING'") == []
    assert read_results(output).status == "interrupted"


def test_unreachable_server_stops_the_run_before_any_conversion(tiny):
    from qpipe_mlflow.testing import free_port

    path = tiny.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], name="down.yaml",
                               tracking={"experiment": "down"})
    uri = f"http://127.0.0.1:{free_port()}"
    output = tiny.root / "down-out"
    out = CliRunner().invoke(build_app(tracked_pm()), ["run", str(path), "--tracking-uri", uri, "-o", str(output)])
    assert out.exit_code == 2
    lines = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0] and "--no-tracking" in lines[0]
    assert "Traceback" not in out.output
    assert not list(output.glob("*.tflite")), "nothing was converted"


def test_register_names_an_existing_variant(tiny, store):
    path = tiny.write_pipeline([], name="badreg.yaml", tracking={
        "uri": store, "register": {"name": "m", "variant": "int9"}})
    with pytest.raises(qpipe.ConfigError, match=r"tracking.register.variant: unknown variant 'int9'.*float32"):
        run_pipeline_file(path, tracked_pm(), output=tiny.root / "badreg", settings={"tracking_uri": None})


def test_uri_precedence_and_default(tmp_path):
    from qpipe_mlflow.target import resolve_uri

    base = tmp_path / "pipelines"
    assert resolve_uri(None, base, None, {}) == (f"sqlite:///{(base / 'mlflow.db').resolve()}", "default")
    assert resolve_uri("sqlite:///runs/t.db", base, None, {}) == (
        f"sqlite:///{(base / 'runs/t.db').resolve()}", "tracking.uri")
    env = {"MLFLOW_TRACKING_URI": "http://env:5000"}
    assert resolve_uri("sqlite:///t.db", base, None, env) == ("http://env:5000", "MLFLOW_TRACKING_URI")
    assert resolve_uri("sqlite:///t.db", base, "http://cli:5000", env) == ("http://cli:5000", "--tracking-uri")
    assert resolve_uri(None, base, "sqlite:////abs/x.db", env)[0] == "sqlite:////abs/x.db"
    with pytest.raises(qpipe.QpipeError, match="deprecated file store"):
        resolve_uri("./mlruns", base, None, {})
    with pytest.raises(qpipe.QpipeError, match="MLFLOW_TRACKING_URI: 'file:///x' is a folder"):
        resolve_uri(None, base, None, {"MLFLOW_TRACKING_URI": "file:///x"})


def test_without_tracking_mlflow_is_never_imported(tmp_path):
    """Every hook of the plugin, with ``tracking: false`` and with ``--no-tracking``."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "name": "p", "model": {"path": "m.keras"}, "data": {"evaluation": {"path": "d.npz"}},
        "variants": [{"name": "a", "quantizer": "tflite.float32"}], "tracking": False}))
    (tmp_path / "q.yaml").write_text((tmp_path / "p.yaml").read_text().replace("tracking: false", "tracking: {}"))
    code = f"""
import sys
from pathlib import Path
import qpipe_mlflow as plugin
from qpipe.config import load_config
from qpipe.results import PipelineResults, PipelineRun, VariantResult
for name, settings in (("p.yaml", {{}}), ("q.yaml", {{"no_tracking": True}})):
    loaded = load_config(Path({str(tmp_path)!r}) / name)
    results = PipelineResults(pipeline="p", baseline="a")
    run = PipelineRun(name="p", config=loaded.config, config_path=loaded.path, config_text=loaded.text,
                      output_dir=Path({str(tmp_path)!r}), results=results, settings=settings)
    result = VariantResult(name="a", quantizer="tflite.float32")
    plugin.qpipe_pipeline_started(run=run)
    plugin.qpipe_variant_started(run=run, variant="a")
    plugin.qpipe_variant_metrics(run=run, variant="a", metrics={{"loss": 1.0}}, step=1)
    plugin.qpipe_variant_finished(run=run, result=result)
    plugin.qpipe_variant_failed(run=run, result=result)
    plugin.qpipe_pipeline_finished(run=run, results=results)
    plugin.qpipe_pipeline_failed(run=run, error=RuntimeError(), interrupted=False)
print(sorted(m for m in ("mlflow", "tensorflow") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert not (tmp_path / "mlflow.db").exists()


def test_the_second_run_copies_the_model_template_the_first_kept(tracked, store, tiny, monkeypatch, tmp_path):
    """MLflow's save_model (requirement checks, example prediction: over a second) runs once; the
    next run copies its folder from the cache, and its registered model predicts the same."""
    import mlflow.pyfunc

    from qpipe_mlflow import pyfunc, templates

    (kept,) = (tiny.root / ".qpipe-cache" / templates.FOLDER).iterdir()
    assert templates.trusted(kept, pyfunc.CODE, pyfunc.requirements())
    assert not list(kept.rglob("*.tflite")), "each variant brings its own .tflite"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    x = np.load(tiny.data_path, allow_pickle=False)["x_test"]
    first, second = (mlflow.pyfunc.load_model(f"models:/tiny-int8/{v}") for v in (1, 2))
    np.testing.assert_array_equal(second.predict(x), first.predict(x))
    downloaded = Path(mlflow.artifacts.download_artifacts("models:/tiny-int8/2", dst_path=str(tmp_path)))
    assert (downloaded / pyfunc.CODE.name).read_bytes() == pyfunc.CODE.read_bytes()

    class Logged:  # what ModelFolders reads of a LoggedModel
        model_id, artifact_location = "m-test", str(tmp_path / "logged")

    tflite = tiny.root / "run-1" / "int8.tflite"
    config = pyfunc.model_config(tracked[0].variant("int8").backend)
    folders = pyfunc.ModelFolders(tiny.root / ".qpipe-cache")
    folders.write(tmp_path / "reused", tflite, config, Logged, "run-id")
    assert folders.reused == 1
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(str(tmp_path / "reused")).predict(x), first.predict(x))
    folders.close()


@pytest.mark.parametrize("tamper", ["code", "requirements", "extra-file", "symlink", "loader"])
def test_a_changed_model_template_is_never_used(tracked, tiny, tmp_path, tamper):
    """Whoever can write the cache must not get other code or packages into the logged models:
    a template that is not exactly what qpipe would write is rebuilt by MLflow and replaced."""
    import shutil

    from qpipe_mlflow import pyfunc, templates

    cache = tmp_path / "cache"
    shutil.copytree(tiny.root / ".qpipe-cache" / templates.FOLDER, cache / templates.FOLDER)
    (kept,) = (cache / templates.FOLDER).iterdir()
    if tamper == "code":
        (kept / pyfunc.CODE.name).write_text("import os; os.system('echo owned')\n")
    elif tamper == "requirements":
        (kept / "requirements.txt").write_text((kept / "requirements.txt").read_text() + "\nevil-package==1.0")
    elif tamper == "extra-file":
        (kept / "artifacts" / "payload.py").write_text("print('owned')\n")
    elif tamper == "symlink":  # a link is refused without being followed (this one leads to everything)
        (kept / "artifacts" / "root").symlink_to("/")
    else:
        mlmodel = kept / "MLmodel"
        mlmodel.write_text(mlmodel.read_text().replace("mlflow.pyfunc.loaders.code_model", "evil.loader"))
    assert not templates.trusted(kept, pyfunc.CODE, pyfunc.requirements())

    class Logged:
        model_id, artifact_location = "m-test", str(tmp_path / "logged")

    tflite = tiny.root / "run-1" / "int8.tflite"
    folders = pyfunc.ModelFolders(cache)
    folders.write(tmp_path / "model", tflite, pyfunc.model_config(tracked[0].variant("int8").backend), Logged, "r")
    folders.close()
    assert folders.reused == 0
    assert (tmp_path / "model" / pyfunc.CODE.name).read_bytes() == pyfunc.CODE.read_bytes()
    assert "evil" not in (tmp_path / "model" / "requirements.txt").read_text()
    assert not (tmp_path / "model" / "artifacts" / "payload.py").exists()
    assert templates.trusted(kept, pyfunc.CODE, pyfunc.requirements()), "replaced by a good one"


def test_qpipe_log_keeps_no_template_where_a_results_json_points(tiny, store, tmp_path):
    """A replayed results.json names its run's cache folder; qpipe log writes nothing there."""
    import json

    path = tiny.write_pipeline([], name="replayed.yaml", tracking={"experiment": "tiny-replayed"})
    output = tiny.root / "replayed-out"
    run_pipeline_file(path, tracked_pm(), output=output, settings={"no_tracking": True})
    elsewhere = tmp_path / "elsewhere"
    record = json.loads((output / "results.json").read_text())
    record["extra"]["cache"]["dir"] = str(elsewhere)
    (output / "results.json").write_text(json.dumps(record))
    out = CliRunner().invoke(build_app(tracked_pm()), ["log", str(output), "--tracking-uri", store])
    assert out.exit_code == 0, out.output
    (parent,) = parent_runs(store, "tiny-replayed")
    assert "float32" in child_runs(store, parent) and not elsewhere.exists()


def test_qpipe_log_writes_only_where_the_user_says(tiny, tmp_path, monkeypatch):
    """A foreign folder's recorded tracking.uri (and a forged pipeline_file in its results.json) do not
    choose the store: the default beside the current folder does, unless --use-recorded-uri."""
    import json

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tiny.write_pipeline([], name="foreign.yaml",
                               tracking={"experiment": "foreign", "uri": "sqlite:///elsewhere/deep/mlflow.db"})
    output = tiny.root / "foreign-out"
    run_pipeline_file(path, tracked_pm(), output=output, settings={"no_tracking": True})
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "pipeline.yaml").write_text("name: forged\n")
    record = json.loads((output / "results.json").read_text())
    record["extra"]["pipeline_file"] = str(forged / "pipeline.yaml")
    (output / "results.json").write_text(json.dumps(record))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    out = CliRunner().invoke(build_app(tracked_pm()), ["log", str(output)])
    assert out.exit_code == 0, out.output
    assert "records tracking.uri 'sqlite:///elsewhere/deep/mlflow.db'" in out.output
    assert "--use-recorded-uri" in out.output
    store = f"sqlite:///{here / 'mlflow.db'}"
    (parent,) = parent_runs(store, "foreign")
    assert "float32" in child_runs(store, parent)
    assert not (tiny.root / "elsewhere").exists() and not (output / "elsewhere").exists()
    assert sorted(p.name for p in forged.iterdir()) == ["pipeline.yaml"]
    assert not (tiny.root / "mlflow.db").exists() and not (tiny.root / "mlartifacts").exists()
    trusted = CliRunner().invoke(build_app(tracked_pm()), ["log", str(output), "--use-recorded-uri"])
    assert trusted.exit_code == 0, trusted.output
    recorded = f"sqlite:///{output / 'elsewhere' / 'deep' / 'mlflow.db'}"
    assert len(parent_runs(recorded, "foreign")) == 1 and sorted(p.name for p in forged.iterdir()) == ["pipeline.yaml"]
