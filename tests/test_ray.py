"""The Ray executor against a real local Ray cluster started by the test (``ray start --head``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import qpipe
from qpipe import Quantizer
from qpipe.testing import LifecycleRecorder, plugin_manager, run_pipeline_file

ray = pytest.importorskip("ray")


RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the venv's own Ray, script or not
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
#: run in a fresh interpreter: wait for the cluster's nodes, then list the hidden folder from the worker node
PROBE = """
import json, os, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 120
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.5)
seen = {"nodes": sum(n["Alive"] for n in ray.nodes()), "listing": None, "node": None}
if len(sys.argv) > 3:
    look = ray.remote(resources={"worker_only": 1}, num_cpus=0)(
        lambda p: (os.listdir(p), ray.get_runtime_context().get_node_id()))
    seen["listing"], seen["node"] = ray.get(look.remote(sys.argv[3]), timeout=120)
print(json.dumps(seen))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a node we started (``ray start --block`` stops its own processes), then its process group."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    try:
        os.killpg(process.pid, 9)  # anything of that node still alive (started in its own session)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def ray_cluster(head_cpus: int = 2, hidden: Path | None = None):
    """A Ray head on 127.0.0.1 and, with ``hidden``, a worker node (1 CPU and the resource
    ``worker_only``) started in its own mount namespace where ``hidden`` is an empty tmpfs.
    Yields (address, probe); every node is stopped by its pid on the way out, even on failure."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="qray", dir="/tmp")  # Ray's socket paths must stay short
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(subprocess.Popen(
            [*RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(head_cpus), "--temp-dir", temp, "--include-dashboard", "false",
             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
            start_new_session=True))
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if nodes[0].poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the local Ray head did not start")
                time.sleep(0.5)
        probe = None
        if hidden is not None:
            nodes.append(subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hidden), *RAY, "start", "--block",
                 "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                 "--resources", json.dumps({"worker_only": 1}), "--disable-usage-stats"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True))
            done = subprocess.run([sys.executable, "-c", PROBE, address, "2", str(hidden)], env=ENV, timeout=240,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
            probe = json.loads(done.stdout.strip().splitlines()[-1])
        yield address, probe
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster on 127.0.0.1 for the module's tests."""
    with ray_cluster() as (address, _):
        yield address


class Crash(Quantizer):
    """Kills the process running it (a native crash, the OOM killer)."""

    name = "test.crash"

    def quantize(self, ctx):
        os._exit(3)


class Plugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Crash)


@pytest.mark.slow
def test_variants_run_as_ray_tasks(project, ray_address, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Crash travels to workers by value
    variants = [{"name": "int8", "quantizer": "tflite.int8"},
                {"name": "crash", "quantizer": "test.crash"},
                {"name": "dynamic", "quantizer": "tflite.dynamic"},
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
    assert list(by_name) == ["float32", "int8", "crash", "dynamic", "too_many"]
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
    """The worker node cannot see the pipeline's folder; every variant still matches an in-process run."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr("qpipe.data.LAZY_MIN_BYTES", 0)  # the driver reads every array lazily from its file
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
        with ray_cluster(head_cpus=1, hidden=root) as (address, probe):
            assert probe["nodes"] == 2 and probe["listing"] == []  # the worker node sees an empty folder
            executor = {"name": "ray", "address": address, "resources": {"worker_only": 1}}
            remote = run_pipeline_file(project.write_pipeline(variants, name="ray.yaml", data=data,
                                                              executor=executor),
                                       plugin_manager(entry_points=["tfmot"]), output=root / "ray",
                                       settings={"no_tracking": True, "no_cache": True})
        assert [v.name for v in remote.variants] == [v.name for v in local.variants]
        for mine, theirs in zip(remote.variants, local.variants):
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
        shutil.rmtree(root, ignore_errors=True)
