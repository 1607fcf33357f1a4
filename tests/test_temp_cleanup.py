"""Nothing left behind: every temporary file a `qpipe` command (and the converter's child
process, and MLflow) makes lives in one folder removed when the command ends, whether the
run succeeded, had a failed variant, was refused, was interrupted while the model loaded, or
saw the converter's process crash.

Each run is the real CLI in a child process with ``TMPDIR`` pointed at a folder of the test's
own, so the count is exact whatever else the machine runs: it must be empty afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpipe.cli import EXIT_GATE_FAILED

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

#: the CLI with the installed plugins plus one whose quantizer crashes the converter's process
#: after that process has written into its temp folder
DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from crashing import CrashingPlugin, LeaveAndCrash
from qpipe.cli import main
from qpipe.testing import plugin_manager
main(sys.argv[1:], plugin_manager(CrashingPlugin(LeaveAndCrash())))
"""


def _cli(tmp_path: Path, args: list[str], interrupt_after: str | None = None) -> tuple[int, str, list[str]]:
    """Run the CLI with a private TMPDIR; (exit code, stderr, what is left in that TMPDIR)."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(system_tmp), PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}:{ROOT / 'plugins'}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER.format(tests=str(ROOT / "tests")), *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a test runner may ignore SIGINT (pytest-xdist's workers do); a child
                            # would inherit that and never see the Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    if interrupt_after is not None:  # wait for the progress line (on stderr), then Ctrl-C
        assert proc.stderr is not None
        for line in proc.stderr:
            seen += line
            if interrupt_after in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, seen + err, sorted(p.name for p in system_tmp.iterdir())


def test_a_tracked_run_with_a_crashed_converter_and_a_failed_variant_leaves_nothing(project, tmp_path):
    path = project.write_pipeline([
        {"name": "dynamic", "quantizer": "tflite.dynamic"},
        {"name": "crash", "quantizer": "test.crashing", "options": {"engine": "converter"}},
        {"name": "int8", "quantizer": "tflite.int8"},
        {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1}},
    ], tracking={"experiment": "leftovers"}, cache=False, data={
        "evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
        "calibration": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"},
        "training": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}})
    code, err, left = _cli(tmp_path, ["run", str(path), "-o", str(tmp_path / "out")])
    assert code == 1, err  # the crashed variant failed; the others ran
    assert "crash" in err or (tmp_path / "out" / "results.json").is_file()
    assert left == [], f"left in the temp folder: {left}"
    code, err, left = _cli(tmp_path, ["log", str(tmp_path / "out")])
    assert left == [], f"qpipe log left in the temp folder: {left} ({err[-300:]})"


def test_a_run_that_fails_its_gate_leaves_nothing(project, tmp_path):
    path = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], cache=False,
                                  constraints=["accuracy_delta >= 0.5"])  # no variant can gain 50 points
    code, err, left = _cli(tmp_path, ["run", str(path), "--no-tracking", "--gate"])
    assert code == EXIT_GATE_FAILED, err
    assert left == [], f"left in the temp folder: {left}"


def test_an_interrupted_run_leaves_nothing(project, tmp_path):
    path = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"},
                                   {"name": "int8", "quantizer": "tflite.int8"}], cache=False)
    code, err, left = _cli(tmp_path, ["run", str(path), "--no-tracking"], interrupt_after="variants ->")
    assert code == 130, err
    assert left == [], f"left in the temp folder: {left}"
