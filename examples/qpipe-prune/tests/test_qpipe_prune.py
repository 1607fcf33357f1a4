"""The plugin's own tests, written with qpipe's test kit (qpipe.testing)."""

from __future__ import annotations

import pytest

import qpipe_prune
from qpipe.testing import plugin_manager, run_variant, tiny_project


@pytest.fixture
def pm():
    return plugin_manager(qpipe_prune)  # the built-ins plus this plugin, nothing else


def test_pruned_int8_reaches_its_sparsity_and_keeps_accuracy(tmp_path, pm):
    result = run_variant(tiny_project(tmp_path), "prune.int8", {"epochs": 2, "sparsity": 0.5}, pm=pm,
                         training=True, evaluators=["accuracy", {"name": "top_k", "options": {"k": 2}}])
    assert result.status == "ok", result.error
    assert 0.45 <= result.metrics["sparsity"] <= 0.55
    assert result.metrics["accuracy"] >= 0.8
    assert result.metrics["top2_accuracy"] >= result.metrics["accuracy"]
