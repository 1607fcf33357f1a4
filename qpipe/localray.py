"""A Ray cluster of separate node processes on 127.0.0.1, for tests and benchmarks.

``local_ray_cluster(head_cpus, hidden=folder)`` starts a head (``ray start --head``) and, with
``hidden``, a worker node with 1 CPU and the custom resource ``worker_only`` inside its own mount
namespace where ``folder`` is an empty tmpfs: the worker cannot see the pipeline's files, as a
node of a real cluster cannot (needs root and ``unshare``; Linux only). Tasks asking for
``{"worker_only": 1}`` run on that node. Every node is stopped by its process id on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # this interpreter's Ray, whether or not its script is on PATH
#: wait for the cluster's nodes, then list the hidden folder from the worker node (a fresh interpreter)
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
#: a Ray Client round trip through the head's client server, retried as qpipe retries a ``ray://`` connect
CLIENT_PROBE = """
import sys, ray
from qpipe.remote import init_ray
init_ray(ray, {"address": sys.argv[1], "log_to_driver": False}, attempts=6,
         warn=lambda message: print(message, file=sys.stderr, flush=True))
assert ray.get(ray.put(1), timeout=120) == 1
ray.shutdown()
"""


def ray_env() -> dict[str, str]:
    """The environment for local nodes: no token auth on loopback, no usage reports."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a node (``ray start --block`` stops its own processes), then what is left of its session."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: only that node's processes


def _wait_for_port(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the local Ray head did not start") from None
            time.sleep(0.5)


def _probe_client(address: str, env: dict[str, str], timeout: float = 480) -> None:
    """Wait until a Ray Client connect to ``address`` really works (a fresh interpreter, with retries)."""
    try:
        done = subprocess.run([sys.executable, "-c", CLIENT_PROBE, address], env=env, timeout=timeout, check=False,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the local Ray Client server at {address} did not answer in {timeout:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"the local Ray Client server at {address} does not work: {done.stderr[-2000:]}")


@contextlib.contextmanager
def local_ray_cluster(head_cpus: int = 2, hidden: Path | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(address, probe)``: ``probe["client"]`` is the Ray Client address (``ray://``); with
    ``hidden``, ``probe`` also holds the node count, the worker node's id and what the worker sees in
    ``hidden`` (an empty list)."""
    port, client_port = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="qray", dir="/tmp")  # Ray's socket paths must stay short
    address, env = f"127.0.0.1:{port}", ray_env()
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "start_new_session": True}
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(subprocess.Popen(
            [*RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(head_cpus), "--temp-dir", temp, "--include-dashboard", "false",
             "--ray-client-server-port", str(client_port), "--disable-usage-stats"], **quiet))
        _wait_for_port(port, nodes[0])
        _wait_for_port(client_port, nodes[0])  # the Ray Client server starts after the GCS
        probe: dict[str, Any] = {"client": f"ray://127.0.0.1:{client_port}"}
        _probe_client(probe["client"], env)  # an open port is not yet a working client server
        if hidden is not None:
            nodes.append(subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
                 str(hidden), *RAY, "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
                 "--num-cpus", "1", "--resources", json.dumps({"worker_only": 1}), "--disable-usage-stats"], **quiet))
            done = subprocess.run([sys.executable, "-c", PROBE, address, "2", str(hidden)], env=env, timeout=240, check=False,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the worker node did not join: {done.stderr[-2000:]}")
            probe.update(json.loads(done.stdout.strip().splitlines()[-1]))
        yield address, probe
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)
