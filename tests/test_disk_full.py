"""A disk that fills during a run ends it with a true record: exit 74 and one line naming the
cause, results.json rewritten to say ``crashed`` (from the space the output folder's marker
set aside for it), every MLflow run ended, no half-written file. A folder without room for
that reserve is refused before anything runs.

The output folder is a small tmpfs mounted for the test (root only; skipped elsewhere); the
MLflow store is on the normal disk, as a team's tracking server would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size at a fresh folder; unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{size}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _run(project, tmp_path, output: Path) -> subprocess.CompletedProcess:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"},
                                   {"name": "int8", "quantizer": "tflite.int8"},
                                   {"name": "float16", "quantizer": "tflite.float16"}],
                                  cache=False, tracking={"experiment": "full", "uri": uri})
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'plugins'}")
    return subprocess.run([sys.executable, "-m", "qpipe", "run", str(path), "-o", str(output)],
                          capture_output=True, text=True, env=env, timeout=600)


def _open_runs(tmp_path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("full")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_a_disk_that_fills_mid_run_ends_it_with_a_true_record(project, tmp_path, small_disk):
    output = small_disk("320k") / "out"  # the reserve, the pipeline and a few .tflite files fit
    proc = _run(project, tmp_path, output)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 74, proc.stderr[-800:]
    assert last.startswith("error: no space left on the device") and "--output" in last, last
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    record = json.loads((output / "results.json").read_text())
    assert record["status"] == "crashed", record["status"]
    assert "No space left" in record["extra"]["error"]
    assert record["variants"] and record["variants"][0]["status"] == "ok"  # what ran before is kept
    assert not list(output.glob("*.tmp")), "a half-written file was left"
    assert _open_runs(tmp_path) == [], "an MLflow run was left RUNNING"


def test_a_folder_without_room_for_the_record_is_refused_before_anything_runs(project, tmp_path, small_disk):
    disk = small_disk("128k")
    proc = _run(project, tmp_path, disk / "out")
    assert proc.returncode == 2, proc.stderr[-800:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "needs at least 256 KB free" in last and "--output" in last, last
    assert list(disk.iterdir()) == [], "the refused run left files behind"
    assert _open_runs(tmp_path) == []
