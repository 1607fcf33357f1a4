"""The model's float32 .tflite, converted once per run and shared by every plugin, the
calibration of ai-edge-quantizer recipes applied to such a flatbuffer, and reading a .tflite's
inputs and outputs (names, quantized values) the same way in every interpreter-based backend,
and the ops of a .tflite that still compute in float (``float_ops``).

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
from qpipe.heads import name_outputs

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
    """The tensor's quantized values -> float32, with its scale and zero point. A true integer
    tensor (no scale: ids, an argmax) stays integer."""
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f":
        return values.astype(np.float32, copy=False)
    if not scale:
        return values
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


#: ops that only move values between float and integer, or reshape them: not float compute
_NOT_COMPUTE = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE"}


def float_ops(flatbuffer: bytes) -> list[str]:
    """Names of the ops of a .tflite (first subgraph) that read or write float activations:
    empty for a full-integer model. Weights, boundary (QUANTIZE/DEQUANTIZE) and shape ops aside."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    graph = model.subgraphs[0]
    floats = {schema.TensorType.FLOAT32, schema.TensorType.FLOAT16}
    produced = {int(t) for op in graph.operators for t in (op.outputs if op.outputs is not None else [])}
    graph_inputs = {int(t) for t in (graph.inputs if graph.inputs is not None else [])}

    def activation(index: int) -> bool:  # computed or fed at run time, not a stored constant
        return index >= 0 and (index in produced or index in graph_inputs)

    found = []
    for op in graph.operators:
        name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) or "CUSTOM"
        tensors = [int(t) for t in list(op.inputs if op.inputs is not None else []) +
                   list(op.outputs if op.outputs is not None else [])]
        if name not in _NOT_COMPUTE and any(activation(t) and graph.tensors[t].type in floats for t in tensors):
            found.append(name)
    return found


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
    # each input in the float model's own type: token ids (int32) stay integers
    dtypes = {sig: np.dtype(d["dtype"]) for sig, d in interpreter.get_signature_runner(key).get_input_details().items()}
    return [{key: [{sig: np.asarray(data.inputs[ours][i:i + step]).astype(dtypes[sig], copy=False)
                    for sig, ours in mapping.items()}]}
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


def tflite_outputs(flatbuffer: bytes, data: Dataset, limit: int = 256, threads: int = 1,
                   batch_size: int = 64, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every output of ``flatbuffer`` on (up to ``limit`` of) ``data``'s samples, float32, by
    signature output name in signature order (by the model's output ``names``, as labels and
    metrics name them, when given for a model with several), run in batches with LiteRT.

    Integer inputs are fed in their own type (token ids stay ids), quantized inputs are
    quantized and quantized outputs dequantized. A model whose batch dimension is fixed is
    run at that batch (the last batch padded and cut back).
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(flatbuffer), num_threads=max(1, threads))
    interpreter.allocate_tensors()
    inputs = tensors_by_name(interpreter, "inputs")
    mapping = match_inputs(list(inputs), data.inputs, "the .tflite")
    fixed = {int(d["shape_signature"][0]) for d in inputs.values()
             if len(d["shape_signature"]) and d["shape_signature"][0] > 0}
    step = min(fixed) if fixed else max(1, batch_size)
    count = min(limit, len(data))
    shapes = {name: tuple(d["shape"]) for name, d in inputs.items()}
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, step):
        take = min(step, count - start)
        rows = np.arange(start, start + take)
        if fixed and take < step:  # a fixed batch: pad with the last sample, cut back below
            rows = np.concatenate([rows, np.full(step - take, rows[-1])])
        feeds = {name: np.asarray(data.inputs[ours][rows]) for name, ours in mapping.items()}
        if any(shapes[name] != values.shape for name, values in feeds.items()):
            for name, values in feeds.items():
                interpreter.resize_tensor_input(inputs[name]["index"], list(values.shape))
                shapes[name] = values.shape
            interpreter.allocate_tensors()
            inputs = tensors_by_name(interpreter, "inputs")
        for name, values in feeds.items():
            interpreter.set_tensor(inputs[name]["index"], quantize_array(values, inputs[name]))
        interpreter.invoke()
        for name, detail in tensors_by_name(interpreter, "outputs").items():
            parts.setdefault(name, []).append(dequantize_array(interpreter.get_tensor(detail["index"]), detail)[:take])
    outputs = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    if names and len(names) > 1:
        named = name_outputs(outputs, names, "the .tflite")
        return named if isinstance(named, dict) else outputs
    return outputs


def predict_tflite(flatbuffer: bytes, data: Dataset, limit: int = 256) -> np.ndarray:
    """The first output of ``flatbuffer`` on (up to ``limit`` of) ``data``'s samples, float32,
    one row per sample (``tflite_outputs`` gives every output)."""
    first = next(iter(tflite_outputs(flatbuffer, data, limit).values()))
    return first.reshape(len(first), -1)


def output_spread(values: np.ndarray, squared: bool = False) -> float:
    """How much an output varies over the samples: its mean absolute (or squared) deviation
    from its per-element mean; its mean magnitude when it is constant (never 0)."""
    deviation = np.abs(values - values.mean(axis=0))
    spread = float(np.mean(deviation ** 2 if squared else deviation))
    if spread > 0:
        return spread
    return max(float(np.mean(values ** 2 if squared else np.abs(values))), 1e-12)


def relative_errors(expected: dict[str, np.ndarray], got: dict[str, np.ndarray],
                    squared: bool = False) -> dict[str, float]:
    """{output: error} of ``got`` against ``expected`` (the float model's), each output's mean
    absolute (or squared) difference over its own spread (``output_spread``): 0 for a copy,
    about 1 for an output stuck at its mean, comparable across a softmax and a regression head."""
    errors = {}
    for name, reference in expected.items():
        reference = reference.astype(np.float64)
        difference = np.abs(got[name].astype(np.float64).reshape(reference.shape) - reference)
        errors[name] = float(np.mean(difference ** 2 if squared else difference)) / output_spread(reference, squared)
    return errors


def output_error(reference: bytes, candidates: dict[str, bytes], data: Dataset, limit: int = 256) -> dict[str, float]:
    """How far each candidate .tflite's outputs are from ``reference``'s (the float model) on up
    to ``limit`` samples of ``data``: {candidate name: error}, the mean over every output of its
    relative error (``relative_errors``: mean absolute difference over the output's spread)."""
    expected = tflite_outputs(reference, data, limit)
    return {name: float(np.mean(list(relative_errors(expected, tflite_outputs(model, data, limit)).values())))
            for name, model in candidates.items()}
