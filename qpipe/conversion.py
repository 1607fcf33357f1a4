"""The model's float32 .tflite, converted once per run and shared by every plugin, the
calibration of ai-edge-quantizer recipes applied to such a flatbuffer, and reading a .tflite's
inputs and outputs (names, quantized values) the same way in every interpreter-based backend.

The TFLite converter is the slow step (tens of seconds on real architectures); quantizers
that start from a float flatbuffer (``ai-edge-quantizer`` recipes, the float32 baseline)
all take this one conversion instead of paying for their own. TensorFlow, LiteRT and
ai-edge-quantizer are imported inside the functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from qpipe.components import LoadedModel
from qpipe.data import Dataset, match_inputs
from qpipe.errors import QpipeError, short_error

MEMO_KEY = "qpipe.float_tflite"
#: the memo keys of the float conversion's failure and of the fixed batch a model needed
FAILED_KEY, FIXED_KEY = "qpipe.float_tflite.failed", "qpipe.fixed_batch"
#: the batch a dynamic-batch model is converted at when the converter cannot do it dynamic
FIXED_BATCH = 1


def float_tflite(model: LoadedModel, report: Callable[[str], None] | None = None) -> bytes:
    """The float32 .tflite of ``model`` (converted from its SavedModel on first use).

    A model the converter takes only at a fixed batch (recurrent layers) is converted at
    ``FIXED_BATCH`` (``fixed_batch(model)`` says so). A failure is kept: every later call in
    the run fails at once with the same message instead of converting again.
    """
    failed = earlier_failure(model)
    if failed is not None:
        raise QpipeError(failed)

    def convert() -> bytes:
        if report is not None:
            report("converting to a float .tflite (once per run)")
        try:
            return convert_saved_model(model, lambda converter: None, report)
        except QpipeError as exc:
            model._memo[FAILED_KEY] = str(exc).removeprefix("TFLite conversion failed: ")
            raise

    return model.memo(MEMO_KEY, convert)


def earlier_failure(model: LoadedModel) -> str | None:
    """The error for a conversion of ``model`` not tried because its float conversion already
    failed in this run (the same SavedModel and converter would fail again), else None."""
    failed = model._memo.get(FAILED_KEY)
    return None if failed is None else f"not converted: the float TFLite conversion failed earlier in this run: {failed}"


def fixed_batch(model: LoadedModel) -> int | None:
    """The batch ``model`` had to be converted at in this run (None: its own batch dimension)."""
    return model._memo.get(FIXED_KEY) or None


def record_fixed_batch(ctx: Any, metadata: dict[str, Any]) -> None:
    """When ``ctx.model`` was converted at a fixed batch, say so: ``metadata["fixed_batch"]``
    and a ``fixed-batch`` warning on the variant (``ctx`` is a ``QuantizeContext``)."""
    batch = fixed_batch(ctx.model)
    if batch:
        metadata["fixed_batch"] = batch
        ctx.warn(f"converted at a fixed batch of {batch}: the TFLite converter cannot convert this model's "
                 f"recurrent layers (LSTM/GRU) with a dynamic batch; evaluated {batch} sample(s) per invoke",
                 "fixed-batch")


def model_batch(model: LoadedModel) -> int:
    """The batch the converter sees: the model's fixed batch dimension, else 1 per sample."""
    if fixed_batch(model):
        return FIXED_BATCH
    dims = [t.shape[0] for t in model.inputs if t.shape]
    return int(dims[0]) if dims and isinstance(dims[0], int) and dims[0] > 0 else 1


def convert_saved_model(model: LoadedModel, configure: Callable[[Any], bytes | None],
                        report: Callable[[str], None] | None = None, mode: str = "") -> bytes:
    """Convert ``model``'s SavedModel with a converter set up by ``configure``.

    ``configure(converter)`` sets the converter up and returns None (the converter is then
    converted with ``qpipe.tflite.convert``) or converts it itself and returns the bytes.
    The conversion runs in the run's converter process (``qpipe.tflite.convert``). When the
    converter cannot lower a dynamic-batch model's recurrent layers (LSTM, GRU: "TensorList"
    ops) the model is exported again at a fixed batch of ``FIXED_BATCH`` and converted from
    that; the next conversions of the run start there (``fixed_batch(model)``).
    """
    from qpipe.tfenv import quiet

    what = f"TFLite {mode + ' ' if mode else ''}conversion failed"
    if not fixed_batch(model):
        with quiet():
            path = model.saved_model_dir()
        try:
            return _convert_dir(path, configure)
        except Exception as exc:
            if not (_needs_fixed_batch(model, str(exc)) and FIXED_KEY not in model._memo):
                if _needs_fixed_batch(model, str(exc), flavors=("saved_model",)):
                    raise QpipeError(f"{what}: the converter cannot lower this SavedModel's recurrent layers "
                                     "(TensorList ops) with a dynamic batch; export it with a fixed batch, e.g. "
                                     f"input_signature=[tf.TensorSpec([1, ...])] ({short_error(exc)})") from exc
                if isinstance(exc, QpipeError):
                    raise
                raise QpipeError(f"{what}: {short_error(exc)}") from exc
            first = exc
        if report is not None:
            report(f"the converter cannot take this model at a dynamic batch; converting at batch {FIXED_BATCH}")
        try:
            with quiet():
                path = fixed_batch_saved_model(model, FIXED_BATCH)
            flatbuffer = _convert_dir(path, configure)
        except Exception as exc:
            model._memo[FIXED_KEY] = 0  # not again: the retry does not help this model
            raise QpipeError(f"{what}: {short_error(first)}; at a fixed batch of {FIXED_BATCH} too: "
                             f"{short_error(exc)}") from exc
        model._memo[FIXED_KEY] = FIXED_BATCH
        return flatbuffer
    try:
        return _convert_dir(fixed_batch_saved_model(model, FIXED_BATCH), configure)
    except QpipeError:
        raise
    except Exception as exc:
        raise QpipeError(f"{what} (at a fixed batch of {FIXED_BATCH}): {short_error(exc)}") from exc


def _convert_dir(path: Path, configure: Callable[[Any], bytes | None]) -> bytes:
    from qpipe.tfenv import quiet, tensorflow
    from qpipe.tflite import convert

    with quiet():
        converter = tensorflow().lite.TFLiteConverter.from_saved_model(str(path))
        flatbuffer = configure(converter)
        return flatbuffer if flatbuffer is not None else convert(converter)


def _needs_fixed_batch(model: LoadedModel, error: str, flavors: tuple[str, ...] = ("keras3", "tf_keras")) -> bool:
    """Whether a converter error is the dynamic-batch recurrent one a fixed batch avoids
    (for a model of ``flavors``: the ones qpipe can export again at a fixed batch)."""
    dynamic = any(t.shape and t.shape[0] is None for t in model.inputs)
    return dynamic and "TensorList" in error and model.flavor in flavors


def fixed_batch_saved_model(model: LoadedModel, batch: int) -> Path:
    """``model`` (Keras 3 or tf_keras) exported as a SavedModel whose inputs have batch ``batch``.

    Its ``serving_default`` signature has the same input and output names as the model's own
    export; only the batch dimension is fixed, which lets the converter lower LSTM/GRU loops.
    """
    def export() -> Path:
        import tempfile

        from qpipe.tfenv import tensorflow, tf_keras

        tf = tensorflow()
        specs = [tf.TensorSpec([batch, *t.shape[1:]], tf.as_dtype(t.dtype), name=t.name) for t in model.inputs]
        folder = Path(tempfile.mkdtemp(prefix="qpipe-savedmodel-fixed-")) / "model"
        keras_model = model.model
        if model.flavor == "keras3":
            keras_model.export(str(folder), format="tf_saved_model", verbose=False,
                               input_signature=[specs[0] if len(specs) == 1 else specs])
            return folder
        archive = tf_keras().export.ExportArchive()
        archive.track(keras_model)
        archive.add_endpoint(name="serve", input_signature=specs,
                             fn=lambda *xs: keras_model(xs[0] if len(xs) == 1 else list(xs), training=False))
        archive.write_out(str(folder))
        return folder

    if model.flavor not in ("keras3", "tf_keras"):
        raise QpipeError(f"a {model.flavor} model cannot be exported at a fixed batch; export it with a fixed "
                         "batch (e.g. input_signature=[tf.TensorSpec([1, ...])]) and give that SavedModel")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # ExportArchive prints every captured variable
        return model.memo(f"saved_model_dir.batch{batch}", export)


def signature_key(interpreter: Any) -> str | None:
    """The signature a LiteRT interpreter is run through: ``serving_default``, else its first
    one; None when the .tflite has no signature."""
    signatures = interpreter.get_signature_list()
    if not signatures:
        return None
    return "serving_default" if "serving_default" in signatures else next(iter(signatures))


def tensors_by_name(interpreter: Any, kind: str = "inputs") -> dict[str, dict]:
    """{name: tensor detail} of a LiteRT interpreter's ``inputs`` or ``outputs``, named as its
    signature names them (tensor names when it has none), in signature order."""
    details = interpreter.get_input_details() if kind == "inputs" else interpreter.get_output_details()
    key = signature_key(interpreter)
    if key is None:
        return {d["name"]: d for d in details}
    runner = interpreter.get_signature_runner(key)
    named = runner.get_input_details() if kind == "inputs" else runner.get_output_details()
    by_index = {d["index"]: d for d in details}
    return {name: by_index[d["index"]] for name, d in named.items()}


def quantize_array(values: np.ndarray, detail: dict) -> np.ndarray:
    """Float values -> the tensor's integer type, with its scale and zero point."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    if not scale:
        return values.astype(dtype)
    info = np.iinfo(dtype)
    q = np.divide(values, np.float32(scale), dtype=np.float32)  # one new array, then in place
    q += np.float32(zero_point)
    np.rint(q, out=q)
    np.clip(q, info.min, info.max, out=q)
    return q.astype(dtype)


def dequantize_array(values: np.ndarray, detail: dict) -> np.ndarray:
    """The tensor's integer values -> float32, with its scale and zero point."""
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f" or not scale:
        return values.astype(np.float32, copy=False)
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _signature_inputs(interpreter: Any) -> tuple[str, list[str]]:
    key = signature_key(interpreter)
    if key is None:
        raise QpipeError("the float .tflite has no signature; ai-edge-quantizer needs one (use engine: converter)")
    return key, list(interpreter.get_signature_list()[key]["inputs"])


#: most bytes of tensors one calibration step may hold (ai-edge-quantizer keeps every tensor)
STEP_BYTES = 256 << 20


def _samples_per_step(interpreter: Any, key: str, count: int) -> int:
    """Samples per calibration step: as many as fit in ``STEP_BYTES`` of tensors, or one when
    the model's batch dimension is fixed."""
    inputs = interpreter.get_signature_runner(key).get_input_details().values()
    if any(len(d["shape_signature"]) == 0 or d["shape_signature"][0] != -1 for d in inputs):
        return 1
    per_sample = sum(int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
                     for d in interpreter.get_tensor_details())
    return max(1, min(count, STEP_BYTES // max(1, per_sample)))


def calibration_data(flatbuffer: bytes, data: Dataset) -> list[dict[str, list[dict[str, Any]]]]:
    """The calibration samples as ai-edge-quantizer datasets, one per batch.

    Keyed by signature and signature input name, as ai-edge-quantizer wants them. Each batch
    is calibrated on its own and the ranges merged by ``merge_ranges``: ai-edge-quantizer
    otherwise smooths per-step min/max with a moving average, which on per-sample steps
    clips activations (16x the converter's output error on our tiny test model).
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    key, names = _signature_inputs(interpreter)
    mapping = match_inputs(names, data.inputs, "the float .tflite")
    step = _samples_per_step(interpreter, key, len(data))
    return [{key: [{sig: data.inputs[ours][i:i + step].astype("float32") for sig, ours in mapping.items()}]}
            for i in range(0, len(data), step)]


def merge_ranges(total: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """Tensor statistics of two calibration steps: the smallest min and the largest max."""
    merged = dict(total)
    for name, qsv in step.items():
        seen = merged.get(name)
        if seen and qsv and "min" in seen and "min" in qsv:
            merged[name] = {**seen, "min": np.minimum(seen["min"], qsv["min"]),
                            "max": np.maximum(seen["max"], qsv["max"])}
        elif not seen:
            merged[name] = qsv
    return merged


def calibrate_ai_edge_quantizer(engine: Any, flatbuffer: bytes, data: Dataset) -> dict[str, Any]:
    """Calibrate ai-edge-quantizer ``engine`` (a ``Quantizer`` over ``flatbuffer`` with its
    recipe loaded) on ``data``; return the tensor ranges to pass to ``engine.quantize``."""
    ranges: dict[str, Any] = {}
    for batch in calibration_data(flatbuffer, data):
        ranges = merge_ranges(ranges, engine.calibrate(batch))
    return ranges


# --------------------------------------------------------------------------- running a .tflite


def predict_tflite(flatbuffer: bytes, data: Dataset, limit: int = 256) -> np.ndarray:
    """The first output of ``flatbuffer`` on (up to ``limit`` of) ``data``'s samples, float32,
    run one sample at a time with LiteRT (integer inputs/outputs quantized and dequantized)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(flatbuffer))
    interpreter.allocate_tensors()
    inputs = tensors_by_name(interpreter, "inputs")
    output = next(iter(tensors_by_name(interpreter, "outputs").values()))
    mapping = match_inputs(list(inputs), data.inputs, "the .tflite")
    rows = []
    for i in range(min(limit, len(data))):
        for name, ours in mapping.items():
            values = np.asarray(data.inputs[ours][i:i + 1], dtype=np.float32)
            if tuple(inputs[name]["shape"]) != values.shape:
                interpreter.resize_tensor_input(inputs[name]["index"], list(values.shape))
                interpreter.allocate_tensors()
                inputs = tensors_by_name(interpreter, "inputs")
            interpreter.set_tensor(inputs[name]["index"], quantize_array(values, inputs[name]))
        interpreter.invoke()
        rows.append(dequantize_array(interpreter.get_tensor(output["index"]), output).reshape(1, -1))
    return np.concatenate(rows)


def output_error(reference: bytes, candidates: dict[str, bytes], data: Dataset, limit: int = 256) -> dict[str, float]:
    """Mean absolute difference of each candidate .tflite's outputs from ``reference``'s
    (the float model) on up to ``limit`` samples of ``data``: {candidate name: error}."""
    expected = predict_tflite(reference, data, limit)
    return {name: float(np.mean(np.abs(predict_tflite(model, data, limit) - expected)))
            for name, model in candidates.items()}
