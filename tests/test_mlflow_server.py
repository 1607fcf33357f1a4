"""Tracking over HTTP against a real ``mlflow server`` (sqlite backend, ``--serve-artifacts``) on
127.0.0.1, started once for the module; then the server dies mid-run and ``qpipe log`` sends the
finished folder once it is back."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qpipe
from qpipe.cli import build_app
from qpipe.config import load_config, resolve
from qpipe.pipeline import run_pipeline
from qpipe.registry import Registry
from qpipe.results import read_results
from qpipe.testing import TinyProject, plugin_manager
from qpipe_mlflow.testing import child_runs, parent_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from qpipe_mlflow.testing import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("server"), cache=tmp_path_factory.getbasetemp()) as running:
        yield running


@pytest.fixture(scope="module")
def tiny(_tiny_session, tmp_path_factory) -> TinyProject:
    root = tmp_path_factory.mktemp("http")
    shutil.copy(_tiny_session.model_path, root / "model.keras")
    shutil.copy(_tiny_session.data_path, root / "data.npz")
    return TinyProject(root, root / "model.keras", root / "data.npz")


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run(path: Path, output: Path, settings: dict, *plugins) -> tuple:
    pm = plugin_manager(*plugins, entry_points=["mlflow"])
    resolved = resolve(load_config(path), Registry.from_plugins(pm))
    return run_pipeline(pm, resolved, output, settings)


def test_a_run_over_http_logs_parent_children_and_artifacts(server, tiny, tmp_path):
    path = tiny.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"},
                                {"name": "int8", "quantizer": "tflite.int8", "options": {"per_channel": False}}],
                               name="http.yaml", tracking={"experiment": "tiny-http"})
    results, warnings = run(path, tiny.root / "http-out", {"tracking_uri": server.uri})
    assert warnings == []
    c = client(server.uri)
    (parent,) = parent_runs(server.uri, "tiny-http")
    assert c.get_experiment(parent.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("tiny-")
    assert {"pipeline.yaml", "results.json", "summary.csv", "summary.md", "quality_vs_size.png",
            "latency.png"} <= {f.path for f in c.list_artifacts(parent.info.run_id)}
    kids = child_runs(server.uri, parent)
    assert sorted(kids) == ["dynamic", "float32", "int8"]
    for v in results.variants:
        child = kids[v.name]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["qpipe.variant"] == v.name and child.data.tags["qpipe.status"] == "ok"
        assert child.data.tags["qpipe.model_sha256"] == results.model["sha256"]
        assert child.data.params["quantizer"] == v.quantizer
        assert child.data.params["backend.batch_size"] == str(v.backend["options"]["batch_size"])
        assert child.data.metrics["accuracy"] == pytest.approx(v.metrics["accuracy"])
        assert set(child.data.metrics) >= set(v.metrics) - {"cache_hit", "cache_hit_delta"}  # qpipe.cache tag
        local = c.download_artifacts(child.info.run_id, f"{v.name}.tflite", str(tmp_path))  # through the proxy
        assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == child.data.tags["qpipe.artifact_sha256"]
    assert kids["int8"].data.params["quantizer.per_channel"] == "false"
    assert results.extra["mlflow"]["tracking_uri"] == server.uri


class ServerKiller:
    """Stops the tracking server as ``variant`` starts."""

    def __init__(self, server, variant):
        self.server, self.variant = server, variant

    @qpipe.hookimpl
    def qpipe_variant_started(self, variant):
        if variant == self.variant:
            self.server.stop()


def test_a_server_that_dies_mid_run_loses_nothing(server, tiny, tmp_path_factory):
    """Runs last: it stops the module's server, then starts it again on the same store."""
    from qpipe_mlflow.testing import MlflowServer

    path = tiny.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"},
                                {"name": "float16", "quantizer": "tflite.float16"}],
                               name="dies.yaml", tracking={"experiment": "tiny-dies"})
    output = tiny.root / "dies-out"
    results, warnings = run(path, output, {"tracking_uri": server.uri}, ServerKiller(server, "dynamic"))
    assert [v.status for v in results.variants] == ["ok", "ok", "ok"], "the run went on without MLflow"
    assert len(warnings) == 1, warnings
    assert "stopped answering" in warnings[0] and f"qpipe log {output}" in warnings[0]
    assert [v.name for v in read_results(output).variants] == ["float32", "dynamic", "float16"]

    with MlflowServer(server.root, cache=tmp_path_factory.getbasetemp()) as again:
        (stale,) = parent_runs(again.uri, "tiny-dies")
        assert stale.info.status == "RUNNING", "the dead server could not be told"
        out = CliRunner().invoke(build_app(plugin_manager(entry_points=["mlflow"])),
                                 ["log", str(output), "--tracking-uri", again.uri])
        assert out.exit_code == 0, out.output
        (new,) = parent_runs(again.uri, "tiny-dies")  # the incomplete copy is replaced, not duplicated
        assert new.info.run_id != stale.info.run_id
        assert new.info.status == "FINISHED" and new.data.tags["qpipe.replayed"] == "true"
        assert sorted(child_runs(again.uri, new)) == ["dynamic", "float16", "float32"]
        c = client(again.uri)
        old = c.get_run(stale.info.run_id)
        assert old.info.status == "FAILED" and old.data.tags["qpipe.superseded_by"] == new.info.run_id
        assert old.info.lifecycle_stage == "deleted"
        assert c.search_runs([new.info.experiment_id], "attributes.status = 'RUNNING'") == []
