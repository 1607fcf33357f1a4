"""TFLite Micro: the tflm backend, the micro evaluator, budgets as constraints, the example."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from qpipe import Artifact
from qpipe.cli import build_app
from qpipe.testing import plugin_manager, run_pipeline_file

pytest.importorskip("tflite_micro")

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [
    {"name": "int8", "quantizer": "tflite.int8", "options": {"io": "int8"}},
    {"name": "int8-tflm", "quantizer": "tflite.int8", "options": {"io": "int8"}, "backend": "tflm"},
    {"name": "dynamic", "quantizer": "tflite.dynamic"},
    {"name": "dynamic-tflm", "quantizer": "tflite.dynamic", "backend": "tflm"},
]
# the tiny model has ~5k weights: ~20 KB as float32, ~8.5 KB as int8
BUDGETS = ["micro_compatible == 1", "flash_bytes <= 12000", "arena_bytes <= 4096"]


def micro_pm():
    return plugin_manager(entry_points=("tflm",))


@pytest.fixture(scope="module")
def run(_tiny_session, tmp_path_factory):
    project = _tiny_session.copy_to(tmp_path_factory.mktemp("micro"))
    pipeline = project.write_pipeline(VARIANTS, evaluators=["accuracy", "micro"], cache=False,
                                      objective={"maximize": "accuracy"}, constraints=BUDGETS,
                                      tracking={"experiment": "micro-test"})
    return project, run_pipeline_file(pipeline, micro_pm(), output=project.root / "out")


def test_full_integer_model_runs_in_tflm_like_litert(run):
    project, results = run
    int8, in_tflm = results.variant("int8"), results.variant("int8-tflm")
    assert int8.status == "ok" and in_tflm.status == "ok", (int8.error, in_tflm.error)
    assert int8.metrics["micro_compatible"] == 1.0
    assert int8.metrics["micro_max_diff_steps"] <= 1.0
    path = project.root / "out" / int8.artifact
    assert int8.metrics["flash_bytes"] == path.stat().st_size
    assert int8.metadata["micro_ops"][0] == "CONV_2D" and "FULLY_CONNECTED" in int8.metadata["micro_ops"]
    assert int8.metrics["micro_ops"] == len(set(int8.metadata["micro_ops"]))
    # the two backends on the same file: outputs within one output quantization step
    from ai_edge_litert.interpreter import Interpreter
    from qpipe_litert import LiteRTBackend, LiteRTOptions
    from qpipe_tflm import TFLMBackend

    with np.load(project.data_path, allow_pickle=False) as npz:
        data = {"image": npz["x_test"][:100].astype(np.float32)}
    artifact = Artifact(path, "tflite")
    micro = TFLMBackend().load(artifact).predict_batch(data)
    litert = LiteRTBackend(LiteRTOptions(xnnpack=False)).load(artifact).predict_batch(data)
    scale, _ = Interpreter(model_path=str(path)).get_output_details()[0]["quantization"]
    assert micro.shape == litert.shape == (100, 4)
    assert np.max(np.abs(micro - litert)) <= scale * 1.0001


def test_dynamic_range_model_is_not_micro_compatible_with_tflm_reason(run):
    _, results = run
    dynamic = results.variant("dynamic")
    assert dynamic.status == "ok"  # LiteRT runs it; TFLite Micro does not
    assert dynamic.metrics["micro_compatible"] == 0.0
    assert "arena_bytes" not in dynamic.metrics
    reason = dynamic.metadata["micro_reason"]
    assert "Hybrid models are not supported on TFLite Micro" in reason or "not supported" in reason, reason
    assert "\n" not in reason
    failed = results.variant("dynamic-tflm")  # the tflm backend cannot load it: the variant fails
    assert failed.status == "failed"
    assert failed.error.startswith("TFLite Micro cannot run dynamic-tflm.tflite: ") and reason in failed.error
    assert results.variant("float32").status == "ok"


PROBE = """
import sys, numpy as np
from tflite_micro.python.tflite_micro import runtime
it = runtime.Interpreter.from_file(sys.argv[1], arena_size=int(sys.argv[2]))
d = it.get_input_details(0)
it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
it.invoke()
print("allocated")
"""


def allocates(path: Path, arena: int) -> bool:
    """Independent of qpipe: TFLM in a fresh process (a too-small arena can crash it)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), str(arena)], capture_output=True,
                          text=True, timeout=120)
    return proc.returncode == 0 and "allocated" in proc.stdout


def test_arena_bytes_is_the_smallest_arena_that_works(run):
    project, results = run
    for name in ("int8", "float32"):
        v = results.variant(name)
        arena = int(v.metrics["arena_bytes"])
        assert arena % v.metadata["micro_arena"]["alignment"] == 0
        path = project.root / "out" / v.artifact
        assert allocates(path, arena), (name, arena)
        assert not allocates(path, arena - 1024), (name, arena)
        assert not allocates(path, arena - v.metadata["micro_arena"]["alignment"]), (name, arena)
    assert results.variant("int8").metrics["arena_bytes"] < results.variant("float32").metrics["arena_bytes"]


def test_unsupported_op_is_named_and_a_crashing_arena_is_survived(run, tmp_path):
    from qpipe_tflm import TFLMBackend
    from qpipe_tflm.arena import Prober

    from qpipe import QpipeError
    from qpipe.tfenv import tensorflow

    tf = tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([1, 16], tf.float32)])
    def top3(x):
        return tf.math.top_k(x, 3).values

    path = tmp_path / "topk.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([top3.get_concrete_function()], top3).convert())
    with pytest.raises(QpipeError, match=r"TFLite Micro cannot run topk.tflite: .*'TOPK_V2'"):
        TFLMBackend().load(Artifact(path, "tflite"))
    project, results = run
    int8 = results.variant("int8")
    with Prober(project.root / "out" / int8.artifact) as prober:
        tiny = prober.attempt(16)  # TFLM crashes (SIGSEGV) on some too-small arenas
        assert not tiny.ok and tiny.reason
        assert prober.attempt(int(int8.metrics["arena_bytes"])).ok  # a new worker if the last one died


def test_budgets_select_the_variant_that_fits(run):
    _, results = run
    selected = results.selected
    assert selected["variant"] == "int8", selected
    assert "flash_bytes" in selected["rejected"]["float32"]
    assert "micro_compatible = 0" in selected["rejected"]["dynamic"]


def test_gate_fails_when_no_variant_fits_the_budget(run, tmp_path):
    project, _ = run
    project = project.copy_to(tmp_path / "gate")
    pipeline = project.write_pipeline([VARIANTS[0]], evaluators=["micro"], cache=False,
                                      constraints=["arena_bytes <= 1024"])
    result = CliRunner().invoke(build_app(micro_pm()), ["run", str(pipeline), "--gate", "--no-tracking",
                                                        "--output", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    gate = json.loads((tmp_path / "out" / "results.json").read_text())["gate"]
    assert gate["passed"] is False and "arena_bytes" in gate["failures"]["int8"]


def test_micro_metrics_arrive_in_mlflow(run, tmp_path, tmp_path_factory):
    from qpipe_mlflow.testing import child_runs, parent_runs, sqlite_store

    _, results = run
    store = sqlite_store(tmp_path / "mlflow.db", tmp_path_factory.getbasetemp())  # migrated once per session
    app = build_app(plugin_manager(entry_points=("tflm", "mlflow")))
    out = CliRunner().invoke(app, ["log", str(Path(results.extra["pipeline_file"]).parent / "out"),
                                   "--tracking-uri", store])
    assert out.exit_code == 0, out.output
    (parent,) = parent_runs(store, "micro-test")
    kids = child_runs(store, parent)
    for name in ("float32", "int8"):
        logged, measured = kids[name].data.metrics, results.variant(name).metrics
        for metric in ("arena_bytes", "flash_bytes", "micro_ops", "micro_compatible", "micro_max_abs_diff"):
            assert logged[metric] == pytest.approx(measured[metric]), (name, metric)
    assert kids["dynamic"].data.metrics["micro_compatible"] == 0.0 and "arena_bytes" not in kids["dynamic"].data.metrics


def test_missing_tflite_micro_is_one_line_with_the_install_command(project, monkeypatch):
    pipeline = project.write_pipeline([VARIANTS[0]], evaluators=["micro"])
    monkeypatch.setitem(sys.modules, "tflite_micro", None)  # as if not installed
    result = CliRunner().invoke(build_app(micro_pm()), ["validate", str(pipeline)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "pip install qpipe[micro]" in errors[0], result.output


def test_plugin_import_does_not_import_tflite_micro():
    code = "import sys, qpipe_tflm, qpipe_tflm.evaluator; assert 'tflite_micro' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_example_prints_arena_and_flash_per_variant(tmp_path):
    example = tmp_path / "micro"
    shutil.copytree(ROOT / "examples" / "micro", example)
    proc = subprocess.run([sys.executable, "-m", "qpipe.cli", "run", "pipeline.yaml", "--no-tracking", "--gate",
                           "--only", "int8", "--only", "dynamic", "--output", "out"],
                          cwd=example, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((example / "out" / "results.json").read_text())
    assert results["selected"]["variant"] == "int8"
    header = next(line for line in proc.stdout.splitlines() if "variant" in line and "arena" in line)
    assert "flash" in header
    for v in results["variants"]:
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"│ {v['name']} "))
        assert f"{v['metrics']['flash_bytes'] / 1024:.1f} KB" in row
        if "arena_bytes" in v["metrics"]:
            assert f"{v['metrics']['arena_bytes'] / 1024:.1f} KB" in row
    config = yaml.safe_load((example / "pipeline.yaml").read_text())
    assert "arena_bytes <= 65536" in config["constraints"] and "flash_bytes <= 262144" in config["constraints"]
