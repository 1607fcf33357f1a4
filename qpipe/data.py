"""Data sources (``.npz`` files, ``module:function``) and the Dataset the stages share.

A Dataset holds one array per model input (keyed by the model's input name) and optional
labels. Loading never unpickles (``allow_pickle=False``), and a ``tf.data.Dataset`` is
read by duck typing, so this module does not import TensorFlow.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from qpipe.components import TensorInfo
from qpipe.errors import DataError, QpipeError


@dataclass
class Dataset:
    """Inputs by model input name, labels (or ``None``), all with the same first dimension."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive batches of inputs (the last one may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield {name: arr[start:start + batch_size] for name, arr in self.inputs.items()}

    def take(self, indices: Sequence[int] | np.ndarray) -> "Dataset":
        """A new Dataset with the rows at ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(
            inputs={k: np.asarray(v[idx]) for k, v in self.inputs.items()},
            labels=None if self.labels is None else np.asarray(self.labels[idx]),
        )

    def single_input(self) -> np.ndarray:
        """The input array of a single-input model."""
        if len(self.inputs) != 1:
            raise DataError(f"expected one input, got {sorted(self.inputs)}")
        return next(iter(self.inputs.values()))

    def class_labels(self) -> np.ndarray | None:
        """Labels as integer class ids (one-hot labels are arg-maxed)."""
        if self.labels is None:
            return None
        labels = np.asarray(self.labels)
        if labels.ndim == 2 and labels.shape[1] > 1:
            return labels.argmax(axis=1)
        return labels.reshape(len(labels)).astype(np.int64)


def load_source(source: Any, base_dir: Path, what: str) -> tuple[dict[str, np.ndarray] | np.ndarray, np.ndarray | None]:
    """Load a DataSource: returns (inputs as one array or a name -> array mapping, labels)."""
    if source.path:
        arrays = _load_npz(base_dir / source.path, what)
    else:
        produced = call_function(source.function, base_dir, what)
        arrays = _arrays_from(produced, what)
    return _pick(arrays, source.inputs, source.labels, what)


def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"{what}: file not found: {path}")
    if path.suffix != ".npz":
        raise DataError(f"{what}: expected an .npz file with named arrays, got {path.name}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
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
        func = module
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


def _pick(arrays: dict[str, np.ndarray], inputs: Any, labels: str | None, what: str):
    def get(key: str) -> np.ndarray:
        if key not in arrays:
            raise DataError(f"{what}: no array '{key}'; the source has: {', '.join(sorted(arrays))}")
        return arrays[key]

    if inputs is None:
        candidates = [k for k in arrays if k != (labels or "y")]
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
    y = get(labels) if labels else None
    return x, y


def bind_to_model(raw: tuple, model_inputs: list[TensorInfo], what: str) -> Dataset:
    """Match loaded arrays to the model's inputs, checking count, names, shapes and dtypes."""
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
        arr = np.asarray(named[info.name])
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{what}: input '{info.name}' has dtype {arr.dtype}; the model expects "
                            f"numeric {info.dtype}")
        _check_shape(arr, info, what)
        out[info.name] = arr.astype(info.dtype, copy=False) if info.dtype else arr
    n = {len(a) for a in out.values()}
    if len(n) != 1:
        raise DataError(f"{what}: inputs have different numbers of rows: {sorted(n)}")
    count = n.pop()
    if count == 0:
        raise DataError(f"{what}: the data is empty (0 rows)")
    if y is not None:
        y = np.asarray(y)
        if len(y) != count:
            raise DataError(f"{what}: {count} input rows but {len(y)} labels")
        if y.dtype.kind not in "biuf":
            raise DataError(f"{what}: labels have dtype {y.dtype}; expected numbers")
    return Dataset(inputs=out, labels=y)


def _check_shape(arr: np.ndarray, info: TensorInfo, what: str) -> None:
    expected = tuple(info.shape[1:])
    got = tuple(arr.shape[1:])
    fits = len(expected) == len(got) and all(e is None or e == g for e, g in zip(expected, got))
    if not fits:
        fmt = lambda s: "(N, " + ", ".join("?" if d is None else str(d) for d in s) + ")"  # noqa: E731
        raise DataError(f"{what}: input '{info.name}' has shape {fmt(got)} but the model expects "
                        f"{fmt(expected)}; reshape the data to fit")
