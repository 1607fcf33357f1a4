"""Data sources (``.npz`` files, ``module:function``) and the Dataset the stages share.

A Dataset holds one array per model input (keyed by the model's input name) and optional
labels. Loading never unpickles (``allow_pickle=False``), and a ``tf.data.Dataset`` is
read by duck typing, so this module does not import TensorFlow.

Large arrays stored uncompressed (``numpy.savez`` members, ``.npy`` files) are not loaded:
they become ``qpipe.lazyarray.LazyArray``s, read from the file a batch at a time.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from qpipe.components import TensorInfo
from qpipe.datacheck import BlockCheck, check_class_labels, check_npy_file, check_npz_file, check_values
from qpipe.errors import DataError, QpipeError
from qpipe.lazyarray import LazyArray, lazy_npy, lazy_npz_members


@dataclass
class Dataset:
    """Inputs by model input name, labels (or ``None``), all with the same first dimension.

    For a model with several outputs ``labels`` is ``{output name: array}`` (the labelled
    outputs only); ``for_output`` gives the Dataset an evaluator of one output sees.
    """

    inputs: dict[str, np.ndarray]
    labels: Any = None  # np.ndarray | dict[str, np.ndarray] | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches of inputs (the last one may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield {name: arr[start:start + batch_size] for name, arr in self.inputs.items()}

    def take(self, indices: Sequence[int] | np.ndarray) -> "Dataset":
        """A new Dataset with the rows at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.labels, dict):
            labels: Any = {name: np.asarray(y[idx]) for name, y in self.labels.items()}
        else:
            labels = None if self.labels is None else np.asarray(self.labels[idx])
        return Dataset(inputs={k: np.asarray(v[idx]) for k, v in self.inputs.items()}, labels=labels)

    def for_output(self, output: str) -> "Dataset":
        """The same inputs with the labels of ``output`` (None when it has none)."""
        labels = self.labels.get(output) if isinstance(self.labels, dict) else self.labels
        return Dataset(inputs=self.inputs, labels=labels)

    def single_input(self) -> np.ndarray:
        """The input array of a single-input model."""
        if len(self.inputs) != 1:
            raise DataError(f"expected one input, got {sorted(self.inputs)}")
        return next(iter(self.inputs.values()))

    def class_labels(self, classes: int | None = None) -> np.ndarray | None:
        """Labels as integer class ids (one-hot labels are arg-maxed).

        A DataError names the first label that is not a class id: a fraction, NaN, negative,
        or (given the model's number of outputs ``classes``) out of range or one-hot of
        another width.
        """
        if self.labels is None:
            return None
        if isinstance(self.labels, dict):  # several outputs: the first whose labels are class ids
            for labels in self.labels.values():
                try:
                    return check_class_labels(labels, None)
                except DataError:
                    continue
            return None
        return check_class_labels(self.labels, classes)


def load_source(source: Any, base_dir: Path, what: str) -> tuple[dict[str, np.ndarray] | np.ndarray, np.ndarray | None]:
    """Load a DataSource: returns (inputs as one array or a name -> array mapping, labels)."""
    if source.path:
        arrays = _load_npz(base_dir / source.path, what)
    else:
        produced = call_function(source.function, base_dir, what)
        arrays = _arrays_from(produced, what)
    return _pick(arrays, source.inputs, source.labels, what)


def _load_npz(path: Path, what: str) -> dict[str, Any]:  # arrays, or LazyArray for big members
    """Named arrays of an .npz file, a .npy file (as ``x``) or a folder of .npy files (by stem)."""
    if not path.exists():
        raise DataError(f"{what}: file not found: {path}")
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DataError(f"{what}: the folder {path.name} holds no .npy files")
        return {f.stem: _load_npz(f, what)["x"] for f in files}
    if path.suffix not in (".npz", ".npy"):
        raise DataError(f"{what}: expected an .npz file with named arrays (or .npy files), got {path.name}")
    try:
        if path.suffix == ".npy":
            check_npy_file(path, what)
            lazy = lazy_npy(path)
            return {"x": lazy if lazy is not None else np.load(path, allow_pickle=False)}
        check_npz_file(path, what)
        lazy_members = lazy_npz_members(path)
        with np.load(path, allow_pickle=False) as npz:
            return {key: lazy_members.get(key) if key in lazy_members else npz[key] for key in npz.files}
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"{what}: cannot read {path.name} without unpickling ({exc}); "
                        "save plain numeric arrays with numpy.savez") from None
    except Exception as exc:
        raise DataError(f"{what}: cannot read {path.name}: {exc}") from None


def call_function(ref: str, base_dir: Path, what: str) -> Any:
    """Import and call 'package.module:function'; the pipeline's folder is importable."""
    module_name, _, attr = ref.partition(":")
    added = str(base_dir) not in sys.path
    if added:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
        func: Any = module
        for part in attr.split("."):
            func = getattr(func, part)
    except (ImportError, AttributeError) as exc:
        raise QpipeError(f"{what}: cannot import '{ref}': {exc}") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    try:
        return func()
    except QpipeError:
        raise
    except SystemExit as exc:
        raise QpipeError(f"{what}: '{ref}' called sys.exit({exc.code!r}) instead of returning a value; "
                         "point 'function:' at a function that returns one") from None
    except Exception as exc:
        raise QpipeError(f"{what}: '{ref}' raised {type(exc).__name__}: {exc}") from exc


def _arrays_from(produced: Any, what: str) -> dict[str, np.ndarray]:
    """Normalise what a data function returned into named arrays ('x', 'y' for tuples)."""
    if hasattr(produced, "as_numpy_iterator"):  # tf.data.Dataset, without importing TF
        return _from_tf_dataset(produced, what)
    if isinstance(produced, dict):
        return {str(k): np.asarray(v) for k, v in produced.items()}
    if isinstance(produced, (tuple, list)):
        if len(produced) == 2:
            x, y = produced
            if isinstance(x, dict):
                return {**{str(k): np.asarray(v) for k, v in x.items()}, "y": np.asarray(y)}
            return {"x": np.asarray(x), "y": np.asarray(y)}
        if len(produced) == 1:
            return {"x": np.asarray(produced[0])}
    if isinstance(produced, np.ndarray):
        return {"x": produced}
    raise DataError(f"{what}: the data function returned {type(produced).__name__}; expected "
                    "(inputs, labels), a dict of arrays, an array or a tf.data.Dataset")


def _from_tf_dataset(ds: Any, what: str) -> dict[str, np.ndarray]:
    xs: list[Any] = []
    ys: list[Any] = []
    for element in ds.as_numpy_iterator():
        if isinstance(element, tuple) and len(element) == 2:
            xs.append(element[0])
            ys.append(element[1])
        else:
            xs.append(element)
    if not xs:
        raise DataError(f"{what}: the tf.data.Dataset is empty")
    batched = np.ndim(xs[0] if not isinstance(xs[0], dict) else next(iter(xs[0].values()))) > 0
    join = np.concatenate if _looks_batched(ds) and batched else np.stack
    out: dict[str, np.ndarray] = {}
    if isinstance(xs[0], dict):
        for key in xs[0]:
            out[str(key)] = join([x[key] for x in xs])
    else:
        out["x"] = join(xs)
    if ys:
        out["y"] = join(ys)
    return out


def _looks_batched(ds: Any) -> bool:
    spec = getattr(ds, "element_spec", None)
    first = spec[0] if isinstance(spec, tuple) else spec
    if isinstance(first, dict):
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return bool(shape is not None and len(shape) > 0 and shape[0] is None)


def _pick(arrays: dict[str, np.ndarray], inputs: Any, labels: str | dict[str, str] | None, what: str):
    def get(key: str) -> np.ndarray:
        if key not in arrays:
            raise DataError(f"{what}: no array '{key}'; the source has: {', '.join(sorted(arrays))}")
        return arrays[key]

    if inputs is None:
        label_keys = set(labels.values()) if isinstance(labels, dict) else {labels or "y"}
        candidates = [k for k in arrays if k not in label_keys]
        if "x" in arrays:
            inputs = "x"
        elif len(candidates) == 1:
            inputs = candidates[0]
        else:
            raise DataError(f"{what}: say which array is the input with 'inputs:' "
                            f"(the source has: {', '.join(sorted(arrays))})")
    if labels is None and "y" in arrays and inputs != "y":
        labels = "y"
    x = {name: get(key) for name, key in inputs.items()} if isinstance(inputs, dict) else get(inputs)
    y = {name: get(key) for name, key in labels.items()} if isinstance(labels, dict) else get(labels) if labels else None
    return x, y


def match_inputs(wanted: Iterable[str], given: Iterable[str], what: str) -> dict[str, str]:
    """{name ``what`` (an artifact) wants: key of ``given`` that feeds it}.

    One input and one array match whatever their names (artifact formats rename inputs);
    otherwise names must match, and a missing one is a DataError naming ``what``.
    """
    wanted, given = list(wanted), list(given)
    if len(wanted) == 1 and len(given) == 1:
        return {wanted[0]: given[0]}
    missing = [name for name in wanted if name not in given]
    if missing:
        raise DataError(f"{what} expects inputs {sorted(wanted)}; the data has {sorted(given)} (missing {missing})")
    return {name: name for name in wanted}


def bind_to_model(raw: tuple, model_inputs: list[TensorInfo], what: str, allow_nonfinite: bool = False,
                  model_outputs: list[TensorInfo] | None = None) -> Dataset:
    """Match loaded arrays to the model's inputs, checking count, names, shapes, dtypes and
    values (NaN/Inf, overflow on the cast to the model's dtype; streamed arrays as they are read);
    labels to its outputs (``bind_labels``)."""
    x, y = raw
    if isinstance(x, dict):
        expected = [t.name for t in model_inputs]
        missing = [n for n in expected if n not in x]
        extra = [n for n in x if n not in expected]
        if missing or extra:
            raise DataError(f"{what}: inputs {sorted(x)} do not match the model's inputs {expected}; "
                            "map each model input name to an array key under 'inputs:'")
        named = dict(x)
    else:
        if len(model_inputs) != 1:
            raise DataError(f"{what}: the model has {len(model_inputs)} inputs "
                            f"({', '.join(t.name for t in model_inputs)}); give 'inputs:' as a mapping "
                            "of input name to array key")
        named = {model_inputs[0].name: x}
    out: dict[str, np.ndarray] = {}
    for info in model_inputs:
        arr = named[info.name] if isinstance(named[info.name], LazyArray) else np.asarray(named[info.name])
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{what}: input '{info.name}' has dtype {arr.dtype}; the model expects "
                            f"numeric {info.dtype}")
        _check_shape(arr, info, what)
        if isinstance(arr, LazyArray):
            arr.check = BlockCheck(f"input '{info.name}'", what, info.dtype or None, allow_nonfinite)
        else:
            check_values(arr, f"input '{info.name}'", what, info.dtype or None, allow_nonfinite=allow_nonfinite)
        out[info.name] = arr.astype(info.dtype, copy=False) if info.dtype else arr
    n = {len(a) for a in out.values()}
    if len(n) != 1:
        raise DataError(f"{what}: inputs have different numbers of rows: {sorted(n)}")
    count = n.pop()
    if count == 0:
        raise DataError(f"{what}: the data is empty (0 rows)")
    labels = bind_labels(y, [t.name for t in model_outputs or []], count, what, allow_nonfinite)
    return Dataset(inputs=out, labels=labels)


def bind_labels(y: Any, outputs: list[str], count: int, what: str, allow_nonfinite: bool = False) -> Any:
    """Labels checked against the model's ``outputs``: an array for a single-output model,
    ``{output name: array}`` for several (one label array must then say its output)."""
    if y is None:
        return None
    if isinstance(y, dict):
        unknown = [name for name in y if name not in outputs]
        if unknown and len(outputs) > 1 or len(y) > 1 and len(outputs) <= 1:
            raise DataError(f"{what}.labels: no model output '{unknown[0] if unknown else list(y)[1]}'; the "
                            f"model's outputs are: {', '.join(outputs) or 'one unnamed output'}")
        if len(outputs) <= 1:
            y = next(iter(y.values()))
        else:
            return {name: _label_array(y[name], count, f"{what}.labels.{name}", allow_nonfinite)
                    for name in outputs if name in y}
    elif len(outputs) > 1:
        raise DataError(f"{what}.labels: the model has {len(outputs)} outputs ({', '.join(outputs)}); say "
                        f"which output the labels belong to with a mapping, e.g. labels: {{{outputs[0]}: KEY}}")
    return _label_array(y, count, what, allow_nonfinite)


def _label_array(y: Any, count: int, what: str, allow_nonfinite: bool) -> np.ndarray:
    y = np.asarray(y)
    if len(y) != count:
        raise DataError(f"{what}: {count} input rows but {len(y)} labels")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{what}: labels have dtype {y.dtype}; expected numbers")
    check_values(y, "the label array", what, allow_nonfinite=allow_nonfinite)
    return y


def _check_shape(arr: np.ndarray, info: TensorInfo, what: str) -> None:
    expected = tuple(info.shape[1:])
    got = tuple(arr.shape[1:])
    fits = len(expected) == len(got) and all(e is None or e == g for e, g in zip(expected, got, strict=False))
    if not fits:
        fmt = lambda s: "(N, " + ", ".join("?" if d is None else str(d) for d in s) + ")"  # noqa: E731
        raise DataError(f"{what}: input '{info.name}' has shape {fmt(got)} but the model expects "
                        f"{fmt(expected)}; reshape the data to fit")
