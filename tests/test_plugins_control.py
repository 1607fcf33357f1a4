"""Plugin control: disabled plugins, load failures, duplicate names and raising hooks, each
reported naming the plugin, with plugins installed through (fake) distributions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qpipe
from qpipe import ConfigError, Evaluator, PluginError
from qpipe.config import load_config, resolve
from qpipe.pipeline import run_pipeline
from qpipe.plugins import get_plugin_manager
from qpipe.registry import Registry
from qpipe.testing import fake_distribution, plugin_manager, run_pipeline_file

GOOD = '''
import numpy as np
import qpipe

class Spread(qpipe.Evaluator):
    """Standard deviation of the outputs (test plugin)."""
    name = "{name}"
    def evaluate(self, ctx):
        return {{"output_std": float(np.std(ctx.outputs))}}

@qpipe.hookimpl
def qpipe_register_evaluators(register):
    register(Spread)
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for fake distributions and their modules; returns a writer."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def install(dist: str, plugin: str, module: str, source: str) -> None:
        (folder / f"{module}.py").write_text(source)
        monkeypatch.delitem(sys.modules, module, raising=False)
        fake_distribution(folder, dist, {plugin: module})

    install.folder = folder  # type: ignore[attr-defined]
    return install


def cli(args: list[str], site_folder: Path, **env: str) -> subprocess.CompletedProcess:
    """The real ``qpipe`` command line in a subprocess that sees the fake distributions."""
    environ = {k: v for k, v in os.environ.items() if k != "QPIPE_DISABLE_PLUGINS"}
    tree = os.environ.get("PYTHONPATH")  # the tree under test, when it is not the installed one
    path = os.pathsep.join([str(site_folder), *([tree] if tree else [])])
    environ.update(PYTHONPATH=path, QPIPE_NO_PLUGIN_COMMANDS="1", **env)
    return subprocess.run([sys.executable, "-m", "qpipe.cli", *args], capture_output=True, text=True, env=environ)


def test_a_plugin_that_fails_to_load_is_reported_and_the_rest_keep_working(site, project):
    site("qpipe-spread", "spread", "qpipe_spread_test", GOOD.format(name="spread.std"))
    site("qpipe-broken", "broken", "qpipe_broken_test", "import numpy\nraise ImportError('needs libfoo 2')\n")
    pm = get_plugin_manager()
    assert pm.load_failures == {"broken": "ImportError: needs libfoo 2"}
    registry = Registry.from_plugins(pm)
    assert "spread.std" in registry.names("evaluator") and "tflite.int8" in registry.names("quantizer")
    # a pipeline that does not name the broken plugin's components runs
    path = project.write_pipeline([], evaluators=["accuracy", "spread.std"], cache=False)
    results = run_pipeline_file(path, pm)
    assert results.variant("float32").metrics["output_std"] > 0
    # one that names a component it would have provided says why it is missing
    path = project.write_pipeline([], evaluators=["broken.metric"])
    with pytest.raises(ConfigError, match=r"evaluators\[0\]: unknown evaluator 'broken.metric'; valid: .*; "
                                          r"note: plugin 'broken' failed to load: ImportError: needs libfoo 2$"):
        resolve(load_config(path), registry)


def test_qpipe_plugins_shows_load_failures(site):
    site("qpipe-broken", "broken", "qpipe_broken_test", "raise ImportError('needs libfoo 2')\n")
    table = cli(["plugins"], site.folder)
    assert table.returncode == 0, table.stderr
    assert "failed to load plugin 'broken': ImportError: needs libfoo 2" in " ".join(table.stdout.split())
    listing = json.loads(cli(["plugins", "--json"], site.folder).stdout)
    assert listing["load_failures"] == {"broken": "ImportError: needs libfoo 2"}
    assert "tflite" in listing["plugins"]


def test_disabled_plugins_are_named_when_their_components_are_missing(site, project):
    site("qpipe-spread", "spread", "qpipe_spread_test", GOOD.format(name="spread.std"))
    path = project.write_pipeline([], evaluators=["spread.std"])
    ok = cli(["validate", str(path)], site.folder)
    assert ok.returncode == 0, ok.stderr
    off = cli(["validate", str(path)], site.folder, QPIPE_DISABLE_PLUGINS="spread, tfmot")
    assert off.returncode == 2
    lines = off.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in off.stderr
    assert lines[0].startswith("error: pipeline.yaml:")
    assert "unknown evaluator 'spread.std'" in lines[0]
    assert "note: plugin 'spread' is disabled by QPIPE_DISABLE_PLUGINS" in lines[0]


def test_duplicate_names_from_two_installed_plugins_name_both(site, project):
    site("qpipe-spread", "spread", "qpipe_spread_test", GOOD.format(name="shared.std"))
    site("qpipe-spread-fork", "spreadfork", "qpipe_spread_fork_test", GOOD.format(name="shared.std"))
    with pytest.raises(PluginError, match="evaluator 'shared.std' is registered twice: by plugin "
                                          "'(spread|spreadfork)' and by plugin '(spreadfork|spread)'; "
                                          "disable one with QPIPE_DISABLE_PLUGINS"):
        Registry.from_plugins(get_plugin_manager()).get("evaluator", "shared.std")
    listing = cli(["plugins"], site.folder)  # the collision is listed; the command works
    assert listing.returncode == 0, listing.stderr
    assert "not usable: evaluator 'shared.std'" in " ".join(listing.stdout.split())
    unaffected = cli(["validate", str(project.write_pipeline([], name="plain.yaml"))], site.folder)
    assert unaffected.returncode == 0, unaffected.stderr
    path = project.write_pipeline([], evaluators=["shared.std"])
    both = cli(["validate", str(path)], site.folder)
    assert both.returncode == 2 and "registered twice" in both.stderr and "Traceback" not in both.stderr
    one = cli(["validate", str(path)], site.folder, QPIPE_DISABLE_PLUGINS="spreadfork")
    assert one.returncode == 0, one.stderr


def test_a_register_hook_that_raises_names_the_installed_plugin(site):
    site("qpipe-bad", "bad", "qpipe_bad_test",
         "import qpipe\n@qpipe.hookimpl\ndef qpipe_register_backends(register):\n    {}['gpu']\n")
    out = cli(["plugins"], site.folder)
    assert out.returncode == 0, out.stderr
    assert "plugin 'bad' raised in qpipe_register_backends: KeyError: 'gpu'" in " ".join(out.stdout.split())
    assert "tflite" in out.stdout  # the other plugins are listed


class Raises:
    """A plugin whose lifecycle hook raises (the hook named in ``hook``)."""

    def __init__(self, hook: str):
        self.hook = hook

    def _maybe(self, hook: str) -> None:
        if hook == self.hook:
            raise RuntimeError(f"{hook} exploded")

    @qpipe.hookimpl
    def qpipe_pipeline_started(self, run):
        self._maybe("qpipe_pipeline_started")

    @qpipe.hookimpl
    def qpipe_variant_finished(self, result):
        self._maybe("qpipe_variant_finished")


def _resolved(project, pm, **sections):
    """Two variants that run the Keras model as it is (no conversion: fast)."""
    import yaml

    variants = [{"name": "reference", "quantizer": "keras.original"}, {"name": "other", "quantizer": "keras.original"}]
    path = project.root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(project.pipeline_dict(variants, cache=False, **sections)))
    return resolve(load_config(path), Registry.from_plugins(pm))


def test_a_raising_pipeline_started_hook_stops_the_run_naming_the_plugin(project, tmp_path):
    pm = plugin_manager()
    pm.register_plugin(Raises("qpipe_pipeline_started"), "tracker-x")
    with pytest.raises(PluginError, match="plugin 'tracker-x' failed in qpipe_pipeline_started: "
                                          "RuntimeError: qpipe_pipeline_started exploded"):
        run_pipeline(pm, _resolved(project, pm, evaluators=["size"]), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["status"] == "crashed"


def test_a_raising_variant_finished_hook_is_a_warning_naming_the_plugin(project, tmp_path):
    pm = plugin_manager()
    pm.register_plugin(Raises("qpipe_variant_finished"), "tracker-x")
    results, warnings = run_pipeline(pm, _resolved(project, pm, evaluators=["size"]), tmp_path / "out")
    assert [v.status for v in results.variants] == ["ok", "ok"]
    assert warnings == ["plugin 'tracker-x' failed in qpipe_variant_finished: RuntimeError: "
                        "qpipe_variant_finished exploded"] * 2


class Exploding(Evaluator):
    """Raises on the variant named 'other' only (test plugin)."""

    name = "test.explodes"

    def evaluate(self, ctx):
        if ctx.variant == "other":
            raise ZeroDivisionError("no samples")
        return {}


class ExplodingPlugin:
    @qpipe.hookimpl
    def qpipe_register_evaluators(self, register):
        register(Exploding)


def test_a_raising_component_fails_its_variant_naming_the_plugin(project, tmp_path):
    pm = plugin_manager()
    pm.register_plugin(ExplodingPlugin(), "exploder")
    results, _ = run_pipeline(pm, _resolved(project, pm, evaluators=["size", "test.explodes"]), tmp_path / "out")
    assert results.variant("reference").status == "ok"
    failed = results.variant("other")
    assert failed.status == "failed"
    assert failed.error == ("test.explodes (plugin 'exploder'): ZeroDivisionError: no samples "
                            "(full error: other.error.txt)")
    log = (tmp_path / "out" / "other.error.txt").read_text()
    assert "Traceback (most recent call last)" in log and 'raise ZeroDivisionError("no samples")' in log


def test_the_test_kit_names_missing_and_broken_entry_points(site):
    site("qpipe-broken", "broken", "qpipe_broken_test", "raise ImportError('needs libfoo 2')\n")
    with pytest.raises(PluginError, match=r"no installed plugin named 'nope' in the 'qpipe' entry-point group "
                                          r"\(installed: .*broken.*\); install your package"):
        plugin_manager(entry_points=["nope"])
    with pytest.raises(PluginError, match="plugin 'broken' failed to load: ImportError: needs libfoo 2"):
        plugin_manager(entry_points=["broken"])
    pm = plugin_manager(builtins=(), entry_points=[])
    assert Registry.from_plugins(pm).names("quantizer") == []


def test_qpipe_trace_lists_lifecycle_and_register_calls(site, project):
    path = project.root / "pipeline.yaml"
    import yaml

    variants = [{"name": "reference", "quantizer": "keras.original"}]
    path.write_text(yaml.safe_dump(project.pipeline_dict(variants, cache=False, evaluators=["size"])))
    out = cli(["run", str(path), "-o", str(project.root / "out")], site.folder, QPIPE_TRACE="1")
    assert out.returncode == 0, out.stderr
    for hook in ("qpipe_register_quantizers", "qpipe_pipeline_started", "qpipe_variant_started",
                 "qpipe_variant_progress", "qpipe_variant_finished", "qpipe_pipeline_finished"):
        assert f"  {hook} [hook]" in out.stderr, hook


CONVERTER_ERROR = '''
import qpipe

TEXT = ("Traceback (most recent call last):\\n"
        + "".join(f'  File "/tf/lite/python/convert.py", line {i}, in convert\\n    raise\\n' for i in range(30))
        + "<unknown>:0: error: loc(fused['dense']): 'tfl.fully_connected' op requires the same element type\\n"
        + "<unknown>:0: note: see current operation: %0 = tfl.fully_connected(...)\\n" * 20)

class ConverterError(Exception):
    """Like tensorflow.lite's ConverterError: the MLIR diagnostics in the message."""

class Prune(qpipe.Quantizer):
    name = "prune.int8"
    def quantize(self, ctx):
        raise ConverterError(TEXT)

@qpipe.hookimpl
def qpipe_register_quantizers(register):
    register(Prune)
'''


@pytest.mark.parametrize("debug", [False, True])
def test_a_third_party_exception_is_one_short_line_with_the_full_text_in_a_log(site, project, debug):
    site("qpipe-prune", "prune", "qpipe_prune_test", CONVERTER_ERROR)
    import yaml

    variants = [{"name": "reference", "quantizer": "keras.original"}, {"name": "pruned", "quantizer": "prune.int8"}]
    path = project.root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(project.pipeline_dict(variants, cache=False, evaluators=["size"])))
    output = project.root / "out"
    out = cli(["run", str(path), "-o", str(output), *(["--debug"] if debug else [])], site.folder)
    assert out.returncode == 1, out.stderr
    error = {v["name"]: v["error"] for v in json.loads((output / "results.json").read_text())["variants"]}["pruned"]
    # the MLIR location is dropped: what the converter says is kept
    assert error == ("prune.int8 (plugin 'prune'): ConverterError: "
                     "'tfl.fully_connected' op requires the same element type (full error: pruned.error.txt)")
    log = (output / "pruned.error.txt").read_text()
    assert "Traceback (most recent call last)" in log and log.count("see current operation") == 20
    terminal = out.stdout + out.stderr
    shown = " ".join(terminal.split()).count("'tfl.fully_connected' op requires the same element type")
    assert shown >= 2 if debug else shown == 1  # once; --debug adds the full traceback
    assert ("see current operation" in terminal) is debug and ("Traceback" in terminal) is debug


class OtherRuntime(qpipe.Backend):
    """A second backend for .tflite files that claims to be their default (test plugin)."""

    name = "test.other-runtime"
    formats = ("tflite",)
    default_for = ("tflite",)

    def load(self, artifact, model):
        raise NotImplementedError


class Identity(qpipe.Quantizer):
    """An unquantized reference of its own (test plugin)."""

    name = "test.identity"
    reference = True

    def quantize(self, ctx):
        raise NotImplementedError


class Spread(Evaluator):
    """A default evaluator of a third-party plugin (test plugin)."""

    name = "test.spread"
    metrics = ("output_std",)
    default_order = 35

    def evaluate(self, ctx):
        return {"output_std": 0.0}


class Declares:
    @qpipe.hookimpl
    def qpipe_register_backends(self, register):
        register(OtherRuntime)

    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Identity)

    @qpipe.hookimpl
    def qpipe_register_evaluators(self, register):
        register(Spread)


def _without_evaluators(project, variants, name):
    """A pipeline file listing ``variants`` as given and no ``evaluators`` (the defaults run)."""
    import yaml

    config = project.pipeline_dict(variants)
    del config["evaluators"]
    (project.root / name).write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(project.root / name)


def test_baseline_default_backend_and_default_evaluators_are_declared_by_plugins(project):
    """The host names no plugin's component: the built-ins declare what is default, and a
    third-party plugin declaring the same takes part on equal terms."""
    variants = [{"name": "int8", "quantizer": "tflite.int8"}, {"name": "float32", "quantizer": "tflite.float32"}]
    builtin = resolve(_without_evaluators(project, variants, "p1.yaml"), Registry.from_plugins(plugin_manager()))
    assert builtin.baseline == "float32"  # tflite.float32 declares reference = True
    assert [rv.backend.component.name for rv in builtin.variants] == ["litert", "litert"]  # default_for tflite
    assert [b.component.name for b in builtin.evaluators] == ["accuracy", "regression", "fidelity", "size",
                                                              "storage", "latency"]
    registry = Registry.from_plugins(plugin_manager(Declares()))
    assert registry.default_evaluators()[:4] == ["accuracy", "regression", "fidelity", "test.spread"]
    first = [{"name": "mine", "quantizer": "test.identity", "backend": "litert"},
             *[{**v, "backend": "litert"} for v in variants]]
    assert resolve(_without_evaluators(project, first, "p2.yaml"), registry).baseline == "mine"
    with pytest.raises(ConfigError, match=r"variants\[0\].* backends litert, test.other-runtime each claim "
                                          r"to be the default for tflite artifacts; name one with 'backend:'"):
        resolve(_without_evaluators(project, variants, "p3.yaml"), registry)
