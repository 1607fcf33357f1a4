"""Pipeline validation: key paths, YAML lines, suggestions; component options against their schema."""

from __future__ import annotations

import textwrap

import pytest

from qpipe.config import load_config, resolve
from qpipe.errors import ConfigError, QpipeError
from qpipe.registry import Registry

GOOD = """\
name: demo
model:
  path: model.keras
data:
  evaluation: {path: data.npz, inputs: x_test, labels: y_test}
  calibration: {path: data.npz, inputs: x_train}
variants:
  - name: float32
    quantizer: tflite.float32
  - name: int8
    quantizer: tflite.int8
    options:
      io: int8
      per_channel: false
tracking: false
"""


def write(tmp_path, text, name="pipeline.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def resolve_text(tmp_path, pm, text, only=None):
    return resolve(load_config(write(tmp_path, text)), Registry.from_plugins(pm), only)


def test_good_pipeline_resolves_with_defaults(tmp_path, pm):
    resolved = resolve_text(tmp_path, pm, GOOD)
    assert resolved.baseline == "float32"
    int8 = next(rv for rv in resolved.variants if rv.config.name == "int8")
    assert int8.quantizer.component.options.per_channel is False
    assert int8.calibrator.component.name == "sample"
    assert int8.backend.component.name == "litert"
    assert [e.component.name for e in resolved.evaluators] == ["accuracy", "regression", "fidelity", "size", "storage",
                                                            "latency"]  # those that apply to the task run
    assert resolved.config.tracking.enabled is False


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: demo\nmodel: [unclosed\nvariants: []\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:\d+: malformed YAML"):
        load_config(path)


def test_unknown_top_level_key_suggests_and_names_line(tmp_path):
    path = write(tmp_path, GOOD + "evaluater: [accuracy]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith("pipeline.yaml:16: evaluater: unknown key 'evaluater' (did you mean 'evaluators'?)")


def test_unknown_nested_key_has_its_path(tmp_path):
    path = write(tmp_path, GOOD.replace("labels: y_test}", "label: y_test}"))
    with pytest.raises(ConfigError, match=r"pipeline.yaml:5: data.evaluation.label: unknown key 'label' \(did you mean 'labels'\?\)"):
        load_config(path)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, GOOD.replace("    quantizer: tflite.float32\n", ""))
    with pytest.raises(ConfigError, match=r"pipeline.yaml:8: variants\[0\].quantizer: required key is missing"):
        load_config(path)


def test_unknown_option_of_a_component_suggests_the_closest(tmp_path, pm):
    text = GOOD.replace("per_channel: false", "per_chanel: false")
    with pytest.raises(ConfigError) as err:
        resolve_text(tmp_path, pm, text)
    assert str(err.value).startswith(
        "pipeline.yaml:14: variants[1].options.per_chanel: unknown key 'per_chanel' (did you mean 'per_channel'?); "
        "valid keys: io, per_channel")


def test_bad_option_value(tmp_path, pm):
    text = GOOD.replace("io: int8", "io: int4")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:13: variants\[1\].options.io: Input should be 'int8', 'uint8' or 'float32'"):
        resolve_text(tmp_path, pm, text)


def test_unknown_component_lists_valid_ones(tmp_path, pm):
    text = GOOD.replace("quantizer: tflite.int8", "quantizer: tflite.int7")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:11: variants\[1\].quantizer: unknown quantizer 'tflite.int7' \(did you mean 'tflite.int8'\?\); valid: "):
        resolve_text(tmp_path, pm, text)


def test_unknown_evaluator_and_calibrator(tmp_path, pm):
    with pytest.raises(ConfigError, match=r"evaluators\[0\]: unknown evaluator 'acuracy' \(did you mean 'accuracy'\?\)"):
        resolve_text(tmp_path, pm, GOOD + "evaluators: [acuracy]\n")
    with pytest.raises(ConfigError, match=r"calibrator: unknown calibrator 'sampel'"):
        resolve_text(tmp_path, pm, GOOD + "calibrator: sampel\n")


def test_calibrator_on_a_quantizer_that_needs_none(tmp_path, pm):
    text = GOOD.replace("    quantizer: tflite.float32\n", "    quantizer: tflite.float32\n    calibrator: sample\n")
    with pytest.raises(ConfigError, match=r"variants\[0\].calibrator: tflite.float32 does not use a calibrator"):
        resolve_text(tmp_path, pm, text)


def test_calibrating_quantizer_without_calibration_data(tmp_path, pm):
    text = GOOD.replace("  calibration: {path: data.npz, inputs: x_train}\n", "")
    with pytest.raises(ConfigError, match=r"needs calibration data: add data.calibration"):
        resolve_text(tmp_path, pm, text)


def test_backend_that_cannot_run_the_artifact(tmp_path, pm):
    text = GOOD.replace("    quantizer: tflite.float32\n", "    quantizer: tflite.float32\n    backend: keras\n")
    with pytest.raises(ConfigError, match=r"backend 'keras' runs keras artifacts, but tflite.float32 produces tflite"):
        resolve_text(tmp_path, pm, text)


def test_duplicate_variant_names_and_unknown_baseline(tmp_path):
    with pytest.raises(ConfigError, match="variant name 'float32' is used twice"):
        load_config(write(tmp_path, GOOD.replace("name: int8", "name: float32")))
    with pytest.raises(ConfigError, match=r"pipeline.yaml:16: baseline: unknown baseline variant 'fp32'"):
        load_config(write(tmp_path, GOOD + "baseline: fp32\n"))


def test_model_needs_path_or_function(tmp_path):
    with pytest.raises(ConfigError, match="model: model needs exactly one of 'path' or 'function'"):
        load_config(write(tmp_path, GOOD.replace("  path: model.keras\n", "  safe_mode: true\n")))
    with pytest.raises(ConfigError, match="function must look like 'package.module:function'"):
        load_config(write(tmp_path, GOOD.replace("  path: model.keras\n", "  function: not a ref\n")))


def test_backend_defaults_merge_with_variant_options(tmp_path, pm):
    text = GOOD + "backends:\n  litert: {threads: 1, batch_size: 32}\n"
    text = text.replace("    quantizer: tflite.float32\n",
                        "    quantizer: tflite.float32\n    backend: {name: litert, options: {batch_size: 8}}\n")
    resolved = resolve_text(tmp_path, pm, text)
    float32 = resolved.variants[0].backend.component.options
    int8 = resolved.variants[1].backend.component.options
    assert (float32.threads, float32.batch_size) == (1, 8)
    assert (int8.threads, int8.batch_size) == (1, 32)


def test_only_filters_variants_but_keeps_the_baseline(tmp_path, pm):
    text = GOOD + "  - {name: dyn, quantizer: tflite.dynamic}\n".replace("  - ", "  - ")
    text = GOOD.replace("tracking: false\n", "") + "  - {name: dyn, quantizer: tflite.dynamic}\n"
    resolved = resolve_text(tmp_path, pm, text, only=["dyn"])
    assert [rv.config.name for rv in resolved.variants] == ["float32", "dyn"]
    with pytest.raises(QpipeError, match=r"unknown variant 'dyn2' \(did you mean 'dyn'\?\).*--only"):
        resolve_text(tmp_path, pm, text, only=["dyn2"])


def test_baseline_runs_first(tmp_path, pm):
    text = GOOD + "baseline: int8\n"
    resolved = resolve_text(tmp_path, pm, text)
    assert [rv.config.name for rv in resolved.variants] == ["int8", "float32"]


def test_root_pipeline_is_valid(pm):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    resolved = resolve(load_config(root / "pipeline.yaml"), Registry.from_plugins(pm))
    names = {rv.config.quantizer for rv in resolved.variants}
    assert {"tflite.float32", "tflite.dynamic", "tflite.float16", "tflite.int8", "tflite.int16x8"} <= names
