"""``qpipe new-plugin NAME``: the package it writes installs, registers and passes its own tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from qpipe.cli import build_app
from qpipe.registry import Registry
from qpipe.testing import overlay_venv, plugin_manager


def new_plugin(*args: str):
    return CliRunner().invoke(build_app(plugin_manager()), ["new-plugin", *args])


def test_new_plugin_writes_a_package_with_an_entry_point(tmp_path, monkeypatch):
    out = new_plugin("conf_metrics", "--dir", str(tmp_path))
    assert out.exit_code == 0, out.output
    root = tmp_path / "qpipe-conf-metrics"
    assert f"created {root}" in out.output
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "qpipe-conf-metrics"
    assert pyproject["project"]["entry-points"]["qpipe"] == {"conf_metrics": "qpipe_conf_metrics"}
    assert (root / "tests" / "test_qpipe_conf_metrics.py").is_file()
    # the module registers its evaluator with the options it documents
    monkeypatch.syspath_prepend(str(root / "src"))
    import qpipe_conf_metrics

    entry = Registry.from_plugins(plugin_manager(qpipe_conf_metrics)).get("evaluator", "conf_metrics.confidence")
    assert entry.cls.Options(threshold=0.7).threshold == 0.7


@pytest.mark.parametrize("name, message", [
    ("My-Plugin", "plugin name 'My-Plugin' is not valid: use lower-case letters"),
    ("tflite", "a plugin named 'tflite' is already installed; choose another name"),
])
def test_bad_names_are_one_line_errors(tmp_path, name, message):
    out = new_plugin(name, "--dir", str(tmp_path))
    assert out.exit_code == 2
    assert out.output.strip().startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "qpipe-mine").mkdir()
    (tmp_path / "qpipe-mine" / "keep.txt").write_text("mine")
    out = new_plugin("mine", "--dir", str(tmp_path))
    assert out.exit_code == 2 and "already exists and is not empty" in out.output
    assert (tmp_path / "qpipe-mine" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_scaffolded_package_installs_and_its_own_tests_pass(tmp_path):
    assert new_plugin("hello_metrics", "--dir", str(tmp_path)).exit_code == 0
    root = tmp_path / "qpipe-hello-metrics"
    python = overlay_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("QPIPE_DISABLE_PLUGINS", "PYTHONPATH")}
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                          str(root)], capture_output=True, text=True, env=env)
    assert pip.returncode == 0, pip.stderr
    listing = subprocess.run([str(python), "-m", "qpipe.cli", "plugins", "--json"], capture_output=True,
                             text=True, env=env, check=True)
    plugin = json.loads(listing.stdout)["plugins"]["hello_metrics"]
    assert plugin["distribution"] == "qpipe-hello-metrics"
    assert plugin["components"] == {"evaluator": ["hello_metrics.confidence"]}
    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root,
                           capture_output=True, text=True, env=env)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "3 passed" in tests.stdout
    # this environment is untouched: the plugin is not installed here
    here = subprocess.run([sys.executable, "-m", "qpipe.cli", "plugins", "--json"], capture_output=True,
                          text=True, env=env, check=True)
    assert "hello_metrics" not in json.loads(here.stdout)["plugins"]
