"""Sanity checks on every variant: crafted broken variants get named warnings, healthy ones none,
and ``strict`` turns a warning into a failure."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

import qpipe
from qpipe import Artifact, Expects
from qpipe.results import read_results
from qpipe.sanity import COLLAPSE_RATIO, output_warnings
from qpipe.testing import make_tiny_project, plugin_manager, run_pipeline_file, run_variant, tiny_project


class CraftedOptions(qpipe.Options):
    kind: Literal["nan", "near_constant", "float_as_int8"] = "nan"


class Crafted(qpipe.Quantizer):
    """A real .tflite built to break one check: NaN or near-constant outputs, or the float model
    written under a full-integer claim."""

    name = "test.crafted"
    Options = CraftedOptions

    def quantize(self, ctx: qpipe.QuantizeContext) -> Artifact:
        from qpipe.conversion import float_tflite
        from qpipe.tfenv import tensorflow, tf_keras

        path = ctx.artifact_path(".tflite")
        if self.options.kind == "float_as_int8":
            path.write_bytes(float_tflite(ctx.model))
            return Artifact(path, expects=Expects(smaller=True, quantized_weights=True, full_integer=True))
        k2 = tf_keras()
        model = k2.Sequential([k2.layers.Input((8, 8, 1), name="image"), k2.layers.Flatten(),
                               k2.layers.Dense(4, activation="softmax")])
        kernel, bias = model.layers[-1].get_weights()
        if self.options.kind == "nan":
            kernel[:] = np.nan
        else:  # logits barely depend on the input: every sample gets almost the same output
            kernel[:] = np.random.default_rng(0).normal(0, 1e-3, kernel.shape)
            bias[:] = np.arange(4, dtype=np.float32)
        model.layers[-1].set_weights([kernel, bias])
        path.write_bytes(tensorflow().lite.TFLiteConverter.from_keras_model(model).convert())
        return Artifact(path)


class CraftedPlugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Crafted)


def codes(variant) -> list[str]:
    return [w["code"] for w in variant.warnings]


@pytest.fixture(scope="module")
def checked(tmp_path_factory, _tiny_session):
    """The tiny model with healthy variants and crafted broken ones, under pipeline-wide strict."""
    project = _tiny_session.copy_to(tmp_path_factory.mktemp("sanity"))
    crafted = [{"name": kind, "quantizer": "test.crafted", "options": {"kind": kind}, "strict": False}
               for kind in ("nan", "near_constant", "float_as_int8")]
    path = project.write_pipeline([
        {"name": "int8", "quantizer": "tflite.int8"},
        {"name": "dynamic", "quantizer": "tflite.dynamic", "options": {"engine": "converter"}},
        *crafted,
        {"name": "strict_nan", "quantizer": "test.crafted", "options": {"kind": "nan"}},
    ], evaluators=["accuracy", "size"], strict=True)
    pm = plugin_manager(CraftedPlugin())
    return project, path, pm, run_pipeline_file(path, pm, output=project.root / "out")


def test_healthy_variants_get_no_warning(checked):
    *_, results = checked
    for name in ("float32", "int8", "dynamic"):
        variant = results.variant(name)
        assert variant.status == "ok" and variant.warnings == [], (name, variant.warnings)


def test_each_crafted_variant_gets_its_named_warning(checked):
    *_, results = checked
    assert codes(results.variant("nan")) == ["non-finite-outputs"]
    assert "NaN" in results.variant("nan").warnings[0]["message"]
    assert codes(results.variant("near_constant")) == ["collapsed-outputs"]
    assert "of the baseline's" in results.variant("near_constant").warnings[0]["message"]
    lying = results.variant("float_as_int8")
    assert codes(lying) == ["not-smaller", "float-weights", "float-ops"]
    messages = {w["code"]: w["message"] for w in lying.warnings}
    assert "CONV_2D" in messages["float-weights"] and "FULLY_CONNECTED" in messages["float-weights"]
    assert "KB" in messages["float-weights"] and "full-integer" in messages["float-ops"]
    assert lying.metadata["expects"]["claims"] == ["smaller", "quantized_weights", "full_integer"]
    for name in ("nan", "near_constant", "float_as_int8"):  # strict: false on the variant wins
        assert results.variant(name).status == "ok"


def test_strict_turns_a_warning_into_a_failure(checked):
    *_, results = checked
    failed = results.variant("strict_nan")
    assert failed.status == "failed" and failed.error.startswith("strict: [non-finite-outputs]")
    assert codes(failed) == ["non-finite-outputs"]
    assert results.variant("int8").status == "ok"  # strict, but nothing to warn about


def test_warnings_are_in_results_json_and_the_summaries(checked, capsys):
    from qpipe.display import print_summary

    project, *_ = checked
    out = project.root / "out"
    again = read_results(out)
    assert again.variant("float_as_int8").warnings == checked[-1].variant("float_as_int8").warnings
    summary = (out / "summary.md").read_text()
    assert "Warnings:" in summary and "`collapsed-outputs`" in summary and "1 warning(s)" in summary
    assert "not-smaller" in (out / "summary.csv").read_text()
    print_summary(again)
    printed = capsys.readouterr().out
    assert "nan warning [non-finite-outputs]:" in printed and "ok !3" in printed


def test_a_cache_hit_keeps_the_warnings(checked):
    project, path, pm, first = checked
    second = run_pipeline_file(path, pm, output=project.root / "again")
    lying = second.variant("float_as_int8")
    assert lying.metadata["cache"] == "hit"
    assert lying.warnings == first.variant("float_as_int8").warnings
    assert second.variant("strict_nan").status == "failed"  # strict applies to a cached variant too


def test_int4_names_the_depthwise_weights_it_leaves_in_float(tmp_path):
    from qpipe.tfenv import keras3

    keras = keras3()
    layers = keras.layers
    model = keras.Sequential([layers.Input((8, 8, 1), name="image"), layers.Conv2D(8, 3, padding="same"),
                              layers.DepthwiseConv2D(3, padding="same", name="dw"), layers.Conv2D(16, 1),
                              layers.GlobalAveragePooling2D(), layers.Dense(4, activation="softmax")])
    project = make_tiny_project(tmp_path, model=model)
    path = project.write_pipeline([{"name": "int4", "quantizer": "litert.int4"},
                                   {"name": "int4_strict", "quantizer": "litert.int4", "strict": True}],
                                  evaluators=["size"])
    pm = plugin_manager()
    results = run_pipeline_file(path, pm)
    int4 = results.variant("int4")
    assert int4.status == "ok" and codes(int4) == ["float-weights"]
    assert "/dw" in int4.warnings[0]["message"] and "DEPTHWISE_CONV_2D" in int4.warnings[0]["message"]
    strict = results.variant("int4_strict")
    assert strict.status == "failed" and "[float-weights]" in strict.error
    # --jobs workers get the plugins that check artifacts, so they warn like this process
    from qpipe.config import load_config, resolve
    from qpipe.registry import Registry
    from qpipe.workers import worker_spec

    spec = worker_spec(pm, resolve(load_config(path), Registry.from_plugins(pm)), {})
    assert "litert" in {name for name, _, _ in spec.plugins}


def test_collapse_threshold_is_relative_to_the_baseline():
    rng = np.random.default_rng(0)
    baseline = rng.normal(0, 1, (100, 3))
    spread = np.sqrt(COLLAPSE_RATIO)  # standard deviation at the threshold
    assert output_warnings(baseline * spread * 0.9 + 5, baseline, False)[0]["code"] == "collapsed-outputs"
    assert output_warnings(baseline * spread * 1.1 + 5, baseline, False) == []
    assert output_warnings(np.ones((10, 3)), None, True)[0]["code"] == "collapsed-outputs"  # a constant baseline
    inf = baseline.copy()
    inf[3, 1] = np.inf
    assert "1 Inf" in output_warnings(inf, baseline, False)[0]["message"]


@pytest.mark.slow
def test_qpipe_log_tags_the_mlflow_child_with_its_warnings(checked, tmp_path):
    from typer.testing import CliRunner

    from qpipe.cli import build_app
    from qpipe_mlflow.testing import child_runs, parent_runs, sqlite_store

    project, *_ = checked
    store = sqlite_store(tmp_path / "mlflow.db", tmp_path)
    pm = plugin_manager(CraftedPlugin(), entry_points=["mlflow"])
    out = CliRunner().invoke(build_app(pm), ["log", str(project.root / "out"), "--tracking-uri", store])
    assert out.exit_code == 0, out.output
    (parent,) = parent_runs(store, "tiny")
    kids = child_runs(store, parent)
    tag = kids["float_as_int8"].data.tags["qpipe.warnings"]
    assert tag.startswith("[not-smaller]") and "[float-weights]" in tag and "[float-ops]" in tag
    assert "qpipe.warnings" not in kids["int8"].data.tags
    assert kids["strict_nan"].data.tags["qpipe.status"] == "failed"


class RaisingCheck:
    """A plugin whose artifact check raises: its failure is a named warning, the others still run."""

    @qpipe.hookimpl
    def qpipe_check_artifact(self, artifact, expects):
        raise RuntimeError("cannot parse\n  a long multi-line dump that must not reach results.json")


def test_a_raising_artifact_check_is_a_named_warning_and_the_builtin_check_still_runs(tmp_path):
    project = tiny_project(tmp_path)
    result = run_variant(project, "tflite.int8", pm=plugin_manager(RaisingCheck()), baseline=True, name="int8")
    assert result.status == "ok", result.error
    failed = [w for w in result.warnings if w["code"] == "check-failed"]
    assert len(failed) == 1, result.warnings
    assert failed[0]["message"] == ("plugin 'RaisingCheck-0' could not check the artifact: "
                                    "RuntimeError: cannot parse ...")
    assert not [w for w in result.warnings if w["code"] != "check-failed"]  # the healthy int8 passes litert's check
