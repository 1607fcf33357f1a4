"""The Ray executor against a real local Ray cluster started by the test (``ray start --head``)."""

from __future__ import annotations

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
from qpipe.testing import LifecycleRecorder, plugin_manager, run_pipeline_file

ray = pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster on 127.0.0.1, stopped (by its pid) when the module's tests end."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="qray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp, "--include-dashboard", "false",
         "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the local Ray head did not start")
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_variants_run_as_ray_tasks(project, ray_address, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    variants = [{"name": "int8", "quantizer": "tflite.int8"},
                {"name": "dynamic", "quantizer": "tflite.dynamic"},
                # asks for more calibration samples than there are rows: fails in its task
                {"name": "too_many", "quantizer": "tflite.int8", "calibrator": {"name": "sample",
                                                                               "options": {"count": 5000}}}]
    pipeline = project.write_pipeline(variants, executor={"name": "ray", "address": ray_address})
    events = LifecycleRecorder()
    out = project.root / "ray-run"
    results = run_pipeline_file(pipeline, plugin_manager(events), output=out,
                                settings={"no_tracking": True, "no_cache": True})
    assert results.extra["executor"]["name"] == "ray"
    by_name = {v.name: v for v in results.variants}
    assert list(by_name) == ["float32", "int8", "dynamic", "too_many"]
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
