"""Test kit for tracking: a migrated sqlite store in seconds, and a real ``mlflow server``.

    from qpipe_mlflow.testing import sqlite_store, MlflowServer

    uri = sqlite_store(tmp_path / "mlflow.db", cache=tmp_path_factory.getbasetemp())
    with MlflowServer(tmp_path) as server:      # sqlite backend, --serve-artifacts, 127.0.0.1
        ...server.uri...

A new sqlite store runs MLflow's migrations (6 s or more); ``sqlite_store`` migrates one
template per cache folder and copies it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TEMPLATE = "qpipe-mlflow-template.db"


def parent_runs(uri: str, experiment: str) -> list:
    """The qpipe parent runs of ``experiment``, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`qpipe.kind` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])


def child_runs(uri: str, parent) -> dict:
    """The child runs of ``parent`` by run name (one per variant)."""
    from mlflow import MlflowClient

    return {r.info.run_name: r for r in MlflowClient(tracking_uri=uri).search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}


def sqlite_store(path: Path, cache: Path | None = None) -> str:
    """Create a migrated, empty MLflow sqlite database at ``path``; return its URI."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    template = Path(cache or path.parent) / TEMPLATE
    if not template.is_file():
        from mlflow import MlflowClient

        from qpipe_mlflow.tracker import quiet_logs

        scratch = template.with_suffix(".tmp")
        with quiet_logs():
            MlflowClient(tracking_uri=f"sqlite:///{scratch}").search_experiments()
        os.replace(scratch, template)
    shutil.copy(template, path)
    return f"sqlite:///{path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend and proxied artifacts (a real one).

    Started in its own process group so ``stop`` ends it and its workers, and nothing else.
    A server started again on the same ``root`` keeps its store and artifacts.
    """

    def __init__(self, root: Path, cache: Path | None = None, timeout: float = 120.0):
        self.root = Path(root)
        self.cache = cache
        self.timeout = timeout
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        db = self.root / "server.db"  # kept across restarts of a server on the same root
        backend = f"sqlite:///{db.resolve()}" if db.is_file() else sqlite_store(db, self.cache)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
        self.log = open(self.root / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*command, "server", "--backend-store-uri", backend, "--artifacts-destination",
             str(self.root / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
            start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {self.timeout:.0f} s")

    def stop(self) -> None:
        """Stop the server and its workers (its own process group)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=5)
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bare_venv(folder: Path) -> Path:
    """A new virtual environment that sees this environment's installed packages but not
    qpipe (its editable install is a ``.pth`` hook, which plain path lines do not run); its
    python. For checking that a logged model loads and serves without qpipe: put its ``bin``
    first on PATH."""
    folder = Path(folder)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    sites = [p for p in sys.path if p.rstrip("/").endswith("site-packages") and Path(p).is_dir()]
    (Path(purelib) / "_qpipe_bare.pth").write_text("\n".join(dict.fromkeys(sites)) + "\n")
    shim = folder / "bin" / "uvicorn"  # `mlflow models serve` runs `uvicorn` from PATH
    shim.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m uvicorn "$@"\n')
    shim.chmod(0o755)
    return python
