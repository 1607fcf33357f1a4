"""keras.bfloat16: bfloat16 weights (and activations) simulated in Keras, size = bfloat16 weight bytes."""

from __future__ import annotations

import numpy as np

from qpipe.testing import plugin_manager, run_pipeline_file


def test_bfloat16_rounding_is_nearest_even():
    from qpipe_keras.bfloat16 import from_bfloat16, to_bfloat16

    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, np.inf, 0.0], dtype=np.float32)
    back = from_bfloat16(to_bfloat16(values))
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
    assert back.tolist()[:4] == [1.0, 1.0, 1.015625, -2.5]
    assert back[5] == np.inf and back[6] == 0.0
    assert np.isnan(from_bfloat16(to_bfloat16(np.array([np.nan], dtype=np.float32))))[0]
    rng = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert np.max(np.abs(from_bfloat16(to_bfloat16(rng)) - rng) / np.abs(rng)) <= 2 ** -8


def test_bfloat16_variant_reports_accuracy_size_and_says_simulated(tmp_path, keras3_project):
    from qpipe.tfenv import keras3

    from qpipe_keras.bfloat16 import KerasBfloat16

    path = keras3_project.write_pipeline([
        {"name": "float32", "quantizer": "tflite.float32"},
        {"name": "bf16", "quantizer": "keras.bfloat16"},
        {"name": "bf16_act", "quantizer": "keras.bfloat16", "options": {"activations": True}},
    ], evaluators=["accuracy", "size"], constraints=["accuracy_delta >= -0.05"])
    results = run_pipeline_file(path, plugin_manager(), output=tmp_path / "out")
    assert {v.name: v.error for v in results.variants if v.status != "ok"} == {}
    params = keras3().saving.load_model(keras3_project.model_path).count_params()
    for name in ("bf16", "bf16_act"):
        variant = results.variant(name)
        assert variant.metrics["size_bytes"] == 2 * params == variant.metrics["bfloat16_weight_bytes"]
        assert variant.metrics["accuracy_delta"] >= -0.05
        assert variant.metadata["simulated"] is True and "not a deployable .tflite" in variant.metadata["note"]
        assert "simulated" in KerasBfloat16.summary() and variant.quantizer == "keras.bfloat16"
    assert results.variant("bf16_act").metadata["activations"] == "bfloat16"
    # the smallest "size", but nothing to ship: never the selected variant
    assert results.selected["variant"] is None
    assert results.selected["rejected"]["bf16"].startswith("simulated, not a deployable artifact")


def test_mixed_bfloat16_clone_computes_in_bfloat16(keras3_project):
    from qpipe.tfenv import keras3

    from qpipe_keras.bfloat16 import mixed_bfloat16_clone

    model = keras3().saving.load_model(keras3_project.model_path)
    clone = mixed_bfloat16_clone(model)
    assert {layer.compute_dtype for layer in clone.layers if layer.weights} == {"bfloat16"}
    assert keras3().config.dtype_policy().name == "float32"  # the global policy is restored
