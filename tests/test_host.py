"""The plugin host: fresh managers, plugins defined in a test, registry errors that name plugins."""

from __future__ import annotations

import re

import pytest

import qpipe
from qpipe import PluginError, QpipeError, Quantizer
from qpipe.hookspecs import hook_names
from qpipe.plugins import get_plugin_manager
from qpipe.registry import Registry
from qpipe.testing import plugin_manager


class Copy(Quantizer):
    """Copies the float32 artifact of another conversion (test plugin)."""

    name = "test.copy"

    def quantize(self, ctx):
        raise NotImplementedError("only registered, never run")


class CopyPlugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Copy)


def test_entry_points_load_every_builtin():
    pm = get_plugin_manager()
    assert {"keras", "tflite", "litert", "calibration", "metrics"} <= set(pm.infos)
    assert pm.load_failures == {}
    registry = Registry.from_plugins(pm)
    assert {"tflite.float32", "tflite.dynamic", "tflite.float16", "tflite.int8", "tflite.int16x8"} <= set(
        registry.names("quantizer"))
    assert {"litert", "keras"} <= set(registry.names("backend"))
    assert {"accuracy", "regression", "fidelity", "size", "latency"} <= set(registry.names("evaluator"))
    assert "sample" in registry.names("calibrator")
    # built-ins come from the qpipe distribution, through the entry-point group
    assert pm.infos["tflite"].distribution == "qpipe"


def test_plugin_defined_in_a_test_registers_a_component(pm):
    pm.register_plugin(CopyPlugin(), "copy-plugin")
    registry = Registry.from_plugins(pm)
    assert registry.get("quantizer", "test.copy").plugin == "copy-plugin"
    assert registry.get("quantizer", "test.copy").cls is Copy


def test_each_manager_is_fresh():
    first = plugin_manager(CopyPlugin())
    second = plugin_manager()
    assert "test.copy" in Registry.from_plugins(first).names("quantizer")
    assert "test.copy" not in Registry.from_plugins(second).names("quantizer")


def test_misspelled_hook_is_rejected_naming_the_plugin(pm):
    class Typo:
        @qpipe.hookimpl
        def qpipe_register_quantiser(self, register):
            pass

    with pytest.raises(PluginError, match="plugin 'typo'.*qpipe_register_quantiser"):
        pm.register_plugin(Typo(), "typo")


def test_duplicate_component_names_name_both_plugins(pm):
    class Other:
        @qpipe.hookimpl
        def qpipe_register_quantizers(self, register):
            class Int8Again(Copy):
                name = "tflite.int8"

            register(Int8Again)

    pm.register_plugin(Other(), "other")
    registry = Registry.from_plugins(pm)  # a collision does not stop the rest
    assert "tflite.dynamic" in registry.names("quantizer")
    assert "tflite.int8" not in registry.names("quantizer")
    assert "quantizer 'tflite.int8'" in registry.problems()
    with pytest.raises(PluginError, match="'tflite.int8' is registered twice: by plugin 'tflite' and by plugin "
                                          "'other'; disable one with QPIPE_DISABLE_PLUGINS=other"):
        registry.get("quantizer", "tflite.int8")


def test_register_hook_that_raises_names_the_plugin(pm):
    class Broken:
        @qpipe.hookimpl
        def qpipe_register_evaluators(self, register):
            raise RuntimeError("boom")

    pm.register_plugin(Broken(), "broken")
    registry = Registry.from_plugins(pm)  # listed like a failed import; the others still work
    assert registry.failures == {"broken": "plugin 'broken' raised in qpipe_register_evaluators: RuntimeError: boom"}
    assert "accuracy" in registry.names("evaluator")
    with pytest.raises(QpipeError, match="unknown evaluator 'broken.x'.*note: plugin 'broken' failed to register: "
                                         "plugin 'broken' raised in qpipe_register_evaluators: RuntimeError: boom"):
        registry.get("evaluator", "broken.x")


def test_a_component_without_its_method_is_refused_at_registration(pm):
    class Lazy:
        @qpipe.hookimpl
        def qpipe_register_quantizers(self, register):
            class NoQuantize(Quantizer):
                name = "lazy.q"

            register(NoQuantize)

    pm.register_plugin(Lazy(), "lazy")
    registry = Registry.from_plugins(pm)
    assert registry.failures["lazy"] == ("plugin 'lazy': quantizer 'lazy.q' (NoQuantize) does not implement "
                                         "quantize(); every quantizer must")
    assert "lazy.q" not in registry.names("quantizer")


def test_registering_a_non_component_is_an_error(pm):
    class Wrong:
        @qpipe.hookimpl
        def qpipe_register_backends(self, register):
            register(Copy)  # a quantizer is not a backend

    pm.register_plugin(Wrong(), "wrong")
    assert re.match("plugin 'wrong' registered .* as a backend", Registry.from_plugins(pm).failures["wrong"])


def test_unknown_name_suggests_the_closest(pm):
    registry = Registry.from_plugins(pm)
    with pytest.raises(QpipeError, match=r"unknown quantizer 'tflite.int9' \(did you mean 'tflite.int8'\?\); valid: .*tflite.float16"):
        registry.get("quantizer", "tflite.int9")


def test_disabled_plugins_are_not_loaded(monkeypatch):
    monkeypatch.setenv("QPIPE_DISABLE_PLUGINS", "metrics, calibration")
    pm = get_plugin_manager()
    assert "metrics" not in pm.infos and "calibration" not in pm.infos
    assert "tflite" in pm.infos


def test_every_hook_has_a_docstring():
    from qpipe import hookspecs

    for name in hook_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_host_modules_do_not_import_tensorflow_or_mlflow():
    import subprocess
    import sys

    code = ("import sys, qpipe, qpipe.cli, qpipe.config, qpipe.pipeline, qpipe.plugins, qpipe.registry;"
            "from qpipe.plugins import get_plugin_manager; from qpipe.registry import Registry;"
            "Registry.from_plugins(get_plugin_manager());"
            "print(sorted(m for m in ('tensorflow', 'mlflow', 'keras', 'tf_keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
