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
from qpipe.testing import plugin_manager


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


@pytest.mark.parametrize("kind, component", [
    ("quantizer", "q_demo.dynamic"), ("calibrator", "q_demo.first"), ("backend", "q_demo.reference"),
])
def test_every_kind_registers_its_component_under_the_entry_point_name(tmp_path, monkeypatch, kind, component):
    out = new_plugin("q_demo", "--kind", kind, "--dir", str(tmp_path))
    assert out.exit_code == 0, out.output
    root = tmp_path / "qpipe-q-demo"
    test_source = (root / "tests" / "test_qpipe_q_demo.py").read_text()
    assert 'plugin == "q_demo"' in test_source  # the entry-point name, not the module name
    monkeypatch.syspath_prepend(str(root / "src"))
    module = __import__("qpipe_q_demo")
    try:
        assert Registry.from_plugins(plugin_manager(module)).get(kind, component)
    finally:
        sys.modules.pop("qpipe_q_demo", None)


def test_an_unknown_kind_is_a_one_line_error(tmp_path):
    out = new_plugin("mine", "--kind", "tracker", "--dir", str(tmp_path))
    assert out.exit_code == 2
    assert out.output.strip() == ("error: --kind 'tracker' is not valid; choose one of: "
                                  "evaluator, quantizer, calibrator, backend")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_every_scaffolded_kind_installs_and_its_own_tests_pass(tmp_path):
    """The documented path: plugin-venv, pip install -e ., pytest -- for each kind."""
    env = {k: v for k, v in os.environ.items() if k not in ("QPIPE_DISABLE_PLUGINS", "PYTHONPATH")}
    venv = subprocess.run([sys.executable, "-m", "qpipe", "plugin-venv", str(tmp_path / "venv")],
                          capture_output=True, text=True, env=env)
    assert venv.returncode == 0, venv.stderr
    python, qpipe_script = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "qpipe"
    roots = []
    for kind in ("evaluator", "quantizer", "calibrator", "backend"):
        made = subprocess.run([str(qpipe_script), "new-plugin", f"my_{kind}", "--kind", kind, "--dir", str(tmp_path)],
                              capture_output=True, text=True, env=env)
        assert made.returncode == 0, made.stderr
        roots.append(tmp_path / f"qpipe-my-{kind}")
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                              str(roots[-1])], capture_output=True, text=True, env=env)
        assert pip.returncode == 0, pip.stderr
    listing = subprocess.run([str(qpipe_script), "plugins", "--json"], capture_output=True, text=True, env=env,
                             check=True)
    plugins = json.loads(listing.stdout)["plugins"]
    assert plugins["my_evaluator"]["distribution"] == "qpipe-my-evaluator"
    assert plugins["my_evaluator"]["components"] == {"evaluator": ["my_evaluator.confidence"]}
    assert plugins["my_quantizer"]["components"] == {"quantizer": ["my_quantizer.dynamic"]}
    assert plugins["my_calibrator"]["components"] == {"calibrator": ["my_calibrator.first"]}
    assert plugins["my_backend"]["components"] == {"backend": ["my_backend.reference"]}
    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *(str(root / "tests") for root in roots)], cwd=tmp_path, capture_output=True,
                           text=True, env=env)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "12 passed" in tests.stdout
    # this environment is untouched: the plugins are not installed here
    here = subprocess.run([sys.executable, "-m", "qpipe", "plugins", "--json"], capture_output=True,
                          text=True, env=env, check=True)
    assert not any(name.startswith("my_") for name in json.loads(here.stdout)["plugins"])
