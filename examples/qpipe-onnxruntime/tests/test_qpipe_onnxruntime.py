"""The plugin's own tests, written with qpipe's test kit (qpipe.testing)."""

from __future__ import annotations

import pytest

import qpipe_onnxruntime
from qpipe.registry import Registry
from qpipe.testing import plugin_manager, run_variant, tiny_project


@pytest.fixture
def pm():
    return plugin_manager(qpipe_onnxruntime)  # the built-ins plus this plugin, nothing else


def test_registers_the_quantizers_and_the_backend(pm):
    registry = Registry.from_plugins(pm)
    assert {"ort.float32", "ort.int8", "ort.dynamic"} <= set(registry.names("quantizer"))
    assert registry.get("backend", "onnxruntime").plugin == "qpipe_onnxruntime"


@pytest.mark.parametrize("quantizer", ["ort.int8", "ort.dynamic"])
def test_quantized_onnx_runs_and_keeps_accuracy(tmp_path, pm, quantizer):
    result = run_variant(tiny_project(tmp_path), quantizer, pm=pm, baseline=True)
    assert result.status == "ok", result.error
    assert result.artifact.endswith(".onnx")
    assert result.metrics["accuracy"] >= 0.9
    assert result.metrics["top1_agreement"] >= 0.9  # against the float32 TFLite baseline
    ops = result.metadata["onnx_ops"]
    assert ops.get("QuantizeLinear", 0) + ops.get("DynamicQuantizeLinear", 0) > 0
