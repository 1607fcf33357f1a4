"""Hooks behave like pluggy: every call goes through ``pm.hook`` (hookwrappers, default
arguments, order), and a plugin that raises in a lifecycle or register hook is reported
naming it while the other plugins' implementations still run."""

from __future__ import annotations

import pytest
import yaml

import qpipe
from qpipe import Evaluator, PluginError
from qpipe.config import load_config, resolve
from qpipe.pipeline import run_pipeline
from qpipe.registry import Registry
from qpipe.testing import plugin_manager


def _resolved(project, pm, **sections):
    """Two variants that run the Keras model as it is (no conversion: fast)."""
    variants = [{"name": "reference", "quantizer": "keras.original"}, {"name": "other", "quantizer": "keras.original"}]
    path = project.root / "pipeline.yaml"
    sections.setdefault("evaluators", ["size"])
    path.write_text(yaml.safe_dump(project.pipeline_dict(variants, cache=False, **sections)))
    return resolve(load_config(path), Registry.from_plugins(pm))


class Recorder:
    """Records the calls it gets as (plugin label, hook, detail)."""

    def __init__(self, label: str, calls: list):
        self.label, self.calls = label, calls

    @qpipe.hookimpl
    def qpipe_variant_started(self, variant, note="the impl's default"):
        self.calls.append((self.label, "started", variant, note))

    @qpipe.hookimpl
    def qpipe_variant_progress(self, variant, message="never passed"):
        self.calls.append((self.label, "progress", variant, message))

    @qpipe.hookimpl
    def qpipe_variant_finished(self, result):
        self.calls.append((self.label, "finished", result.name))


class Wrapper:
    """A new-style hookwrapper around ``qpipe_variant_finished``."""

    def __init__(self, calls: list):
        self.calls = calls

    @qpipe.hookimpl(wrapper=True)
    def qpipe_variant_finished(self, result):
        self.calls.append(("wrapper", "before", result.name))
        outcome = yield
        self.calls.append(("wrapper", "after", result.name, outcome))
        return outcome


def test_a_hookwrapper_runs_around_a_lifecycle_hook(project, tmp_path):
    calls: list = []
    pm = plugin_manager(Recorder("rec", calls), Wrapper(calls))
    results, warnings = run_pipeline(pm, _resolved(project, pm), tmp_path / "out")
    assert [v.status for v in results.variants] == ["ok", "ok"] and warnings == []
    around = [c for c in calls if c[1] in ("before", "after", "finished")]
    assert around == [("wrapper", "before", "reference"), ("rec", "finished", "reference"),
                      ("wrapper", "after", "reference", []),
                      ("wrapper", "before", "other"), ("rec", "finished", "other"), ("wrapper", "after", "other", [])]


def test_default_arguments_are_kept_and_spec_arguments_reach_them(project, tmp_path):
    calls: list = []
    pm = plugin_manager(Recorder("rec", calls))
    run_pipeline(pm, _resolved(project, pm), tmp_path / "out")
    started = [c for c in calls if c[1] == "started"]
    assert started == [("rec", "started", "reference", "the impl's default"),
                       ("rec", "started", "other", "the impl's default")]
    progress = {c[3] for c in calls if c[1] == "progress"}
    assert "quantizing" in progress and "never passed" not in progress  # a spec argument with a default is passed


def test_lifecycle_order_is_last_registered_first(project, tmp_path):
    calls: list = []
    pm = plugin_manager(Recorder("first", calls), Recorder("second", calls))
    run_pipeline(pm, _resolved(project, pm), tmp_path / "out")
    assert [c[0] for c in calls if c[1] == "finished"] == ["second", "first", "second", "first"]


class Raises:
    """Raises in ``qpipe_variant_finished`` and ``qpipe_pipeline_started`` (when told to)."""

    def __init__(self, started: bool = False):
        self.started = started

    @qpipe.hookimpl
    def qpipe_pipeline_started(self, run):
        if self.started:
            raise RuntimeError("tracker down\n  with a second line")

    @qpipe.hookimpl(tryfirst=True)
    def qpipe_variant_finished(self, result):
        raise RuntimeError(f"cannot log {result.name}")


class Started:
    def __init__(self, calls: list):
        self.calls = calls

    @qpipe.hookimpl(trylast=True)
    def qpipe_pipeline_started(self, run):
        self.calls.append("started")


def test_one_raising_plugin_does_not_stop_another_plugins_implementation(project, tmp_path):
    calls: list = []
    pm = plugin_manager(Recorder("rec", calls))
    pm.register_plugin(Raises(), "raiser")  # tryfirst: it runs before the recorder
    _, warnings = run_pipeline(pm, _resolved(project, pm), tmp_path / "out")
    assert [c[2] for c in calls if c[1] == "finished"] == ["reference", "other"]
    assert warnings == [f"plugin 'raiser' failed in qpipe_variant_finished: RuntimeError: cannot log {name}"
                        for name in ("reference", "other")]


def test_a_raising_pipeline_started_stops_the_run_after_every_plugin_ran(project, tmp_path):
    calls: list = []
    pm = plugin_manager(Started(calls))
    pm.register_plugin(Raises(started=True), "raiser")
    with pytest.raises(PluginError, match=r"^plugin 'raiser' failed in qpipe_pipeline_started: "
                                          r"RuntimeError: tracker down \.\.\.$"):
        run_pipeline(pm, _resolved(project, pm), tmp_path / "out")
    assert calls == ["started"]


class Twice(Evaluator):
    """Writes a metric another evaluator also writes (test plugin)."""

    name = "test.twice"

    def evaluate(self, ctx):
        return {"size_bytes": 1.0}


class TwicePlugin:
    @qpipe.hookimpl
    def qpipe_register_evaluators(self, register):
        register(Twice)


def test_duplicate_metric_keys_fail_the_variant_naming_both_evaluators(project, tmp_path):
    pm = plugin_manager()
    pm.register_plugin(TwicePlugin(), "twice")
    results, _ = run_pipeline(pm, _resolved(project, pm, evaluators=["size", "test.twice"]), tmp_path / "out")
    assert [v.status for v in results.variants] == ["failed", "failed"]
    assert results.variants[0].error == (
        "metric 'size_bytes' is written by two evaluators: 'size' (plugin 'metrics') and 'test.twice' "
        "(plugin 'twice'); remove one of them from the pipeline's evaluators")
    assert results.variants[0].metrics == {}


class Wraps:
    """A hookwrapper on a register hook sees every plugin's registration run inside it."""

    def __init__(self, calls: list):
        self.calls = calls

    @qpipe.hookimpl(wrapper=True)
    def qpipe_register_evaluators(self, register):
        self.calls.append("before")
        result = yield
        self.calls.append("after")
        return result


def test_register_hooks_go_through_pluggy_and_isolate_a_raising_plugin():
    class Bad:
        @qpipe.hookimpl(tryfirst=True)
        def qpipe_register_evaluators(self, register):
            register(Twice)
            raise KeyError("gpu")

    calls: list = []
    pm = plugin_manager(Wraps(calls))
    pm.register_plugin(Bad(), "bad")
    registry = Registry.from_plugins(pm)
    assert calls == ["before", "after"]
    assert registry.failures == {"bad": "plugin 'bad' raised in qpipe_register_evaluators: KeyError: 'gpu'"}
    assert "test.twice" not in registry.names("evaluator")  # what it registered before raising is dropped
    assert {"accuracy", "size"} <= set(registry.names("evaluator"))  # the others registered after it ran
