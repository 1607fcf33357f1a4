"""The Ray executor against a real local Ray cluster started by the test (``ray start --head``)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

import qpipe
from qpipe import Quantizer
from qpipe.localray import local_ray_cluster
from qpipe.results import read_results
from qpipe.testing import LifecycleRecorder, plugin_manager, run_pipeline_file

ray = pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on 127.0.0.1 for the module's tests: (address, Ray Client address)."""
    with local_ray_cluster() as (address, probe):
        yield address, probe["client"]


@pytest.fixture
def ray_address(ray_cluster):
    return ray_cluster[0]


class Crash(Quantizer):
    """Kills the process running it (a native crash, the OOM killer)."""

    name = "test.crash"

    def quantize(self, ctx):
        os._exit(3)


class Huge(Quantizer):
    """Declares more CPUs than any node has."""

    name = "test.huge"
    resources = {"num_cpus": 64}

    def quantize(self, ctx):
        raise AssertionError("never scheduled")


class SleepOptions(qpipe.Options):
    pidfile: str


class Sleep(Quantizer):
    """Writes its process id to ``pidfile``, then sleeps for ten minutes."""

    name = "test.sleep"
    Options = SleepOptions

    def quantize(self, ctx):
        Path(self.options.pidfile).write_text(str(os.getpid()))
        time.sleep(600)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


class Plugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Crash)
        register(Huge)
        register(Sleep)


class CtrlC:
    """Presses Ctrl-C once ``variant`` is recorded and the sleeper has started."""

    def __init__(self, variant, pidfile):
        self.variant, self.pidfile = variant, pidfile

    @qpipe.hookimpl
    def qpipe_variant_finished(self, result):
        deadline = time.monotonic() + 180  # a busy machine starts workers slowly
        while result.name == self.variant and not self.pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if result.name == self.variant:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_variants_run_as_ray_tasks(project, ray_address, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Crash travels to workers by value
    variants = [{"name": "int8", "quantizer": "tflite.int8"},
                {"name": "crash", "quantizer": "test.crash"},
                {"name": "dynamic", "quantizer": "tflite.dynamic"},
                {"name": "huge", "quantizer": "test.huge"},  # no node is big enough: refused, not left waiting
                # asks for more calibration samples than there are rows: fails in its task
                {"name": "too_many", "quantizer": "tflite.int8", "calibrator": {"name": "sample",
                                                                               "options": {"count": 5000}}}]
    pipeline = project.write_pipeline(variants, executor={"name": "ray", "address": ray_address})
    events = LifecycleRecorder()
    out = project.root / "ray-run"
    results = run_pipeline_file(pipeline, plugin_manager(events, Plugin()), output=out,
                                settings={"no_tracking": True, "no_cache": True})
    assert results.extra["executor"]["name"] == "ray"
    by_name = {v.name: v for v in results.variants}
    assert list(by_name) == ["float32", "int8", "crash", "dynamic", "huge", "too_many"]
    assert by_name["huge"].status == "failed" and "no node of the Ray cluster has 64 CPU" in by_name["huge"].error
    # the worker died: that variant fails naming the node, the others still ran
    assert by_name["crash"].status == "failed" and "died" in by_name["crash"].error, by_name["crash"].error
    for name in ("float32", "int8", "dynamic"):
        v = by_name[name]
        assert v.status == "ok", v.error
        assert v.metadata["worker"]["pid"] != os.getpid()  # a Ray worker process ran it
        assert (out / v.artifact).is_file()
    assert 0.9 <= by_name["int8"].metrics["top1_agreement"] <= 1.0 and "accuracy_delta" in by_name["int8"].metrics
    assert "count 5000 is more than" in by_name["too_many"].error
    # the parent called every hook, one variant at a time, as each task's result arrived
    seen = [name for i, (_, name, _) in enumerate(events.calls) if i == 0 or events.calls[i - 1][1] != name]
    assert sorted(seen) == sorted(by_name)
    assert {pid for *_, pid in events.calls} == {os.getpid()}
    assert [k for k, n, _ in events.calls if n == "too_many"][-1] == "failed"
    assert not ray.is_initialized()  # the driver disconnected; the cluster is the test's to stop


def test_unreachable_ray_is_one_clear_error(project, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    pipeline = project.write_pipeline([], executor={"name": "ray", "address": f"127.0.0.1:{free_port()}"})
    with pytest.raises(qpipe.QpipeError, match="cannot start or reach Ray at 127.0.0.1"):
        run_pipeline_file(pipeline, output=project.root / "nowhere")


def measured(metrics: dict) -> dict:
    """The metrics that do not depend on the clock."""
    return {k: v for k, v in metrics.items() if "latency" not in k and "seconds" not in k}


@pytest.mark.slow
def test_two_nodes_share_nothing_but_ray(_tiny_session, monkeypatch):
    """The worker node cannot see the pipeline's folder; every variant still matches an in-process
    run, and reaches a proxied-artifact MLflow server byte for byte."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr("qpipe.lazyarray.LAZY_MIN_BYTES", 0)  # the driver reads every array lazily from its file
    from mlflow import MlflowClient
    from qpipe_mlflow.testing import MlflowServer, child_runs, parent_runs

    root = Path(tempfile.mkdtemp(prefix="qpipe-hidden-"))
    try:
        project = _tiny_session.copy_to(root)
        data = {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
                "calibration": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"},
                "training": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}}
        variants = [{"name": "int8", "quantizer": "tflite.int8"},
                    {"name": "dynamic", "quantizer": "tflite.dynamic"},
                    {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1}},
                    {"name": "too_many", "quantizer": "tflite.int8",
                     "calibrator": {"name": "sample", "options": {"count": 5000}}}]
        local = run_pipeline_file(project.write_pipeline(variants, name="local.yaml", data=data),
                                  plugin_manager(entry_points=["tfmot"]), output=root / "local",
                                  settings={"no_tracking": True, "no_cache": True})
        with MlflowServer(root.with_name(root.name + "-mlflow")) as server, \
                local_ray_cluster(head_cpus=1, hidden=root) as (address, probe):
            assert probe["nodes"] == 2 and probe["listing"] == []  # the worker node sees an empty folder
            executor = {"name": "ray", "address": address, "resources": {"worker_only": 1}}
            remote = run_pipeline_file(project.write_pipeline(variants, name="ray.yaml", data=data,
                                                              executor=executor, tracking={"experiment": "nodes"}),
                                       plugin_manager(entry_points=["tfmot", "mlflow"]), output=root / "ray",
                                       settings={"tracking_uri": server.uri, "no_cache": True})
            (parent,) = parent_runs(server.uri, "nodes")  # the proxied-artifact server got the run
            kids = child_runs(server.uri, parent)
            for v in local.variants:
                if v.status == "ok":
                    back = MlflowClient(server.uri).download_artifacts(
                        kids[v.name].info.run_id, Path(v.artifact).name, str(root.with_name(root.name + "-back")))
                    assert Path(back).read_bytes() == (root / "local" / v.artifact).read_bytes(), v.name
        assert [v.name for v in remote.variants] == [v.name for v in local.variants]
        for mine, theirs in zip(remote.variants, local.variants, strict=False):
            assert (mine.status, mine.error is None) == (theirs.status, theirs.error is None), mine.error
            assert mine.metadata["worker"]["node"] == probe["node"]  # ran on the worker node
            if mine.status != "ok":
                assert mine.error == theirs.error and "count 5000 is more than" in mine.error
                continue
            assert mine.artifact == theirs.artifact
            assert (root / "ray" / mine.artifact).read_bytes() == (root / "local" / theirs.artifact).read_bytes(), \
                mine.name
            assert measured(mine.metrics) == measured(theirs.metrics), mine.name
    finally:
        for folder in ("", "-mlflow", "-back"):
            shutil.rmtree(root.with_name(root.name + folder), ignore_errors=True)


@pytest.mark.slow
def test_ctrl_c_cancels_the_remote_tasks(project, ray_address, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    pidfile = tmp_path / "sleeper.pid"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    variants = [{"name": "dynamic", "quantizer": "tflite.dynamic"},
                {"name": "sleepy", "quantizer": "test.sleep", "options": {"pidfile": str(pidfile)}}]
    pipeline = project.write_pipeline(variants, executor={"name": "ray", "address": ray_address})
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_pipeline_file(pipeline, plugin_manager(Plugin(), CtrlC("dynamic", pidfile)), output=tmp_path / "out",
                          settings={"no_tracking": True, "no_cache": True})
    assert pidfile.exists(), "the sleeping variant never started"
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.5)
    assert not alive(pid), "the sleeping task's worker was not cancelled"
    assert time.monotonic() - started < 300
    assert not ray.is_initialized()


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_the_cluster_address_from_the_command_line_or_the_environment(project, monkeypatch, how):
    from typer.testing import CliRunner

    from qpipe.cli import build_app

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    address = f"127.0.0.1:{free_port()}"  # nothing answers: the error names where qpipe looked
    pipeline = project.write_pipeline([])  # executor: local in the file
    args = ["run", str(pipeline), "--no-tracking", "-o", str(project.root / "out")]
    if how == "--address":
        args += ["--address", address]
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
        args += ["--executor", "ray"]
    out = CliRunner().invoke(build_app(plugin_manager()), args)
    assert out.exit_code == 2, out.output
    assert f"cannot start or reach Ray at {address}" in out.output and "Traceback" not in out.output
    assert not (project.root / "out").exists(), "half-written"


def test_an_unknown_executor_is_one_line(project):
    from typer.testing import CliRunner

    from qpipe.cli import build_app

    out = CliRunner().invoke(build_app(plugin_manager()), ["run", str(project.write_pipeline([])), "--executor",
                                                           "dask", "-o", str(project.root / "out")])
    assert out.exit_code == 2 and out.output.strip().splitlines()[-1].endswith("unknown executor; use local or ray")
    assert not (project.root / "out").exists()


@pytest.mark.slow
def test_a_run_through_ray_client(project, ray_cluster, monkeypatch):
    """``--address ray://HOST:PORT``: the driver talks to the cluster through Ray Client only."""
    from typer.testing import CliRunner

    from qpipe.cli import build_app

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    pipeline = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}])
    out = CliRunner().invoke(build_app(plugin_manager()), ["run", str(pipeline), "--no-tracking", "--no-cache",
                                                           "--address", ray_cluster[1], "-o", str(project.root / "out")])
    assert out.exit_code == 0, out.output
    results = read_results(project.root / "out")
    assert results.extra["executor"]["name"] == "ray"
    assert [(v.name, v.status) for v in results.variants] == [("float32", "ok"), ("dynamic", "ok")]
    assert all(v.metadata["worker"]["pid"] != os.getpid() for v in results.variants)
    assert (project.root / "out" / results.variant("dynamic").artifact).is_file()
    assert not ray.is_initialized()


#: what a Ray Client server answered when the per-client server it spawned died (seen under load, ray 2.60)
SERVER_FAILED = ("Initialization failure from server:\nTraceback (most recent call last):\n  File \"/venv/lib/python3.11/"
                 "site-packages/ray/util/client/server/proxier.py\", line 772, in Datapath\n    raise RuntimeError(\n"
                 "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err for detailed logs.\n")


class FlakyRay:
    """A stand-in for the ``ray`` module whose first ``failures`` Ray Client connects fail as above."""

    def __init__(self, failures: int, error: str = SERVER_FAILED):
        self.failures, self.error, self.calls, self.shutdowns = failures, error, 0, 0

    def init(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionAbortedError(self.error)

    def shutdown(self):
        self.shutdowns += 1


def test_a_ray_client_connect_is_retried_with_backoff():
    from qpipe.remote import init_ray

    said = []
    flaky = FlakyRay(failures=2)
    started = time.monotonic()
    init_ray(flaky, {"address": "ray://127.0.0.1:1"}, warn=said.append, attempts=4, backoff=0.1)
    assert flaky.calls == 3 and flaky.shutdowns == 2
    assert time.monotonic() - started >= 0.3  # 0.1 s, then 0.2 s
    assert len(said) == 2 and "Starting Ray client server failed" in said[0] and "attempt 2 of 4" in said[0]


def test_retries_are_bounded_and_the_server_cause_is_one_line(monkeypatch):
    from qpipe.remote import RayExecutor, init_ray

    with pytest.raises(ConnectionAbortedError):
        init_ray(FlakyRay(failures=9), {"address": "ray://127.0.0.1:1"}, attempts=3, backoff=0.01)
    # a plain cluster address, or an error that is not a client-server hiccup, is not retried
    for address, error in (("127.0.0.1:1", SERVER_FAILED), ("ray://127.0.0.1:1", "version mismatch: 2.9 vs 2.60")):
        flaky = FlakyRay(failures=1, error=error)
        with pytest.raises(ConnectionAbortedError):
            init_ray(flaky, {"address": address}, attempts=3, backoff=0.01)
        assert flaky.calls == 1
    monkeypatch.setattr("qpipe.remote.CLIENT_BACKOFF", 0.01)
    executor = RayExecutor.__new__(RayExecutor)
    with pytest.raises(qpipe.QpipeError) as caught:
        executor._connect(FlakyRay(failures=9), "ray://127.0.0.1:1")
    message = str(caught.value)
    assert message == ("executor: cannot start or reach Ray at ray://127.0.0.1:1: ConnectionAbortedError: RuntimeError: "
                       "Starting Ray client server failed. See ray_client_server_23000.err for detailed logs."), message
