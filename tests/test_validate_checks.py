"""``qpipe validate`` (and ``run``, before loading anything) refuses what would only fail at run
time: metric names no evaluator measures, ``fallback: auto`` without constraints, a training
quantizer without training data, a misspelled range estimator."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qpipe.cli import build_app
from qpipe.testing import plugin_manager

INT8 = {"name": "int8", "quantizer": "tflite.int8"}


def validate(path):
    result = CliRunner().invoke(build_app(plugin_manager()), ["validate", str(path)])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    return result.exit_code, errors, result.output


@pytest.mark.parametrize("variants, sections, pattern", [
    ([INT8], {"constraints": ["mea_delta <= 1"], "evaluators": ["regression", "size"]},
     r"constraints\[0\]: no evaluator measures 'mea_delta' \(did you mean 'mae_delta'\?\).*measure: .*mae, "),
    ([INT8], {"constraints": ["acuracy_delta >= -0.01"]},
     r"no evaluator measures 'acuracy_delta' \(did you mean 'accuracy_delta'\?\)"),
    ([INT8], {"objective": {"maximize": "size_ration"}},
     r"objective.maximize: no evaluator measures 'size_ration' \(did you mean 'size_ratio'\?\)"),
    ([INT8], {"constraints": ["latency_ms_p50 <= 1"], "evaluators": ["accuracy", "size"]},
     r"no evaluator measures 'latency_ms_p50'.*the evaluators \(accuracy, size\) measure: accuracy, "),
    ([{**INT8, "options": {"fallback": "auto"}}], {},
     r"variants\[1\].options: variant 'int8' \(tflite.int8\) searches until the pipeline's constraints hold, "
     r"but none are declared"),
    ([{"name": "qat", "quantizer": "tfmot.qat"}], {},
     r"data: variant 'qat' \(tfmot.qat\) trains the model: add data.training"),
    ([INT8], {"calibrator": {"name": "sample", "options": {"estimator": "percentil"}}},
     r"calibrator.options.estimator: unknown estimator 'percentil' \(did you mean 'percentile'\?\)"),
    ([INT8], {"calibrator": {"name": "sample", "options": {"estimator": {"name": "percentile",
                                                                          "options": {"pct": 99}}}}},
     r"estimator 'percentile' has no option 'pct'; valid: percentile"),
])
def test_validate_refuses_what_would_fail_at_run_time(project, variants, sections, pattern):
    import re

    code, errors, output = validate(project.write_pipeline(variants, **sections))
    assert code == 2 and len(errors) == 1, output
    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("variants, sections", [
    ([INT8], {"constraints": ["mae_delta <= 1", "accuracy_delta >= -0.01"],  # default evaluators: either task
              "evaluators": None}),
    ([{**INT8, "options": {"fallback": "auto"}}], {"constraints": ["accuracy_delta >= -0.01"]}),
    ([INT8], {"calibrator": {"name": "sample", "options": {"estimator": {"name": "percentile",
                                                                          "options": {"percentile": 99}}}}}),
    ([INT8], {"objective": {"minimize": "quantize_seconds"}, "constraints": ["top3_accuracy_delta >= 0"],
              "evaluators": [{"name": "accuracy", "options": {"top_k": [3]}}]}),
])
def test_what_the_pipeline_can_measure_passes(project, variants, sections):
    path = project.write_pipeline(variants, **sections)
    if sections.get("evaluators", []) is None:  # drop the key: the default evaluators
        path.write_text(path.read_text().replace("evaluators: null\n", ""))
    code, errors, output = validate(path)
    assert code == 0, output


def test_run_refuses_before_writing_anything(project):
    path = project.write_pipeline([{"name": "qat", "quantizer": "tfmot.qat"}])
    result = CliRunner().invoke(build_app(plugin_manager()), ["run", str(path), "--output", str(project.root / "out")])
    assert result.exit_code == 2 and "add data.training" in result.output
    assert not (project.root / "out").exists()


def test_metrics_a_quantizer_declares_may_be_constrained(project):
    path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8", "options": {"fallback": "auto"}}],
                                  constraints=["accuracy_delta >= -0.01", "fallback_float_layers <= 2"])
    code, errors, output = validate(path)
    assert code == 0, output
