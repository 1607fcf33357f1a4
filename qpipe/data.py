"""Data sources (``.npz`` files, ``module:function``) and the Dataset the stages share.

A Dataset holds one array per model input (keyed by the model's input name) and optional
labels. Loading never unpickles (``allow_pickle=False``), and a ``tf.data.Dataset`` is
read by duck typing, so this module does not import TensorFlow.

Large arrays stored uncompressed (``numpy.savez`` members, ``.npy`` files) are not loaded:
they become ``LazyArray``s whose rows are read from the file a batch at a time, so a
dataset of any size evaluates in the memory of one batch.
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from qpipe.components import TensorInfo
from qpipe.datacheck import BlockCheck, check_class_labels, check_npy_file, check_npz_file, check_values, npy_header
from qpipe.errors import DataError, QpipeError


#: arrays smaller than this are loaded into memory; larger ones are read lazily
LAZY_MIN_BYTES = 64 << 20


class LazyArray:
    """A C-ordered array stored at ``offset`` in a file, read only where it is indexed.

    Indexing rows (an int, a slice, an index array or mask, optionally followed by more
    indices) returns an ordinary ndarray holding just those rows; ``np.asarray`` reads
    everything. Unlike a memory map, rows read once do not stay resident in the process.
    ``astype`` is lazy: the cast is applied to each block as it is read.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: Any, cast: Any = None):
        self.path, self.offset, self.shape = Path(path), int(offset), tuple(int(d) for d in shape)
        self.stored = np.dtype(dtype)
        self.dtype = np.dtype(cast) if cast is not None else self.stored
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.stored.itemsize
        self.check: Any = None  # called with (block, first row) on every block read, before the cast

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray({self.path.name}, shape={self.shape}, dtype={self.dtype})"

    def astype(self, dtype: Any, copy: bool = True) -> "LazyArray":
        if np.dtype(dtype) == self.dtype:
            return self
        cast = LazyArray(self.path, self.offset, self.shape, self.stored, cast=dtype)
        cast.check = self.check
        return cast

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(0, len(self))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        n = len(self)
        if key is Ellipsis:
            key, rest = slice(None), (Ellipsis, *rest)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of bounds for axis 0 with size {n}")
            row = self._read(i, i + 1)[0]
            return row[rest] if rest else row
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            block = self._read(start, stop) if step == 1 else self._gather(np.arange(start, stop, step))
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64)
            idx = np.where(idx < 0, idx + n, idx)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise IndexError(f"index out of bounds for axis 0 with size {n}")
            block = self._gather(idx.reshape(-1)).reshape(idx.shape + self.shape[1:])
            return block[(slice(None),) * idx.ndim + rest] if rest else block
        return block[(slice(None), *rest)] if rest else block

    def _read(self, start: int, stop: int) -> np.ndarray:
        rows = max(0, stop - start)
        out = np.empty((rows, *self.shape[1:]), dtype=self.stored)
        if rows and self._row_bytes:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset + start * self._row_bytes)
                got = fh.readinto(memoryview(out).cast("B"))  # type: ignore[arg-type]  # ndarray is a buffer
            if got != rows * self._row_bytes:
                raise DataError(f"{self.path.name}: the file is truncated (rows {start}-{stop} missing)")
        if self.check is not None:
            self.check(out, start)
        return out.astype(self.dtype, copy=False)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        # read each run of consecutive rows with one read
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run in np.split(np.arange(len(ordered)), breaks):
            if len(run):
                out[order[run]] = self._read(int(ordered[run[0]]), int(ordered[run[-1]]) + 1)
        return out


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

    def class_labels(self, classes: int | None = None) -> np.ndarray | None:
        """Labels as integer class ids (one-hot labels are arg-maxed).

        A DataError names the first label that is not a class id: a fraction, NaN, negative,
        or (given the model's number of outputs ``classes``) out of range or one-hot of
        another width.
        """
        if self.labels is None:
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
            lazy = _lazy_npy(path)
            return {"x": lazy if lazy is not None else np.load(path, allow_pickle=False)}
        check_npz_file(path, what)
        lazy_members = _lazy_npz_members(path)
        with np.load(path, allow_pickle=False) as npz:
            return {key: lazy_members.get(key) if key in lazy_members else npz[key] for key in npz.files}
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"{what}: cannot read {path.name} without unpickling ({exc}); "
                        "save plain numeric arrays with numpy.savez") from None
    except Exception as exc:
        raise DataError(f"{what}: cannot read {path.name}: {exc}") from None


def _lazy_if_large(path: Path, header: Any, offset: int) -> LazyArray | None:
    if header is None:
        return None
    shape, fortran, dtype = header
    if fortran or dtype.hasobject or len(shape) == 0 or dtype.kind not in "biuf":
        return None
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize < LAZY_MIN_BYTES:
        return None
    return LazyArray(path, offset, shape, dtype)


def _lazy_npy(path: Path) -> LazyArray | None:
    """A large C-ordered numeric .npy file as a LazyArray (None: load it normally)."""
    with open(path, "rb") as fh:
        header = npy_header(fh)
        return _lazy_if_large(path, header, fh.tell())


def _lazy_npz_members(path: Path) -> dict[str, LazyArray]:
    """Large uncompressed members of an .npz (``numpy.savez``) as LazyArrays, by key."""
    out: dict[str, LazyArray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as member:
                header = npy_header(member)
                header_len = member.tell()
            raw.seek(info.header_offset)
            local = raw.read(30)
            if local[:4] != b"PK\x03\x04":
                continue
            data_start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                + int.from_bytes(local[28:30], "little")
            lazy = _lazy_if_large(path, header, data_start + header_len)
            if lazy is not None:
                out[info.filename[:-4]] = lazy
    return out


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


def bind_to_model(raw: tuple, model_inputs: list[TensorInfo], what: str, allow_nonfinite: bool = False) -> Dataset:
    """Match loaded arrays to the model's inputs, checking count, names, shapes, dtypes and
    values (NaN/Inf, overflow on the cast to the model's dtype; streamed arrays as they are read)."""
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
    if y is not None:
        y = np.asarray(y)
        if len(y) != count:
            raise DataError(f"{what}: {count} input rows but {len(y)} labels")
        if y.dtype.kind not in "biuf":
            raise DataError(f"{what}: labels have dtype {y.dtype}; expected numbers")
        check_values(y, "the label array", what, allow_nonfinite=allow_nonfinite)
    return Dataset(inputs=out, labels=y)


def _check_shape(arr: np.ndarray, info: TensorInfo, what: str) -> None:
    expected = tuple(info.shape[1:])
    got = tuple(arr.shape[1:])
    fits = len(expected) == len(got) and all(e is None or e == g for e, g in zip(expected, got, strict=False))
    if not fits:
        fmt = lambda s: "(N, " + ", ".join("?" if d is None else str(d) for d in s) + ")"  # noqa: E731
        raise DataError(f"{what}: input '{info.name}' has shape {fmt(got)} but the model expects "
                        f"{fmt(expected)}; reshape the data to fit")
