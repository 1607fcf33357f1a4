"""Test kit for qpipe and its plugins: a clean plugin manager, a tiny real model, one-call runs.

    from qpipe.testing import plugin_manager, make_tiny_project, run_pipeline_file

    def test_my_quantizer(tmp_path):
        pm = plugin_manager(my_plugin)                 # built-ins + yours, nothing else
        project = make_tiny_project(tmp_path)          # real model + .npz data, trained in seconds
        pipeline = project.write_pipeline([{"name": "mine", "quantizer": "my.quantizer"}])
        results = run_pipeline_file(pipeline, pm)
        assert results.variant("mine").status == "ok"

Or, for one variant, ``run_variant(tiny_project(tmp_path), "my.quantizer", pm=pm)`` returns
its ``VariantResult``. ``fake_distribution`` makes an entry point visible without installing
anything, to test loading through the ``qpipe`` group (and load failures).

Everything here is real: the model is a trained Keras model, conversions use TensorFlow and
LiteRT. Nothing installed beyond the named plugins leaks in.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from qpipe import QpipeError, Quantizer, hookimpl
from qpipe.errors import PluginError
from qpipe.plugins import ENTRY_POINT_GROUP, QpipePluginManager

BUILTIN_PLUGINS = ("keras", "tflite", "litert", "calibration", "metrics", "tfmot")


def plugin_manager(*plugins: Any, builtins: Iterable[str] = BUILTIN_PLUGINS,
                   entry_points: Iterable[str] = ()) -> QpipePluginManager:
    """A fresh manager holding the named installed plugins and the given plugin objects.

    ``builtins`` and ``entry_points`` are entry-point names from the ``qpipe`` group; plugin
    objects (modules or instances with ``@qpipe.hookimpl`` methods) are registered after.
    Raises ``PluginError`` naming the plugin when a named entry point is not installed or
    fails to import.
    """
    from importlib import metadata

    pm = QpipePluginManager()
    wanted = set(builtins) | set(entry_points)
    found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        installed = sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
        raise PluginError(f"no installed plugin named {', '.join(repr(m) for m in missing)} in the "
                          f"'{ENTRY_POINT_GROUP}' entry-point group (installed: {', '.join(installed)}); "
                          "install your package (pip install -e .) or check pyproject's entry point")
    for name in sorted(found):
        try:
            plugin = found[name].load()
        except Exception as exc:
            raise PluginError(f"plugin '{name}' failed to load: {type(exc).__name__}: {exc}") from exc
        pm.register_plugin(plugin, name)
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
        pm.register_plugin(plugin, name)
    return pm


class Broken(Quantizer):
    """A quantizer (``test.broken``) that always fails with an ordinary error: register it to
    check that a failed variant is recorded and the others still run."""

    name = "test.broken"

    def quantize(self, ctx: Any) -> Any:
        raise QpipeError("broken on purpose")


class LifecycleRecorder:
    """A plugin that records each variant's lifecycle calls as (event, variant, pid)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    @hookimpl
    def qpipe_variant_started(self, variant):
        self.calls.append(("started", variant, os.getpid()))

    @hookimpl
    def qpipe_variant_progress(self, variant, message):
        self.calls.append(("progress", variant, os.getpid()))

    @hookimpl
    def qpipe_variant_finished(self, result):
        self.calls.append(("finished", result.name, os.getpid()))

    @hookimpl
    def qpipe_variant_failed(self, result, error):
        self.calls.append(("failed", result.name, os.getpid()))


def synthetic_digits(n: int = 600, seed: int = 0, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A learnable image task without downloads: noisy copies of ``classes`` 8x8 prototypes."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(1234).random((classes, 8, 8)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    images = prototypes[labels] + rng.normal(0, 0.25, size=(n, 8, 8)).astype(np.float32)
    return np.clip(images, 0, 1)[..., None].astype(np.float32), labels.astype(np.int64)


def build_tiny_model(keras: Any, classes: int = 4) -> Any:
    """Conv-BN-ReLU, pooling, Dense: a few thousand weights, quantizable by every path."""
    layers = keras.layers
    return keras.Sequential([
        layers.Input((8, 8, 1), name="image"),
        layers.Conv2D(8, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(32, activation="relu"),
        layers.Dense(classes, activation="softmax"),
    ])


def train_tiny_model(flavor: str = "tf_keras", epochs: int = 8, seed: int = 0) -> Any:
    """A trained tiny model; ``flavor`` is ``tf_keras`` (Keras 2) or ``keras3``."""
    from qpipe.tfenv import keras3, tf_keras

    keras = tf_keras() if flavor == "tf_keras" else keras3()
    keras.utils.set_random_seed(seed)
    x, y = synthetic_digits(600, seed)
    model = build_tiny_model(keras)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


@dataclass
class TinyProject:
    """A folder with ``model.keras`` and ``data.npz`` (x_train, y_train, x_test, y_test)."""

    root: Path
    model_path: Path
    data_path: Path

    def copy_to(self, dest: Path) -> "TinyProject":
        """The same model and data copied into ``dest`` (a test's own folder)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.model_path, dest / self.model_path.name)
        shutil.copy(self.data_path, dest / self.data_path.name)
        return TinyProject(dest, dest / self.model_path.name, dest / self.data_path.name)

    def pipeline_dict(self, variants: list[dict], **sections: Any) -> dict:
        """A pipeline mapping for ``variants``; keyword arguments replace whole sections."""
        config: dict[str, Any] = {
            "name": "tiny",
            "model": {"path": self.model_path.name},
            "data": {
                "evaluation": {"path": self.data_path.name, "inputs": "x_test", "labels": "y_test"},
                "calibration": {"path": self.data_path.name, "inputs": "x_train", "labels": "y_train"},
            },
            "calibrator": {"name": "sample", "options": {"count": 50}},
            "variants": variants,
            "evaluators": ["accuracy", "fidelity", "size", {"name": "latency", "options": {"runs": 5, "warmup": 1}}],
            "tracking": False,
        }
        config.update(sections)
        return config

    def write_pipeline(self, variants: list[dict] | None = None, name: str = "pipeline.yaml", **sections: Any) -> Path:
        """Write a pipeline file next to the model; the baseline ``float32`` is added first."""
        variants = variants if variants is not None else []
        if not any(v.get("quantizer") == "tflite.float32" for v in variants):
            variants = [{"name": "float32", "quantizer": "tflite.float32"}, *variants]
        path = self.root / name
        path.write_text(yaml.safe_dump(self.pipeline_dict(variants, **sections), sort_keys=False))
        return path


def make_tiny_project(root: Path, flavor: str = "tf_keras", model: Any = None) -> TinyProject:
    """Train (or take) a tiny model and write it with its data into ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else train_tiny_model(flavor)
    model_path = root / "model.keras"
    model.save(model_path)
    x_train, y_train = synthetic_digits(600, seed=0)
    x_test, y_test = synthetic_digits(200, seed=1)
    data_path = root / "data.npz"
    np.savez(data_path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return TinyProject(root=root, model_path=model_path, data_path=data_path)


def run_pipeline_file(path: Path, pm: QpipePluginManager | None = None, output: Path | None = None,
                      only: list[str] | None = None, settings: dict | None = None):
    """Validate and run a pipeline file in-process; return its PipelineResults."""
    from qpipe.config import load_config, resolve
    from qpipe.pipeline import run_pipeline
    from qpipe.registry import Registry

    pm = pm if pm is not None else plugin_manager()
    resolved = resolve(load_config(path), Registry.from_plugins(pm), only)
    if output is None:  # "out", then "out-2", "out-3", ... so repeated runs never collide
        output = Path(path).parent / "out"
        n = 1
        while output.exists():
            n += 1
            output = Path(path).parent / f"out-{n}"
    results, _ = run_pipeline(pm, resolved, output, settings or {"no_tracking": True})
    return results


_TINY_CACHE: dict[str, TinyProject] = {}


def tiny_project(root: Path, flavor: str = "tf_keras") -> TinyProject:
    """Like ``make_tiny_project`` but the model is trained once per process and copied."""
    if flavor not in _TINY_CACHE:
        _TINY_CACHE[flavor] = make_tiny_project(Path(tempfile.mkdtemp(prefix=f"qpipe-tiny-{flavor}-")), flavor)
    source = _TINY_CACHE[flavor]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(source.model_path, root / source.model_path.name)
    shutil.copy(source.data_path, root / source.data_path.name)
    return TinyProject(root, root / source.model_path.name, root / source.data_path.name)


def run_variant(project: TinyProject, quantizer: str, options: dict | None = None, *,
                pm: QpipePluginManager | None = None, backend: str | dict | None = None,
                calibrator: str | dict | None = None, evaluators: list | None = None,
                name: str = "variant", baseline: bool = False, training: bool = False) -> Any:
    """Run a pipeline holding just this variant (plus ``tflite.float32`` if ``baseline``).

    Returns the variant's ``VariantResult``: check ``.status`` (``ok`` / ``failed``),
    ``.error``, ``.metrics`` and ``.metadata``. The whole ``PipelineResults`` is on
    ``result.pipeline_results``. ``evaluators`` defaults to the tiny project's list.
    ``training=True`` adds ``data.training`` (the project's training rows) for quantizers
    that train (``needs_training``).
    """
    variant: dict[str, Any] = {"name": name, "quantizer": quantizer}
    if options:
        variant["options"] = options
    if backend is not None:
        variant["backend"] = backend
    if calibrator is not None:
        variant["calibrator"] = calibrator
    sections: dict[str, Any] = {"cache": False}
    if training:
        data = project.pipeline_dict([])["data"]
        sections["data"] = {**data, "training": {"path": project.data_path.name, "inputs": "x_train",
                                                 "labels": "y_train"}}
    if evaluators is not None:
        sections["evaluators"] = evaluators
    if baseline:
        path = project.write_pipeline([variant], name=f"{name}.yaml", **sections)
    else:
        path = project.root / f"{name}.yaml"
        config = project.pipeline_dict([variant], **sections)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    results = run_pipeline_file(path, pm)
    result = results.variant(name)
    result.pipeline_results = results  # type: ignore[attr-defined]
    return result


def fake_distribution(folder: Path, name: str, entry_points: dict[str, str], version: str = "0.0.0") -> Path:
    """Write ``<name>-<version>.dist-info`` declaring ``entry_points`` in the ``qpipe`` group.

    Put ``folder`` on ``sys.path`` (e.g. ``monkeypatch.syspath_prepend(folder)``, or
    ``PYTHONPATH`` for a subprocess) and ``importlib.metadata`` sees an installed
    distribution: the host loads those entry points as it would from a real install.
    ``entry_points`` maps plugin names to ``module`` or ``module:attribute``.
    """
    folder = Path(folder)
    safe = re.sub(r"[^A-Za-z0-9.]+", "_", name)
    info = folder / f"{safe}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{key} = {value}" for key, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info


def overlay_venv(folder: Path) -> Path:
    """A new virtual environment that also sees this environment's packages; its python.

    It has a ``qpipe`` command (``bin/qpipe``) and ``python -m qpipe`` works in it.
    Install a plugin package into it (``python -m pip install --no-deps -e PKG``) to test
    the package as users get it (entry point, imports, CLI) without touching the current
    environment, where its components would leak into every other plugin manager.
    """
    import site
    import subprocess
    import sys
    import sysconfig

    folder = Path(folder)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    parents = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    lines = [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys(parents)]
    (Path(purelib) / "_qpipe_overlay.pth").write_text("\n".join(lines) + "\n")
    if sys.platform != "win32":  # the qpipe command, as a console script would be
        script = folder / "bin" / "qpipe"
        script.write_text(f"#!{python.absolute()}\nfrom qpipe.cli import entry\nentry()\n")
        script.chmod(0o755)
    return python


def install_editable(python: Path, package: Path) -> dict[str, str]:
    """``pip install -e package`` into the venv of ``python`` (from ``overlay_venv``), without
    dependencies or build isolation; returns the environment to run that venv with (plugins
    enabled, no PYTHONPATH). The ``*.egg-info`` left in the source tree is removed."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("QPIPE_DISABLE_PLUGINS", "PYTHONPATH")}
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "-e", str(package)], capture_output=True, text=True, env=env)
    if pip.returncode != 0:
        raise QpipeError(f"pip install -e {package} failed: {pip.stderr.strip()[-500:]}")
    for leftover in Path(package).rglob("*.egg-info"):  # keep the source tree clean
        shutil.rmtree(leftover)
    return env
