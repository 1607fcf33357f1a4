"""Built-in plugin: load Keras (3 or tf_keras) and SavedModel models; run them as the reference.

Registers the ``keras`` backend, which runs the original model, and the ``keras.original``
quantizer, which passes the model through unconverted (a reference variant).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

import qpipe
from qpipe import (Artifact, Backend, LoadedModel, QpipeError, Quantizer, Runner, TensorInfo, call_function,
                   file_sha256)
from qpipe.errors import short_error
from qpipe.results import copy_without_links
from qpipe.tfenv import keras3, quiet, tensorflow, tf_keras
from qpipe_keras.safety import check_keras_file, check_saved_model, stored_configs


# --------------------------------------------------------------------------- loading


def saved_keras_version(path: Path) -> str | None:
    """The Keras version recorded in a .keras or .h5 file (None if unknown)."""
    return stored_configs(path)[1]


def load_keras_file(path: Path, safe_mode: bool) -> tuple[Any, str]:
    """Load with the Keras that saved the file: (model, 'keras3' | 'tf_keras').

    In safe mode the stored config is checked first, whichever loader the file's version picks.
    """
    if safe_mode:
        check_keras_file(path)
    version = saved_keras_version(path) or "3"
    if version.startswith("3"):
        keras = keras3()
        try:
            return keras.saving.load_model(path, safe_mode=safe_mode), "keras3"
        except ValueError as exc:
            if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
                raise QpipeError(f"model: {path.name} needs unsafe deserialization ({short_error(exc)}); "
                                 "set model.safe_mode: false only if you trust the file") from None
            raise
    keras2 = tf_keras()
    kwargs = {"safe_mode": safe_mode} if path.suffix == ".keras" else {}
    return keras2.models.load_model(path, **kwargs), "tf_keras"


def _flavor_of(model: Any) -> str:
    keras = keras3()
    if isinstance(model, keras.Model):
        return "keras3"
    if isinstance(model, tf_keras().Model):
        return "tf_keras"
    raise QpipeError(f"model: expected a Keras model, got {type(model).__name__}")


def _shape(shape: Any) -> tuple[int | None, ...]:
    dims = shape.as_list() if hasattr(shape, "as_list") else list(shape)
    return tuple(None if d is None else int(d) for d in dims)


def _dtype(dtype: Any) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def keras_tensors(model: Any, flavor: str) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Input and output descriptions of a Keras model."""
    if not getattr(model, "inputs", None):
        raise QpipeError("model: the model has no defined inputs (build or call it on data before saving)")
    if flavor == "tf_keras":
        in_names = list(model.input_names)
        out_names = list(model.output_names)
    else:
        in_names = [t.name for t in model.inputs]
        out_names = list(getattr(model, "output_names", None) or [])  # the output layers' names
        if len(out_names) != len(model.outputs):
            out_names = [getattr(t, "name", f"output_{i}") for i, t in enumerate(model.outputs)]
    inputs = [TensorInfo(n, _shape(t.shape), _dtype(t.dtype)) for n, t in zip(in_names, model.inputs, strict=False)]
    outputs = [TensorInfo(n, _shape(t.shape), _dtype(t.dtype)) for n, t in zip(out_names, model.outputs, strict=False)]
    return inputs, outputs


def export_keras(model: Any, flavor: str):
    """A function writing ``model`` as a TF SavedModel with a ``serving_default`` signature.

    Both Keras flavours use ``Model.export``: it traces only the serving function, so the
    export and every conversion from it are several times faster than from
    ``tf.saved_model.save`` (MobileNetV2: 3 s + 4 s per conversion against 17 s + 16 s).
    tf_keras models that cannot be exported that way (no known input signature) fall back
    to ``tf.saved_model.save``.
    """
    def export(folder: Path) -> None:
        if flavor == "keras3":
            model.export(str(folder), format="tf_saved_model", verbose=False)
            return
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints every captured variable
                model.export(str(folder))
        except Exception:  # noqa: BLE001 - any failure: the slower, general route
            shutil.rmtree(folder, ignore_errors=True)
            tensorflow().saved_model.save(model, str(folder))
    return export


def load_saved_model(path: Path, safe_mode: bool = True) -> LoadedModel:
    """Load a SavedModel folder; in safe mode only after its graph passed ``check_saved_model``."""
    tf = tensorflow()
    if safe_mode:
        check_saved_model(path)
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise QpipeError(f"model: SavedModel {path} has no 'serving_default' signature")
    specs = signature.structured_input_signature[1]
    inputs = [TensorInfo(name, _shape(spec.shape), spec.dtype.name) for name, spec in sorted(specs.items())]
    outs = signature.structured_outputs
    outputs = [TensorInfo(name, _shape(spec.shape), spec.dtype.name) for name, spec in sorted(outs.items())]
    return LoadedModel(model=loaded, flavor="saved_model", inputs=inputs, outputs=outputs, path=path,
                       sha256=file_sha256(path), source=str(path))


@qpipe.hookimpl(trylast=True)
def qpipe_load_model(source, base_dir: Path) -> LoadedModel:
    """Load a .keras/.h5 file (Keras 3 or tf_keras), a SavedModel folder, or module:function."""
    if source.function:
        model = call_function(source.function, base_dir, "model")
        flavor = _flavor_of(model)
        inputs, outputs = keras_tensors(model, flavor)
        return LoadedModel(model=model, flavor=flavor, inputs=inputs, outputs=outputs,
                           source=source.function, exporter=export_keras(model, flavor))
    path = (base_dir / source.path).resolve()
    if not path.exists():
        raise QpipeError(f"model: file not found: {path} (paths are relative to the pipeline file)")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise QpipeError(f"model: {path} is a folder without saved_model.pb; give a .keras/.h5 file "
                             "or a SavedModel folder")
        return load_saved_model(path, source.safe_mode)
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise QpipeError(f"model: {path.name}: expected a .keras or .h5 file or a SavedModel folder")
    with quiet():
        model, flavor = load_keras_file(path, source.safe_mode)
    inputs, outputs = keras_tensors(model, flavor)
    return LoadedModel(model=model, flavor=flavor, inputs=inputs, outputs=outputs, path=path,
                       sha256=file_sha256(path), source=str(path), exporter=export_keras(model, flavor))


# --------------------------------------------------------------------------- components


class KerasOriginal(Quantizer):
    """The original model, unconverted: a reference variant run by the keras backend."""

    name = "keras.original"
    default_backend = "keras"
    output_format = "keras"

    def quantize(self, ctx) -> Artifact:
        model = ctx.model
        if model.path is not None:
            target = ctx.artifact_path(model.path.suffix if model.path.is_file() else "")
            for link in copy_without_links(model.path, target):  # an untrusted folder's links stay behind
                ctx.warn(f"{model.path.name}/{link} is a symbolic link; it was not copied into the output", "symlink")
        else:
            target = ctx.artifact_path(".keras")
            model.model.save(target)
        return Artifact(path=target, format="keras", metadata={"engine": model.flavor})


class KerasRunner(Runner):
    def __init__(self, model: LoadedModel):
        self.loaded = model
        self.names = [t.name for t in model.outputs]

    def predict_batch(self, inputs: dict[str, np.ndarray]) -> Any:
        """The output's array; ``{output name: array}`` for a model with several outputs."""
        model = self.loaded.model
        if self.loaded.flavor == "saved_model":
            tf = tensorflow()
            out = model.signatures["serving_default"](**{k: tf.constant(v) for k, v in inputs.items()})
        else:
            out = model(list(inputs.values())[0] if len(inputs) == 1 else inputs, training=False)
        if isinstance(out, dict):
            out = [out[n] for n in self.names] if set(self.names) <= set(out) else list(out.values())
        if isinstance(out, (list, tuple)):
            if len(out) == 1:
                return np.asarray(out[0])
            return {name: np.asarray(o) for name, o in zip(self.names, out, strict=False)}
        return np.asarray(out)


class KerasBackendOptions(qpipe.Options):
    batch_size: int = Field(256, ge=1, description="samples per call during evaluation")


class KerasBackend(Backend):
    """Runs the original model in TensorFlow (the float reference)."""

    name = "keras"
    formats = ("keras",)
    Options = KerasBackendOptions

    def load(self, artifact: Artifact, model: LoadedModel) -> Runner:
        return KerasRunner(model)


@qpipe.hookimpl
def qpipe_register_quantizers(register) -> None:
    from qpipe_keras.bfloat16 import KerasBfloat16

    register(KerasOriginal)
    register(KerasBfloat16)


@qpipe.hookimpl
def qpipe_register_backends(register) -> None:
    from qpipe_keras.bfloat16 import KerasBfloat16Backend

    register(KerasBackend)
    register(KerasBfloat16Backend)
