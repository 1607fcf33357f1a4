"""Every built-in converter quantizer on a real model, checked inside the produced .tflite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from qpipe.testing import run_pipeline_file


@pytest.fixture(scope="module")
def converted(tmp_path_factory, _tiny_session):
    """Run every converter quantizer once on the tiny model; share the output folder."""
    from qpipe.testing import plugin_manager

    root = tmp_path_factory.mktemp("quantizers")
    project = _tiny_session.copy_to(root)
    path = project.write_pipeline([
        {"name": "dynamic", "quantizer": "tflite.dynamic"},
        {"name": "float16", "quantizer": "tflite.float16"},
        {"name": "int8", "quantizer": "tflite.int8"},
        {"name": "int8_float_io", "quantizer": "tflite.int8", "options": {"io": "float32"}},
        {"name": "int8_uint8_io", "quantizer": "tflite.int8", "options": {"io": "uint8"}},
        {"name": "int8_per_tensor", "quantizer": "tflite.int8", "options": {"per_channel": False}},
        {"name": "int16x8", "quantizer": "tflite.int16x8"},
        {"name": "int16x8_int16_io", "quantizer": "tflite.int16x8", "options": {"io": "int16"}},
        {"name": "dynamic_conv", "quantizer": "tflite.dynamic", "options": {"engine": "converter"}},
        {"name": "float16_conv", "quantizer": "tflite.float16", "options": {"engine": "converter"}},
        {"name": "int8_conv", "quantizer": "tflite.int8", "options": {"engine": "converter"}},
        {"name": "int8_aeq", "quantizer": "tflite.int8", "options": {"engine": "ai-edge-quantizer"}},
        {"name": "int16x8_aeq", "quantizer": "tflite.int16x8",
         "options": {"io": "int16", "engine": "ai-edge-quantizer"}},
        {"name": "int8_aeq_float_io", "quantizer": "tflite.int8",
         "options": {"io": "float32", "engine": "ai-edge-quantizer"}},
    ])
    results = run_pipeline_file(path, plugin_manager(), output=root / "out")
    return root / "out", results


def test_all_variants_ok_and_accurate(converted):
    out, results = converted
    failed = {v.name: v.error for v in results.variants if v.status != "ok"}
    assert failed == {"int8_aeq_float_io": "engine ai-edge-quantizer cannot give float32 input/output "
                                            "(its models take int8); use engine: converter or auto"}
    results.variants = [v for v in results.variants if v.status == "ok"]
    base = results.variant("float32").metrics["accuracy"]
    assert base > 0.9
    for v in results.variants:
        assert v.metrics["accuracy"] >= base - 0.05, v.name
        assert (out / v.artifact).is_file()
    on_disk = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in on_disk["variants"]][0] == "float32"
    assert on_disk["baseline"] == "float32"


def _io(path):
    interpreter = Interpreter(model_path=str(path))
    return interpreter.get_input_details()[0], interpreter.get_output_details()[0]


def _weights(path):
    """Constant tensors with two or more dimensions (the conv and dense kernels)."""
    interpreter = Interpreter(model_path=str(path))
    ops = interpreter._get_ops_details()
    produced = {i for op in ops for i in op["outputs"]}
    model_inputs = {d["index"] for d in interpreter.get_input_details()}
    details = interpreter.get_tensor_details()
    constants = {i for op in ops for i in op["inputs"] if i >= 0 and i not in produced and i not in model_inputs}
    return [details[i] for i in sorted(constants) if len(details[i]["shape"]) >= 2]


def test_float32_has_float_weights_and_io(converted):
    out, _ = converted
    inp, outp = _io(out / "float32.tflite")
    assert inp["dtype"] == np.float32 and outp["dtype"] == np.float32
    assert {d["dtype"] for d in _weights(out / "float32.tflite")} == {np.float32}


def test_dynamic_stores_int8_weights_with_float_io(converted):
    out, _ = converted
    inp, _ = _io(out / "dynamic.tflite")
    assert inp["dtype"] == np.float32
    assert np.int8 in {d["dtype"] for d in _weights(out / "dynamic.tflite")}


def test_float16_stores_half_weights(converted):
    out, results = converted
    assert np.float16 in {d["dtype"] for d in _weights(out / "float16.tflite")}
    assert results.variant("float16").metrics["size_ratio"] > 1.5  # tiny model: fixed overhead weighs more


def test_int8_io_types(converted):
    out, _ = converted
    assert [d["dtype"] for d in _io(out / "int8.tflite")] == [np.int8, np.int8]
    assert [d["dtype"] for d in _io(out / "int8_float_io.tflite")] == [np.float32, np.float32]
    assert [d["dtype"] for d in _io(out / "int8_uint8_io.tflite")] == [np.uint8, np.uint8]
    assert [d["dtype"] for d in _io(out / "int16x8_int16_io.tflite")] == [np.int16, np.int16]
    assert [d["dtype"] for d in _io(out / "int16x8.tflite")] == [np.float32, np.float32]


def _conv_scales(path):
    interpreter = Interpreter(model_path=str(path))
    ops = interpreter._get_ops_details()
    conv = next(op for op in ops if op["op_name"] == "CONV_2D")
    weight = interpreter.get_tensor_details()[conv["inputs"][1]]
    return weight["quantization_parameters"]["scales"], weight["dtype"]


def test_per_channel_vs_per_tensor_weight_scales(converted):
    out, _ = converted
    per_channel, dtype = _conv_scales(out / "int8.tflite")
    per_tensor, _ = _conv_scales(out / "int8_per_tensor.tflite")
    assert dtype == np.int8
    assert len(per_channel) == 8  # one scale per output channel of Conv2D(8)
    assert len(per_tensor) == 1


def test_int16x8_has_int16_activations(converted):
    out, _ = converted
    interpreter = Interpreter(model_path=str(out / "int16x8.tflite"))
    dtypes = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.int16 in dtypes and np.int8 in dtypes


def test_sizes_shrink_as_expected(converted):
    _, results = converted
    m = {v.name: v.metrics for v in results.variants}
    assert m["int8"]["size_bytes"] < m["float16"]["size_bytes"] < m["float32"]["size_bytes"]
    assert m["float32"]["size_ratio"] == pytest.approx(1.0)
    assert m["int8"]["size_ratio"] == pytest.approx(m["float32"]["size_bytes"] / m["int8"]["size_bytes"])
    assert m["int8"]["size_bytes_delta"] == pytest.approx(m["int8"]["size_bytes"] - m["float32"]["size_bytes"])


def test_convert_once_engines(converted):
    """auto follows docs/engines.md: float16 from ai-edge-quantizer, dynamic from the converter,
    full-integer from both engines (the closer to float kept) where the options allow both."""
    _, results = converted
    engine = {v.name: v.metadata.get("engine") for v in results.variants}
    reason = {v.name: v.metadata.get("engine_reason", "") for v in results.variants}
    assert engine["float32"] == "tflite-converter"
    for name in ("float16", "int8_aeq", "int16x8_aeq"):
        assert engine[name] == "ai-edge-quantizer", name
    for name in ("int8", "int8_per_tensor", "int16x8_int16_io"):
        assert "both engines quantized it" in reason[name], name
    for name in ("dynamic", "int8_float_io", "int8_uint8_io", "int16x8", "dynamic_conv", "float16_conv", "int8_conv"):
        assert engine[name] == "tflite-converter", name
    assert reason["int8_float_io"] == "auto: ai-edge-quantizer cannot give float32 input/output (its models take int8)"
    assert results.variant("float32").metadata["conversion"] == "converted"
    for ours, theirs in (("dynamic", "dynamic_conv"), ("float16", "float16_conv"), ("int8", "int8_conv")):
        assert results.variant(ours).metrics["accuracy"] >= results.variant(theirs).metrics["accuracy"] - 0.02


def test_auto_variants_are_as_close_to_float_as_the_converters(converted):
    """What auto picks is as faithful as the converter's; int8 calibrated with global min/max.

    ai-edge-quantizer's own per-sample moving average of min/max clipped activations: 16x
    the converter's int8 mean error on this model.
    """
    _, results = converted
    ours, theirs = results.variant("int8").metrics, results.variant("int8_conv").metrics
    for key in ("mean_abs_error", "max_abs_error"):
        assert ours[key] <= 1.05 * theirs[key] + 1e-6, key
    assert results.variant("float16").metrics["mean_abs_error"] <= 2 * results.variant("float16_conv").metrics["mean_abs_error"] + 1e-4
    assert results.variant("dynamic").metrics["mean_abs_error"] <= 3 * results.variant("dynamic_conv").metrics["mean_abs_error"] + 1e-3
