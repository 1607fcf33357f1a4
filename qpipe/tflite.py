"""Toolkit for quantizers that write TFLite flatbuffers, public API.

- ``representative_dataset(samples)``: the calibration samples one at a time, as the TFLite
  converter's ``representative_dataset`` wants them (pass ``ctx.calibration`` or a Dataset);
  integer inputs (token ids) stay integer, float ones are float32.
- ``configure(converter, mode, samples, io, per_channel)``: set up a converter for ``float32``,
  ``dynamic``, ``float16``, ``int8`` or ``int16x8`` (full-integer modes take samples).
- ``convert_keras(model, mode, ...)``: a Keras model (tf_keras, or Keras 3 through a SavedModel
  export) to .tflite bytes; a converter failure is one ``QpipeError`` line.
- ``convert(converter)``: ``converter.convert()`` in the run's converter process, so a converter
  that crashes (segfault, abort) fails one conversion, not the run (``qpipe.convertproc``).

TensorFlow is imported when a function is called.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from qpipe.components import Calibration
from qpipe.data import Dataset
from qpipe.errors import QpipeError, short_error

Mode = Literal["float32", "dynamic", "float16", "int8", "int16x8"]
FULL_INTEGER = {"int8": 8, "int16x8": 16}


def input_dtype(values: Any, dtype: Any = None) -> np.dtype:
    """The dtype a model input is fed in: ``dtype`` when known (the model's), else the data's own
    integer or boolean type (token ids stay ids), float32 for float data."""
    if dtype is not None:
        return np.dtype(dtype)
    kind = np.dtype(values.dtype).kind
    return np.dtype(values.dtype) if kind in "biu" else np.dtype(np.float32)


def representative_dataset(samples: Calibration | Dataset, dtypes: dict[str, Any] | None = None,
                           batch: int = 1) -> Iterator[Any]:
    """One sample at a time, as the converter wants it (a list, or a dict for several inputs).

    Each input keeps its type: ``dtypes`` ({input name: dtype}, e.g. the model's) when given,
    else integer data stays integer (an int32 token-id input must be fed int32) and float data
    is float32. For a model with a fixed batch ``batch`` > 1, ``batch`` samples at a time (the
    last group filled up with the first samples again, so the ranges see only real values).
    """
    data = samples.samples if isinstance(samples, Calibration) else samples
    names = list(data.inputs)
    types = {name: input_dtype(data.inputs[name], (dtypes or {}).get(name)) for name in names}
    if batch > 1:
        yield from _groups(data, names, batch, types)
        return
    for i in range(len(data)):
        row = {name: np.asarray(data.inputs[name][i:i + 1]).astype(types[name], copy=False) for name in names}
        yield [row[names[0]]] if len(names) == 1 else row


def _groups(data: Dataset, names: list[str], batch: int, types: dict[str, np.dtype]) -> Iterator[Any]:
    first = {name: np.asarray(data.inputs[name][:batch]).astype(types[name], copy=False) for name in names}
    for i in range(0, len(data), batch):
        group = {name: np.asarray(data.inputs[name][i:i + batch]).astype(types[name], copy=False) for name in names}
        while len(group[names[0]]) < batch:  # fill up with the first samples again
            short = batch - len(group[names[0]])
            group = {name: np.concatenate([group[name], first[name][:short]]) for name in names}
        yield [group[names[0]]] if len(names) == 1 else group


def convert(converter: Any) -> bytes:
    """``converter.convert()`` in the run's converter process, as bytes.

    A converter built ``from_saved_model`` is rebuilt with the same settings in a worker process
    started once per run; when the converter kills that process (a segfault in its calibration,
    an abort, out of memory) the call raises a ``QpipeError`` naming the signal, and the next
    call starts a new worker. Other converters convert in this process.
    """
    from qpipe.convertproc import convert as in_worker

    return in_worker(converter)


def set_per_tensor(converter: Any) -> None:
    """Ask the converter for one weight scale per tensor instead of per output channel.

    These are private converter flags (there is no public switch): check they still exist.
    """
    if not hasattr(converter, "_experimental_disable_per_channel"):
        raise QpipeError("this TensorFlow's converter has no per-tensor switch; use per_channel: true")
    converter._experimental_disable_per_channel = True
    if hasattr(converter, "_experimental_disable_per_channel_quantization_for_dense_layers"):
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True


def configure(converter: Any, mode: Mode, samples: Calibration | Dataset | None = None,
              io: str = "float32", per_channel: bool = True) -> None:
    """Set ``converter`` up for ``mode``; ``io`` (int8, uint8, int16) types a full-integer model's I/O."""
    from qpipe.tfenv import tensorflow

    tf = tensorflow()
    if mode == "float32":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in FULL_INTEGER:
        if samples is None:
            raise QpipeError(f"{mode} conversion needs calibration samples (give the variant a calibrator)")
        converter.representative_dataset = lambda: representative_dataset(samples)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if mode == "int8"
            else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        if io != "float32":
            converter.inference_input_type = converter.inference_output_type = getattr(tf, io)
    if not per_channel:
        set_per_tensor(converter)


def convert_keras(model: Any, mode: Mode = "float32", samples: Calibration | Dataset | None = None,
                  io: str = "float32", per_channel: bool = True) -> bytes:
    """A tf_keras or Keras 3 model as .tflite bytes, converted for ``mode`` (see ``configure``)."""
    from qpipe.tfenv import quiet, tensorflow

    tf = tensorflow()
    with tempfile.TemporaryDirectory(prefix="qpipe-convert-") as tmp, quiet():
        if type(model).__module__.startswith("keras."):  # Keras 3: only through a SavedModel (NOTES.md)
            model.export(str(Path(tmp) / "model"), verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "model"))
        else:
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
        configure(converter, mode, samples, io, per_channel)
        try:
            return convert(converter)
        except QpipeError:
            raise
        except Exception as exc:
            raise QpipeError(f"TFLite {mode} conversion failed: {short_error(exc)}") from exc
