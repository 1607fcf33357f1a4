"""Runs never collide and never write into someone else's folder; user mistakes exit 2.

Four real ``qpipe run`` processes of one pipeline started together, tracking to a new sqlite
store, each get their own folder and complete results; an existing folder holding files qpipe
did not write is refused unless ``--force``; a read-only folder, an ``--output`` naming a file,
a non-UTF-8 pipeline file and a truncated results.json are one-line errors with exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpipe.cli import build_app
from qpipe.config import load_config, resolve
from qpipe.errors import QpipeError
from qpipe.outputs import MARKER, claim_output
from qpipe.registry import Registry
from qpipe.testing import plugin_manager

DYNAMIC = [{"name": "dynamic", "quantizer": "tflite.dynamic"}]


def cli(*args: str):
    return CliRunner().invoke(build_app(plugin_manager()), [str(a) for a in args])


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


#: a real ``qpipe run`` process that does the slow imports first, then waits for the start line
LAUNCHER = """
import os, sys, time
from qpipe.tfenv import prepare_environment
prepare_environment()
import mlflow, tensorflow  # noqa: F401 - slow imports out of the way, so the runs truly overlap
from qpipe.cli import main
ready, start = sys.argv[1:3]
open(ready, "w").close()
while not os.path.exists(start):
    time.sleep(0.002)
main(sys.argv[3:])
"""


def start_together(count: int, args: list[str], folder: Path) -> list[subprocess.Popen]:
    """``count`` processes running ``qpipe ARGS``, released at the same instant, just after a
    second begins (so they share it, as runs started together by a script or a CI matrix do)."""
    start = folder / "start"
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCHER, str(folder / f"ready-{i}"), str(start), *args],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(count)]
    deadline = time.monotonic() + 600
    while not all((folder / f"ready-{i}").exists() for i in range(count)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not start"
        time.sleep(0.05)
    time.sleep(1.02 - time.time() % 1)
    start.touch()
    return procs


@pytest.mark.slow
def test_four_concurrent_runs_get_their_own_folders_and_close_their_mlflow_runs(_tiny_session, tmp_path):
    from mlflow import MlflowClient

    project = _tiny_session.copy_to(tmp_path / "project")
    store = f"sqlite:///{tmp_path / 'new-store' / 'mlflow.db'}"  # created by the runs themselves
    pipeline = project.write_pipeline(DYNAMIC, evaluators=["accuracy", "size"],
                                      tracking={"uri": store, "experiment": "together"})
    procs = start_together(4, ["run", str(pipeline)], project.root)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n----\n".join(o[-2000:] for o in outputs)
    folders = sorted((project.root / "runs").iterdir())
    assert len(folders) == 4
    stamps = set()
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        assert results["status"] == "finished"
        assert [(v["name"], v["status"]) for v in results["variants"]] == [("float32", "ok"), ("dynamic", "ok")]
        assert all("accuracy" in v["metrics"] for v in results["variants"])
        assert folder.name == f"tiny-{results['timestamp']}"
        assert (folder / MARKER).is_file() and (folder / "dynamic.tflite").is_file()
        stamps.add(results["timestamp"])
    assert len(stamps) == 4
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("together")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 * 3 and {r.info.status for r in runs} == {"FINISHED"}
    parents = {r.info.run_name for r in runs if r.data.tags.get("qpipe.kind") == "pipeline"}
    assert parents == {f"tiny-{s}" for s in stamps}  # the folder's timestamp names the MLflow run
    assert all("accuracy" in r.data.metrics for r in runs if r.data.tags.get("qpipe.kind") == "variant")


def test_claims_are_atomic(project):
    resolved = resolve(load_config(project.write_pipeline(DYNAMIC)), Registry.from_plugins(plugin_manager()))
    claimed, errors = [], []

    def claim(requested):
        try:
            claimed.append(claim_output(resolved, requested))
        except QpipeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=claim, args=(None,)) for _ in range(8)]
    threads += [threading.Thread(target=claim, args=(project.root / "shared",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    default = [c for c in claimed if c.path.parent.name == "runs"]
    assert len({c.path for c in default}) == 8  # same second, eight folders
    assert [c.path for c in claimed if c.path.name == "shared"] == [project.root / "shared"]  # one winner
    assert len(errors) == 7 and all("shared" in e for e in errors), errors


def test_a_folder_holding_other_files_is_refused_unless_forced(project):
    user = project.root / "mine"
    user.mkdir()
    for name, text in {"pipeline.yaml": "mine: 1\n", "summary.csv": "a,b\n", "model.tflite": "bytes"}.items():
        (user / name).write_text(text)
    before = {p.name: p.read_text() for p in user.iterdir()}
    pipeline = project.write_pipeline(DYNAMIC)
    out = cli("run", pipeline, "--no-tracking", "-o", user)
    assert out.exit_code == 2
    line = one_error_line(out.output)
    assert str(user) in line and "qpipe did not write" in line and "--force" in line
    assert {p.name: p.read_text() for p in user.iterdir()} == before

    dot = project.write_pipeline(DYNAMIC, name="dot.yaml", output={"dir": "."})
    text = dot.read_text()
    out = cli("run", dot, "--no-tracking")
    assert out.exit_code == 2 and "qpipe did not write" in one_error_line(out.output)
    assert dot.read_text() == text and not (project.root / "results.json").exists()

    out = cli("run", pipeline, "--no-tracking", "-o", user, "--force")
    assert out.exit_code == 0, out.output
    assert json.loads((user / "results.json").read_text())["status"] == "finished"
    assert (user / MARKER).is_file()
    out = cli("run", pipeline, "--no-tracking", "-o", user)  # now it holds a qpipe run
    assert out.exit_code == 2 and "already holds a run" in one_error_line(out.output)

    empty = project.root / "empty"
    empty.mkdir()
    out = cli("run", pipeline, "--no-tracking", "-o", empty)
    assert out.exit_code == 0, out.output
    assert (empty / "results.json").is_file()


def test_user_mistakes_exit_2_naming_the_file(project):
    pipeline = project.write_pipeline(DYNAMIC)
    out = cli("run", pipeline, "--no-tracking", "-o", project.data_path)
    assert out.exit_code == 2 and str(project.data_path) in one_error_line(out.output)

    latin = project.root / "latin1.yaml"
    latin.write_bytes(pipeline.read_bytes().replace(b"name: tiny", b"name: tiny # caf\xe9"))
    for command in (("run", latin, "--no-tracking"), ("validate", latin)):
        out = cli(*command)
        assert out.exit_code == 2
        line = one_error_line(out.output)
        assert str(latin) in line and "UTF-8" in line

    run = project.root / "done"
    assert cli("run", pipeline, "--no-tracking", "-o", run).exit_code == 0
    full = (run / "results.json").read_text()
    (run / "results.json").write_text(full[: len(full) // 2])  # a run killed mid-write, or a bad copy
    out = cli("log", run, "--tracking-uri", f"sqlite:///{project.root / 'log.db'}")
    assert out.exit_code == 2
    assert str(run / "results.json") in one_error_line(out.output)


def test_a_read_only_output_folder_is_found_before_the_model_loads():
    """Exit 2 naming the folder; the model (here a file that cannot load) is never touched."""
    root = Path(tempfile.mkdtemp(prefix="qpipe-ro-"))
    try:
        root.chmod(0o755)
        (root / "model.keras").write_bytes(b"not a model")
        (root / "pipeline.yaml").write_text(
            "name: ro\nmodel: {path: model.keras}\ndata: {evaluation: {path: d.npz, inputs: x}}\n"
            "variants: [{name: float32, quantizer: tflite.float32}]\ntracking: false\n")
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        command = [sys.executable, "-m", "qpipe.cli", "run", str(root / "pipeline.yaml"), "-o", str(locked)]
        if os.geteuid() == 0:  # root writes anywhere: run as nobody
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv")
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HOME": str(root)})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = one_error_line(proc.stderr)
        assert str(locked) in line and "not writable" in line
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
