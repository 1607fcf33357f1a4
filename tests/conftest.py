"""Shared fixtures: tiny real models (trained once per session) copied into each test's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpipe.tfenv import prepare_environment

prepare_environment()

from qpipe.testing import TinyProject, make_tiny_project, plugin_manager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No tracking server, disabled plugins or trace from the developer's shell leaks in."""
    for var in ("MLFLOW_TRACKING_URI", "QPIPE_DISABLE_PLUGINS", "QPIPE_TRACE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def _tiny_session(tmp_path_factory) -> TinyProject:
    return make_tiny_project(tmp_path_factory.mktemp("tiny"), flavor="tf_keras")


@pytest.fixture(scope="session")
def _tiny_keras3_session(tmp_path_factory) -> TinyProject:
    return make_tiny_project(tmp_path_factory.mktemp("tiny3"), flavor="keras3")


@pytest.fixture
def project(_tiny_session, tmp_path) -> TinyProject:
    """A tiny trained tf_keras model and its data in this test's own folder."""
    return _tiny_session.copy_to(tmp_path / "project")


@pytest.fixture
def keras3_project(_tiny_keras3_session, tmp_path) -> TinyProject:
    """The same with a Keras 3 model."""
    return _tiny_keras3_session.copy_to(tmp_path / "project3")


@pytest.fixture
def pm():
    """A fresh plugin manager holding only the built-in plugins."""
    return plugin_manager()
