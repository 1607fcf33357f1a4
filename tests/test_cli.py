"""The qpipe command line, end to end: run, validate, plugins, --version, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import qpipe
from qpipe import Quantizer
from qpipe.cli import build_app
from qpipe.testing import plugin_manager

QPIPE = [sys.executable, "-m", "qpipe"]  # python -m qpipe is the documented fallback for the script


def qpipe_cli(*args, cwd=None, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*QPIPE, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=full_env,
                          timeout=600)


def assert_one_line_error(proc, code, pattern):
    import re

    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_version():
    proc = qpipe_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qpipe {qpipe.__version__}"


def test_run_writes_results_and_summary(project):
    pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"},
                                       {"name": "dynamic", "quantizer": "tflite.dynamic"}])
    proc = qpipe_cli("run", pipeline, "--output", project.root / "run1", "--only", "int8")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((project.root / "run1" / "results.json").read_text())
    assert results["pipeline"] == "tiny" and results["baseline"] == "float32"
    assert [v["name"] for v in results["variants"]] == ["float32", "int8"]  # --only keeps the baseline
    int8 = results["variants"][1]
    assert set(int8) >= {"name", "quantizer", "status", "error", "metrics", "artifact"}
    assert int8["status"] == "ok" and int8["error"] is None
    assert (project.root / "run1" / int8["artifact"]).is_file()
    for key in ("accuracy", "accuracy_delta", "size_bytes", "size_gzip_bytes", "size_ratio",
                "latency_ms_p50", "latency_ms_p95"):
        assert isinstance(int8["metrics"][key], float), key
    assert "int8" in proc.stdout and "tflite.int8" in proc.stdout  # the summary table


def test_default_output_is_timestamped_and_never_overwritten(project):
    pipeline = project.write_pipeline([])
    first = qpipe_cli("run", pipeline)
    assert first.returncode == 0, first.stderr
    runs = list((project.root / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tiny-")
    again = qpipe_cli("run", pipeline, "--output", runs[0])
    assert_one_line_error(again, 2, "already holds a run; choose another --output")


def test_validate_imports_no_tensorflow(project):
    pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}])
    code = ("import sys\nfrom qpipe.cli import main\n"
            "try:\n    main(['validate', sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('tensorflow', 'mlflow', 'keras', 'tf_keras') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(pipeline)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "ok; 2 variants: float32 (tflite.float32), int8 (tflite.int8); baseline: float32" in lines[0]
    assert lines[-1] == "[]"


def test_plugins_json_lists_builtins_with_versions():
    proc = qpipe_cli("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["plugins"]["tflite"]["version"] == qpipe.__version__
    assert "tflite.int8" in data["plugins"]["tflite"]["components"]["quantizer"]
    assert data["plugins"]["litert"]["components"]["backend"] == ["litert"]
    assert data["load_failures"] == {}
    table = qpipe_cli("plugins")
    assert table.returncode == 0 and "tflite.int8" in table.stdout


@pytest.mark.parametrize("mutation, pattern", [
    (lambda t: t + "variants: [unclosed\n", r"pipeline.yaml:\d+: malformed YAML"),
    (lambda t: t.replace("name: tiny", "name: tiny\nvariantz: []"), r"unknown key 'variantz' \(did you mean 'variants'\?\)"),
    (lambda t: t.replace("quantizer: tflite.int8", "quantizer: tflite.int8\n  options: {per_chanel: true}"),
     r"variants\[1\].options.per_chanel: unknown key 'per_chanel' \(did you mean 'per_channel'\?\)"),
    (lambda t: t.replace("quantizer: tflite.int8", "quantizer: tflite.int3"), r"unknown quantizer 'tflite.int3'.*valid: "),
])
def test_bad_pipelines_fail_in_one_line(project, mutation, pattern):
    pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}])
    pipeline.write_text(mutation(pipeline.read_text()))
    for command in ("validate", "run"):
        assert_one_line_error(qpipe_cli(command, pipeline), 2, pattern)
    assert not (project.root / "runs").exists()


def test_missing_model_and_bad_data_fail_before_writing(project):
    x, y = project_data(project)
    np.savez(project.root / "wrong.npz", x=x.reshape(len(x), 64), y=y)
    np.savez(project.root / "empty.npz", x=x[:0], y=y[:0])
    cases = [
        ({"model": {"path": "missing.keras"}}, r"model: file not found: .*missing.keras"),
        ({"data": {"evaluation": {"path": "wrong.npz"}, "calibration": {"path": "data.npz", "inputs": "x_train"}}},
         r"data.evaluation: input 'image' has shape \(N, 64\) but the model expects \(N, 8, 8, 1\)"),
        ({"data": {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
                   "calibration": {"path": "empty.npz"}}}, r"data.calibration: the data is empty \(0 rows\)"),
    ]
    for sections, pattern in cases:
        pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}], **sections)
        proc = qpipe_cli("run", pipeline, "--output", project.root / "never")
        assert_one_line_error(proc, 2, pattern)
        assert not (project.root / "never").exists()


def project_data(project):
    with np.load(project.data_path, allow_pickle=False) as npz:
        return npz["x_test"], npz["y_test"]


def test_debug_shows_the_traceback(project):
    pipeline = project.write_pipeline([], model={"path": "missing.keras"})
    proc = qpipe_cli("run", pipeline, "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "error: model: file not found" in proc.stderr


class Exploding(Quantizer):
    """Raises during conversion (test plugin)."""

    name = "test.explode"

    def quantize(self, ctx):
        raise RuntimeError("converter exploded on purpose")


class ExplodingPlugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Exploding)


def test_a_failing_quantizer_fails_its_variant_only(project):
    pipeline = project.write_pipeline([{"name": "boom", "quantizer": "test.explode"},
                                       {"name": "dynamic", "quantizer": "tflite.dynamic"}])
    app = build_app(plugin_manager(ExplodingPlugin()))
    result = CliRunner().invoke(app, ["run", str(pipeline), "--output", str(project.root / "out")])
    assert result.exit_code == 1, result.output
    data = json.loads((project.root / "out" / "results.json").read_text())
    status = {v["name"]: (v["status"], v["error"]) for v in data["variants"]}
    assert status["float32"] == ("ok", None) and status["dynamic"] == ("ok", None)
    assert status["boom"][0] == "failed"
    assert "RuntimeError: converter exploded on purpose" in status["boom"][1]
    assert "test.explode (plugin 'ExplodingPlugin-0')" in status["boom"][1]
    assert "1 variant(s) failed: boom" in result.output
    assert "Traceback" not in result.output
