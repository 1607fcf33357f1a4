"""The variant cache: reuse across output folders, visible hits, --no-cache, and keys that
change whenever anything a variant depends on changes."""

from __future__ import annotations

import os
import shutil
import time
from importlib import metadata

from pathlib import Path

import numpy as np
import pytest

import qpipe
from qpipe.cache import KeyMaker, cache_dir, code_fingerprint, stack_versions
from qpipe.components import LoadedModel, file_sha256
from qpipe.config import load_config, resolve
from qpipe.inputs import load_inputs
from qpipe.registry import Registry
from qpipe.testing import Broken, plugin_manager, run_pipeline_file, train_tiny_model
from qpipe.tfenv import tf_keras


class Events:
    """Records every variant lifecycle call, in order."""

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []
        self.model = None

    @qpipe.hookimpl
    def qpipe_pipeline_started(self, run):
        self.model = run.model

    @qpipe.hookimpl
    def qpipe_variant_started(self, variant):
        self.calls.append(("started", variant, ""))

    @qpipe.hookimpl
    def qpipe_variant_progress(self, variant, message):
        self.calls.append(("progress", variant, message))

    @qpipe.hookimpl
    def qpipe_variant_finished(self, result):
        self.calls.append(("finished", result.name, ""))

    @qpipe.hookimpl
    def qpipe_variant_failed(self, result):
        self.calls.append(("failed", result.name, ""))


class Plugin:
    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        register(Broken)


VARIANTS = [{"name": "int8", "quantizer": "tflite.int8"},
            {"name": "broken", "quantizer": "test.broken"}]


def test_rerun_into_a_new_folder_restores_every_variant_from_the_cache(project):
    pipeline = project.write_pipeline(VARIANTS)
    first = run_pipeline_file(pipeline, plugin_manager(Plugin()), output=project.root / "one")
    assert [v.metadata["cache"] for v in first.variants] == ["miss", "miss", "miss"]
    assert first.extra["cache"]["stored"] == 2  # the failed variant is not stored
    assert first.extra["cache"]["dir"] == str(project.root / ".qpipe-cache")

    events = Events()
    second = run_pipeline_file(pipeline, plugin_manager(Plugin(), events), output=project.root / "two")
    by_name = {v.name: v for v in second.variants}
    assert [v.name for v in second.variants] == ["float32", "int8", "broken"]
    for name in ("float32", "int8"):
        old, new = first.variant(name), by_name[name]
        assert new.status == "ok" and new.metadata["cache"] == "hit" and new.metrics["cache_hit"] == 1.0
        assert old.metrics["cache_hit"] == 0.0
        # latency is timed again on this machine (Evaluator.remeasure); the rest is replayed
        assert {k: v for k, v in new.metrics.items() if k != "cache_hit" and "latency" not in k} == \
               {k: v for k, v in old.metrics.items() if k != "cache_hit" and "latency" not in k}
        assert "latency_ms_p50" in new.metadata["remeasured"]
        # the artifact is copied in: the new folder is self-contained
        assert new.artifact == old.artifact
        assert (project.root / "two" / new.artifact).read_bytes() == (project.root / "one" / old.artifact).read_bytes()
        assert new.metadata["cache_origin"] == str(project.root / "one")
        # hooks still run, in order, with no conversion in between
        calls = [c for c in events.calls if c[1] == name]
        assert calls[0][0] == "started" and calls[-1][0] == "finished"
        assert all("quantizing" not in c[2] for c in calls)
        assert any("restored from the cache" in c[2] for c in calls)
    broken = by_name["broken"]
    assert broken.status == "failed" and broken.metadata["cache"] == "miss"  # failures run again
    assert ("failed", "broken", "") in events.calls
    assert second.extra["cache"]["hits"] == 2 and second.extra["cache"]["misses"] == 1
    assert events.model.sha256 == first.model["sha256"]

    # with every variant cached, the model is not even loaded unless a plugin touches it
    events = Events()
    third = run_pipeline_file(project.write_pipeline(VARIANTS[:1]), plugin_manager(events),
                              output=project.root / "three")
    assert [v.metadata["cache"] for v in third.variants] == ["hit", "hit"]
    assert not isinstance(events.model, LoadedModel) and third.model["flavor"] == "tf_keras"
    assert events.model.inputs[0].name == "image"  # loaded on first use
    assert isinstance(events.model.model, tf_keras().Model)


def test_an_unchanged_rerun_hashes_the_model_and_each_data_file_once(project, monkeypatch):
    import collections

    import qpipe.cached
    import qpipe.components
    import qpipe.pipeline

    pipeline = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}], name="hashes.yaml")
    run_pipeline_file(pipeline, output=project.root / "h1")
    hashed: collections.Counter = collections.Counter()
    real = qpipe.components.file_sha256

    def counting(path):
        hashed[Path(path).name] += 1
        return real(path)

    for module in (qpipe.cached, qpipe.pipeline):
        monkeypatch.setattr(module, "file_sha256", counting)
    again = run_pipeline_file(pipeline, output=project.root / "h2")
    assert [v.metadata["cache"] for v in again.variants] == ["hit", "hit"]
    assert hashed == {project.model_path.name: 1, project.data_path.name: 2}  # evaluation and calibration sections


def test_a_new_variant_is_compared_with_the_cached_baseline(project):
    first = run_pipeline_file(project.write_pipeline([]), output=project.root / "one")
    second = run_pipeline_file(project.write_pipeline(VARIANTS[:1]), output=project.root / "two")
    assert [v.metadata["cache"] for v in second.variants] == ["hit", "miss"]
    int8 = second.variant("int8")
    # fidelity and deltas need the baseline's predictions and metrics, restored from the cache
    assert 0.0 <= int8.metrics["top1_agreement"] <= 1.0
    assert int8.metrics["size_ratio"] > 1.5
    expected_delta = int8.metrics["accuracy"] - first.variant("float32").metrics["accuracy"]
    assert int8.metrics["accuracy_delta"] == pytest.approx(expected_delta)


def test_no_cache_and_cache_false_bypass_it(project, monkeypatch):
    pipeline = project.write_pipeline([])  # the baseline alone
    run_pipeline_file(pipeline, output=project.root / "one")
    off = run_pipeline_file(pipeline, output=project.root / "two", settings={"no_tracking": True, "no_cache": True})
    assert off.variant("float32").metadata["cache"] == "off" and "cache_hit" not in off.variant("float32").metrics
    assert off.extra["cache"]["off"] == "--no-cache"

    def folder(settings=None, **sections):
        config = load_config(project.write_pipeline([], name="where.yaml", **sections)).config
        return cache_dir(config, project.root, settings or {})

    assert folder() == project.root / ".qpipe-cache"
    assert folder({"no_cache": True}) is None and folder(cache=False) is None
    assert folder(cache={"dir": "custom"}) == project.root / "custom"
    monkeypatch.setenv("QPIPE_CACHE_DIR", str(project.root / "elsewhere"))
    assert folder() == project.root / "elsewhere"
    fresh = run_pipeline_file(pipeline, output=project.root / "three")  # a new, empty cache: computed again
    assert fresh.variant("float32").metadata["cache"] == "miss"
    assert any((project.root / "elsewhere").rglob("entry.json"))


def test_cache_command_shows_and_clears_the_cache(project, monkeypatch):
    from typer.testing import CliRunner

    from qpipe.cli import build_app

    monkeypatch.delenv("QPIPE_CACHE_DIR", raising=False)
    pipeline = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], name="cached.yaml")
    run_pipeline_file(pipeline, output=project.root / "c1")
    app = build_app(plugin_manager())

    def cache(*args):
        return CliRunner().invoke(app, ["cache", str(pipeline), *args])

    shown = cache()
    assert shown.exit_code == 0 and f"cache {project.root / '.qpipe-cache'}: 2 cached variant(s)" in shown.output
    kept_by_plugin = project.root / ".qpipe-cache" / "v1" / "plugins" / "someplugin"  # qpipe.cache.PLUGINS
    (kept_by_plugin / "old").mkdir(parents=True)
    (kept_by_plugin / "old" / "file").write_bytes(b"x" * 1000)
    (kept_by_plugin / "new.bin").write_bytes(b"y" * 10)
    os.utime(kept_by_plugin / "old", (time.time() - 3 * 86400,) * 2)
    kept = cache("--clear", "--older-than", "1")  # the variants were stored seconds ago
    assert kept.exit_code == 0 and "removed 0 cached variant(s)" in kept.output
    assert "2 cached variant(s)" in kept.output
    assert not (kept_by_plugin / "old").exists() and (kept_by_plugin / "new.bin").exists()
    cleared = cache("--clear")
    assert cleared.exit_code == 0 and "removed 2 cached variant(s)" in cleared.output
    assert "0 cached variant(s), 0.0 MiB" in cleared.output
    assert list(kept_by_plugin.iterdir()) == []
    again = run_pipeline_file(pipeline, output=project.root / "c2")
    assert [v.metadata["cache"] for v in again.variants] == ["miss", "miss"]
    wrong = cache("--older-than", "1")
    assert wrong.exit_code == 2 and "--older-than only applies with --clear" in wrong.output


# --------------------------------------------------------------------------- keys


def keys_for(project, variants=({"name": "int8", "quantizer": "tflite.int8"},), **sections):
    """{variant: key} for the project's pipeline with ``sections`` replaced (nothing is run)."""
    pm = plugin_manager()
    pipeline = project.write_pipeline(list(variants), name="keys.yaml", **sections)
    resolved = resolve(load_config(pipeline), Registry.from_plugins(pm))
    inputs = load_inputs(pm, resolved)
    hashes = {k: file_sha256(p) for k, p in inputs.data_files.items()}
    maker = KeyMaker(resolved, inputs, hashes)
    base = maker.key(resolved.variants[0], None)
    return {"float32": base, "int8": maker.key(resolved.variants[1], base)}


def test_the_key_changes_when_any_input_changes(project, monkeypatch):
    base = project.pipeline_dict([])
    reference = keys_for(project)
    assert reference == keys_for(project)  # deterministic
    assert None not in reference.values() and reference["float32"] != reference["int8"]

    def changed(**sections):
        keys = keys_for(project, **sections)
        assert keys["int8"] != reference["int8"], sections
        return keys

    # component names and options
    assert changed(variants=[{"name": "float32", "quantizer": "tflite.float32"},
                             {"name": "int8", "quantizer": "tflite.int8", "options": {"per_channel": False}}]
                   )["float32"] == reference["float32"]
    assert changed(calibrator={"name": "sample", "options": {"count": 40}})["float32"] == reference["float32"]
    changed(backends={"litert": {"threads": 1}})
    changed(evaluators=["accuracy", "fidelity", "size"])
    changed(evaluators=[*base["evaluators"][:3], {"name": "latency", "options": {"runs": 6, "warmup": 1}}])
    changed(constraints=["accuracy_delta >= -0.05"])
    # which arrays are read
    changed(data={**base["data"], "evaluation": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}})

    # data bytes: a changed calibration file changes int8's key only; a changed evaluation file both
    with np.load(project.data_path) as npz:
        arrays = dict(npz)
    np.savez(project.root / "calib.npz", x=arrays["x_train"], y=arrays["y_train"])
    data = {**base["data"], "calibration": {"path": "calib.npz"}}
    separate = changed(data=data)
    assert separate["float32"] == reference["float32"]
    arrays["x_train"][0, 0, 0, 0] += 0.5
    np.savez(project.root / "calib.npz", x=arrays["x_train"], y=arrays["y_train"])
    keys = keys_for(project, data=data)
    assert keys["int8"] != separate["int8"] and keys["float32"] == reference["float32"]
    original = project.data_path.read_bytes()
    arrays["x_test"][0, 0, 0, 0] += 0.5
    np.savez(project.data_path, **arrays)
    assert changed()["float32"] != reference["float32"]
    project.data_path.write_bytes(original)
    assert keys_for(project) == reference

    # model bytes (the baseline changes, so every key does)
    shutil.copy(project.model_path, project.root / "saved.keras")
    train_tiny_model(epochs=1, seed=3).save(project.model_path)
    assert changed()["float32"] != reference["float32"]
    shutil.copy(project.root / "saved.keras", project.model_path)
    assert keys_for(project) == reference

    # qpipe, TensorFlow and LiteRT versions, and plugin source code
    real_version, real_fingerprint = metadata.version, code_fingerprint
    for dist in ("qpipe", "tensorflow", "ai-edge-litert"):
        stack_versions.cache_clear()
        with monkeypatch.context() as m:
            if dist == "qpipe":
                m.setattr("qpipe.cache.__version__", "99.0")
            else:
                m.setattr(metadata, "version", lambda name, d=dist: "0.0.1" if name == d else real_version(name))
            changed()
        stack_versions.cache_clear()
    with monkeypatch.context() as m:
        m.setattr("qpipe.cache.code_fingerprint",
                  lambda module: "edited" if module.startswith("qpipe_tflite") else real_fingerprint(module))
        changed()
    assert keys_for(project) == reference


def test_a_model_from_a_function_is_not_cached(project):
    (project.root / "make_model.py").write_text(
        "from qpipe.testing import train_tiny_model\n\ndef build():\n    return train_tiny_model(epochs=1)\n")
    pipeline = project.write_pipeline([], model={"function": "make_model:build"})
    results = run_pipeline_file(pipeline)
    assert results.variant("float32").status == "ok"
    assert results.variant("float32").metadata["cache"] == "off"
    assert "function" in results.extra["cache"]["off"]
    assert results.extra["cache"]["stored"] == 0


def test_clearing_the_cache_removes_links_never_what_they_point_to(project, monkeypatch, tmp_path):
    """A shared cache whose folders were replaced by symlinks to someone else's files: --clear removes
    the links as links, deletes nothing they point to, names each link, and does not crash."""
    from typer.testing import CliRunner

    from qpipe.cli import build_app

    monkeypatch.delenv("QPIPE_CACHE_DIR", raising=False)
    pipeline = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], name="linked.yaml")
    run_pipeline_file(pipeline, output=project.root / "c1")
    layout = project.root / ".qpipe-cache" / "v1"
    victim = tmp_path / "someone-elses"
    (victim / "k").mkdir(parents=True)
    (victim / "k" / "entry.json").write_text("{}")  # shaped like an entry, so a glob through the link finds it
    (victim / "k" / "model.tflite").write_bytes(b"precious")
    (victim / "file.png").write_bytes(b"precious too")
    entry = next(layout.glob("??/*/entry.json")).parent
    links = {layout / "zz": victim,  # a whole key prefix folder
             entry.parent / "ffff": victim / "k",  # a linked entry folder (an internal error before)
             layout / "files" / "zz": victim,
             layout / "plugins" / "p": victim,
             layout / "plugins" / "q" / "item": victim / "file.png"}
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    out = CliRunner().invoke(build_app(plugin_manager()), ["cache", str(pipeline), "--clear"])
    assert out.exit_code == 0, out.output
    assert "removed 2 cached variant(s)" in out.output and "0 cached variant(s), 0.0 MiB" in out.output
    assert (victim / "k" / "model.tflite").read_bytes() == b"precious"
    assert (victim / "k" / "entry.json").exists() and (victim / "file.png").read_bytes() == b"precious too"
    named = [line for line in out.output.splitlines() if line.startswith("removed a symlink from the cache")]
    assert len(named) == len(links), out.output
    for link, target in links.items():
        assert not link.is_symlink() and any(f"{link} -> {target}" in line for line in named), link


def test_a_forged_cache_entry_is_recomputed_not_believed(project, monkeypatch, tmp_path):
    """Editing a cached variant's accuracy (checksums untouched: they cover the files, not entry.json)
    or an entry signed by another user's key is a miss with one line, never a hit reporting it."""
    import json

    monkeypatch.setenv("QPIPE_CACHE_KEY", str(tmp_path / "mine.key"))
    pipeline = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}], name="forged.yaml")
    first = run_pipeline_file(pipeline, output=project.root / "f1")
    true_accuracy = first.variant("dynamic").metrics["accuracy"]
    assert (tmp_path / "mine.key").stat().st_mode & 0o777 == 0o600
    for entry in (project.root / ".qpipe-cache").glob("v1/??/*/entry.json"):
        info = json.loads(entry.read_text())
        if info["result"]["name"] == "dynamic":
            info["raw_metrics"]["accuracy"] = 0.123  # any edit, up or down
            entry.write_text(json.dumps(info))
    from typer.testing import CliRunner

    from qpipe.cli import build_app
    from qpipe.results import read_results

    out = CliRunner().invoke(build_app(plugin_manager()), ["run", str(pipeline), "--no-tracking",
                                                           "-o", str(project.root / "f2")])
    assert out.exit_code == 0, out.output
    assert "signature does not match your cache key" in " ".join(out.output.split()), out.output
    second = read_results(project.root / "f2")
    dynamic = second.variant("dynamic")
    assert dynamic.metadata["cache"] == "miss" and dynamic.metrics["accuracy"] == true_accuracy
    assert second.variant("float32").metadata["cache"] == "hit"
    monkeypatch.setenv("QPIPE_CACHE_KEY", str(tmp_path / "someone-else.key"))  # another user's cache
    third = run_pipeline_file(pipeline, output=project.root / "f3")
    assert [v.metadata["cache"] for v in third.variants] == ["miss", "miss"]
    (tmp_path / "someone-else.key").chmod(0o644)
    from qpipe.cachesign import _key
    _key.cache_clear()
    with pytest.raises(qpipe.QpipeError, match="chmod 600"):
        run_pipeline_file(pipeline, output=project.root / "f4")
    _key.cache_clear()
