"""The third-party example examples/qpipe-onnxruntime: ONNX Runtime variants beside TFLite ones.

The package is loaded through its own entry point, either from a fake distribution (the
in-process tests) or installed into a virtual environment (the slow test), never into this
environment, where its components would leak into every other test's plugin manager.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qpipe import ConfigError
from qpipe.config import load_config, resolve
from qpipe.plugins import get_plugin_manager
from qpipe.registry import Registry
from qpipe.testing import TinyProject, fake_distribution, install_editable, overlay_venv, run_pipeline_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qpipe-onnxruntime"

VARIANTS = [
    {"name": "tflite-int8", "quantizer": "tflite.int8"},
    {"name": "ort-float32", "quantizer": "ort.float32"},
    {"name": "ort-int8", "quantizer": "ort.int8"},
    {"name": "ort-int8-qop", "quantizer": "ort.int8",
     "options": {"format": "qoperator", "per_channel": False, "activations": "uint8"}},
    {"name": "ort-int8-entropy", "quantizer": "ort.int8", "options": {"method": "entropy"}},
    {"name": "ort-int8-percentile", "quantizer": "ort.int8", "options": {"method": "percentile"}},
    {"name": "ort-dynamic", "quantizer": "ort.dynamic"},
]


def _entry_points() -> dict[str, str]:
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]["qpipe"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example's entry point visible through a fake distribution (as if pip-installed)."""
    site = tmp_path_factory.mktemp("site")
    fake_distribution(site, "qpipe-onnxruntime", _entry_points(), version="0.1.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.syspath_prepend(str(EXAMPLE / "src"))
        mp.delenv("QPIPE_DISABLE_PLUGINS", raising=False)
        yield


def _copy_project(source: TinyProject, dest: Path) -> TinyProject:
    dest.mkdir(parents=True, exist_ok=True)
    for f in (source.model_path, source.data_path):
        shutil.copy(f, dest / f.name)
    return TinyProject(dest, dest / source.model_path.name, dest / source.data_path.name)


@pytest.fixture(scope="module")
def side_by_side(installed, _tiny_session, tmp_path_factory):
    """One pipeline: the float32 TFLite baseline, TFLite int8 and four ONNX Runtime variants."""
    from qpipe_mlflow.testing import sqlite_store

    project = _copy_project(_tiny_session, tmp_path_factory.mktemp("ort"))
    uri = sqlite_store(project.root / "mlflow.db", cache=tmp_path_factory.getbasetemp())
    pm = get_plugin_manager()  # every installed plugin, the way `qpipe run` builds it
    path = project.write_pipeline(VARIANTS, cache=False, tracking={"experiment": "tflite-vs-ort"})
    return pm, run_pipeline_file(path, pm, settings={"tracking_uri": uri}), uri


def test_the_plugin_loads_through_its_entry_point(side_by_side):
    pm, _, _ = side_by_side
    assert "onnxruntime" not in pm.load_failures
    info = pm.infos["onnxruntime"]
    assert (info.distribution, info.version, info.module) == ("qpipe-onnxruntime", "0.1.0", "qpipe_onnxruntime")
    registry = Registry.from_plugins(pm)
    assert {"ort.float32", "ort.int8", "ort.dynamic"} <= set(registry.names("quantizer"))
    assert registry.get("backend", "onnxruntime").plugin == "onnxruntime"


def test_tflite_and_onnxruntime_variants_run_side_by_side(side_by_side):
    _, results, _ = side_by_side
    assert [v.name for v in results.variants] == ["float32"] + [v["name"] for v in VARIANTS]
    for v in results.variants:
        assert v.status == "ok", f"{v.name}: {v.error}"
        assert v.metrics["accuracy"] >= 0.9, v.name
        assert v.metrics["top1_agreement"] >= 0.95, v.name  # against the float32 TFLite baseline
        for key in ("size_bytes", "latency_ms_p50", "accuracy_delta", "mean_abs_error"):
            assert key in v.metrics, (v.name, key)
        ort = v.quantizer.startswith("ort.")
        assert v.artifact.endswith(".onnx" if ort else ".tflite")
        assert v.backend["name"] == ("onnxruntime" if ort else "litert")


def test_onnx_conversion_is_faithful_and_quantization_is_real(side_by_side):
    _, results, _ = side_by_side
    ort_float = results.variant("ort-float32")
    assert ort_float.metrics["max_abs_error"] < 1e-4  # tf2onnx reproduces the float model
    assert ort_float.metadata["converter"].startswith("tf2onnx ")
    static, qop, dynamic = results.variant("ort-int8"), results.variant("ort-int8-qop"), results.variant("ort-dynamic")
    assert static.metadata["onnx_ops"]["QuantizeLinear"] > 0 and "Conv" in static.metadata["onnx_ops"]
    assert static.metadata["calibration"] == {"samples": 50, "method": "minmax"}
    assert results.variant("ort-int8-entropy").metadata["calibration"]["method"] == "entropy"
    # the calibration method reaches onnxruntime: percentile clips ranges, so the model differs
    out = Path(results.extra["pipeline_file"]).parent / "out"
    assert (out / "ort-int8-percentile.onnx").read_bytes() != (out / static.artifact).read_bytes()
    assert any(op.startswith("QLinear") for op in qop.metadata["onnx_ops"])
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(dynamic.metadata["onnx_ops"])
    for quantized in (static, qop, dynamic):
        assert 0 < quantized.metrics["max_abs_error"] < 0.5
        assert quantized.metrics["size_bytes"] < ort_float.metrics["size_bytes"]
    # the tf2onnx conversion ran once and was shared by the ONNX variants
    assert len({v.metadata["onnx_convert_seconds"] for v in (ort_float, static, qop, dynamic)}) == 1


def test_onnx_variants_are_tracked_in_mlflow_like_the_builtins(side_by_side):
    from mlflow import MlflowClient

    _, results, uri = side_by_side
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tflite-vs-ort")
    runs = client.search_runs([experiment.experiment_id])
    children = {r.data.tags.get("mlflow.runName"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {v.name for v in results.variants}
    parents = {r.data.tags["mlflow.parentRunId"] for r in children.values()}
    assert len(parents) == 1
    tflite, ort = children["tflite-int8"], children["ort-int8"]
    for run, quantizer, backend in ((tflite, "tflite.int8", "litert"), (ort, "ort.int8", "onnxruntime")):
        assert run.info.status == "FINISHED"
        assert run.data.params["quantizer"] == quantizer and run.data.params["backend"] == backend
        assert run.data.metrics["accuracy"] == pytest.approx(results.variant(run.data.tags["mlflow.runName"]).metrics["accuracy"])
    # the same metric names on both, so MLflow's compare view lines them up
    assert {"accuracy", "size_bytes", "latency_ms_p50", "top1_agreement"} <= set(ort.data.metrics) & set(tflite.data.metrics)
    assert ort.data.params["quantizer.method"] == "minmax"
    assert "ort-int8.onnx" in {a.path for a in client.list_artifacts(ort.info.run_id)}


def test_a_keras3_model_converts_too(installed, _tiny_keras3_session, tmp_path):
    project = _copy_project(_tiny_keras3_session, tmp_path / "k3")
    path = project.write_pipeline([{"name": "ort-int8", "quantizer": "ort.int8"}], cache=False,
                                  evaluators=["accuracy", "fidelity"])
    results = run_pipeline_file(path, get_plugin_manager())
    assert results.variant("ort-int8").status == "ok", results.variant("ort-int8").error
    assert results.variant("ort-int8").metrics["top1_agreement"] >= 0.95


def test_mismatched_backend_and_bad_options_fail_at_validation(installed, project):
    registry = Registry.from_plugins(get_plugin_manager())
    path = project.write_pipeline([{"name": "x", "quantizer": "ort.int8", "backend": "litert"}])
    with pytest.raises(ConfigError, match="backend 'litert' runs tflite artifacts, but ort.int8 produces onnx"):
        resolve(load_config(path), registry)
    path = project.write_pipeline([{"name": "x", "quantizer": "ort.int8", "options": {"activations": "int4"}}])
    with pytest.raises(ConfigError, match=r"variants\[1\]\.options\.activations"):
        resolve(load_config(path), registry)


def test_a_missing_dependency_is_a_load_failure_naming_the_plugin(installed, project, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as if tf2onnx were not installed
                        lambda name, *args: None if name == "tf2onnx" else real_find_spec(name, *args))
    monkeypatch.delitem(sys.modules, "qpipe_onnxruntime", raising=False)
    pm = get_plugin_manager()
    assert pm.load_failures["onnxruntime"].startswith("ImportError: qpipe-onnxruntime needs tf2onnx")
    path = project.write_pipeline([{"name": "x", "quantizer": "ort.int8"}])
    with pytest.raises(ConfigError, match=r"unknown quantizer 'ort.int8'.*note: plugin 'onnxruntime' failed "
                                          r"to load: ImportError: qpipe-onnxruntime needs tf2onnx"):
        resolve(load_config(path), Registry.from_plugins(pm))
    # the rest keep working
    assert "tflite.int8" in Registry.from_plugins(pm).names("quantizer")


@pytest.mark.slow
def test_installed_into_a_venv_it_runs_from_the_cli_and_passes_its_own_tests(project, tmp_path):
    """pip install -e the example into a fresh venv (seeing this one's packages), then use it
    the way a team would: qpipe plugins, qpipe run, and the package's own pytest suite."""
    python = overlay_venv(tmp_path / "venv")
    env = install_editable(python, EXAMPLE)

    qpipe = [str(python), "-m", "qpipe.cli"]
    listing = json.loads(subprocess.run(qpipe + ["plugins", "--json"], capture_output=True, text=True,
                                        env=env, check=True).stdout)
    assert listing["plugins"]["onnxruntime"]["distribution"] == "qpipe-onnxruntime"
    assert listing["plugins"]["onnxruntime"]["components"]["quantizer"] == ["ort.dynamic", "ort.float32", "ort.int8"]

    path = project.write_pipeline([{"name": "tflite-int8", "quantizer": "tflite.int8"},
                                   {"name": "ort-int8", "quantizer": "ort.int8"}], cache=False)
    run = subprocess.run(qpipe + ["run", str(path), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=project.root)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {v["name"]: v["status"] for v in results["variants"]} == {
        "float32": "ok", "tflite-int8": "ok", "ort-int8": "ok"}
    assert "ort-int8" in run.stdout and "tflite-int8" in run.stdout  # one summary table

    tests = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "3 passed" in tests.stdout
