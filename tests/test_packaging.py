"""The built wheel carries the host, every built-in plugin and their entry points."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = {"keras": "qpipe_keras", "tflite": "qpipe_tflite", "litert": "qpipe_litert",
            "calibration": "qpipe_calibration", "metrics": "qpipe_metrics", "mlflow": "qpipe_mlflow",
            "tfmot": "qpipe_tfmot", "tflm": "qpipe_tflm"}


@pytest.mark.slow
def test_wheel_contains_plugins_and_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    wheel = next(tmp_path.glob("qpipe-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(entry_points).decode())
    assert "qpipe/hookspecs.py" in names and "qpipe/cli.py" in names
    for module in BUILTINS.values():
        assert f"{module}/__init__.py" in names, module
    assert "qpipe_tflm/probe.py" in names  # the TFLM worker is started from its file
    assert dict(parser["qpipe"]) == BUILTINS
    assert parser["console_scripts"]["qpipe"] == "qpipe.cli:entry"
    assert not any(n.startswith(("tests/", "examples/")) for n in names)
