"""The third-party example examples/qpipe-prune, loaded through its entry point like an
installed package: TF-MOT pruning then int8, and a top-k evaluator, beside the built-ins.

Written only against qpipe's public API (tests/test_architecture.py checks its imports too).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qpipe.testing import fake_distribution, run_pipeline_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "qpipe-prune"
TRAIN = {"epochs": 2, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def results(tmp_path_factory, _tiny_session):
    """One pipeline: float32 baseline, tflite.int8, and prune.int8 at 50% and 80% sparsity."""
    entry_points = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]["qpipe"]
    site = tmp_path_factory.mktemp("site")
    fake_distribution(site, "qpipe-prune", entry_points, version="0.1.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.syspath_prepend(str(EXAMPLE / "src"))
        mp.delenv("QPIPE_DISABLE_PLUGINS", raising=False)
        from qpipe.testing import plugin_manager

        pm = plugin_manager(entry_points=["prune"])
        project = _tiny_session.copy_to(tmp_path_factory.mktemp("prune"))
        data = project.pipeline_dict([])["data"]
        data["training"] = {"path": project.data_path.name, "inputs": "x_train", "labels": "y_train"}
        path = project.write_pipeline([
            {"name": "int8", "quantizer": "tflite.int8"},
            {"name": "pruned-50", "quantizer": "prune.int8", "options": {**TRAIN, "sparsity": 0.5}},
            {"name": "pruned-80", "quantizer": "prune.int8", "options": {**TRAIN, "sparsity": 0.8}},
        ], cache=False, data=data,
            evaluators=["accuracy", "size", {"name": "top_k", "options": {"k": 2}},
                        {"name": "top_k", "options": {"k": 4}}])
        yield run_pipeline_file(path, pm)


def test_pruned_variants_reach_their_sparsity_and_stay_accurate(results):
    for name, target in (("pruned-50", 0.5), ("pruned-80", 0.8)):
        v = results.variant(name)
        assert v.status == "ok", v.error
        assert abs(v.metrics["sparsity"] - target) < 0.05, (name, v.metrics["sparsity"])
        assert v.metrics["accuracy"] >= (0.9 if target == 0.5 else 0.6), (name, v.metrics["accuracy"])
        assert v.metadata["target_sparsity"] == target
        assert not [w for w in v.warnings if w["code"] in ("float-ops", "float-weights")], v.warnings
    assert "sparsity" not in results.variant("int8").metrics
    assert results.variant("pruned-80").metrics["size_bytes"] <= results.variant("float32").metrics["size_bytes"] / 2


def test_top_k_is_between_top_1_and_all_classes(results):
    for v in results.variants:
        assert v.status == "ok", v.error
        assert v.metrics["accuracy"] <= v.metrics["top2_accuracy"] <= 1.0
        assert v.metrics["top4_accuracy"] == 1.0  # the tiny project has 4 classes


def test_pruning_worked_on_a_copy_so_the_other_variants_are_unchanged(results):
    # the host fails a variant that changed the shared model; the float baseline after a
    # pruning run still measures the model as loaded
    assert results.variant("float32").metrics["accuracy"] >= 0.9


@pytest.mark.slow
def test_installed_into_a_venv_it_is_listed_and_passes_its_own_tests(tmp_path):
    """pip install -e the example into a venv that sees this one's packages, as a team would."""
    import json
    import subprocess

    from qpipe.testing import install_editable, overlay_venv

    python = overlay_venv(tmp_path / "venv")
    env = install_editable(python, EXAMPLE)
    listing = json.loads(subprocess.run([str(python), "-m", "qpipe", "plugins", "--json"], capture_output=True,
                                        text=True, env=env, check=True).stdout)
    assert listing["plugins"]["prune"]["components"]["quantizer"] == ["prune.int8"]
    assert listing["plugins"]["prune"]["components"]["evaluator"] == ["top_k"]
    own = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], capture_output=True,
                         text=True, env=env, cwd=EXAMPLE, timeout=900)
    assert own.returncode == 0, own.stdout[-3000:]
