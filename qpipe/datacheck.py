"""Checks on data files and values, so bad data is an error instead of a wrong number.

Before reading: every array's ``.npy`` header (shape, dtype) in an ``.npz``/``.npy`` file is
checked against the bytes the file really holds, and arrays that must be decompressed into
memory against ``QPIPE_MAX_DATA_BYTES`` (a zip bomb or a header claiming 1e9 rows is refused
before anything is allocated). After reading: NaN/Inf and values that overflow the model's
dtype are errors naming the array and the first bad index (warnings with
``data.allow_nonfinite: true``). Streamed arrays are checked block by block as they are read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from qpipe.errors import DataError
from qpipe.limits import human_bytes, limit, warn_once

#: elements checked at once
CHECK_BLOCK = 1 << 22

OVERRIDE = "raise QPIPE_MAX_DATA_BYTES for data you trust, or save it uncompressed with numpy.savez " \
           "(streamed a batch at a time)"


def npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) from an open .npy stream, or None for an unknown version."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    return None


def declared_bytes(header: tuple) -> int:
    shape, _, dtype = header
    return int(np.prod(shape, dtype=object)) * dtype.itemsize  # object: no int64 overflow


def _describe(key: str, header: tuple) -> str:
    shape, _, dtype = header
    return f"array '{key}' (shape {tuple(shape)}, {dtype}, {human_bytes(declared_bytes(header))})"


def check_npy_file(path: Path, what: str) -> None:
    """Refuse a .npy file whose header claims more data than the file holds."""
    with open(path, "rb") as fh:
        header = _read_header(fh, path, "x", what)
        held = path.stat().st_size - fh.tell()
    if header is not None and not header[2].hasobject and declared_bytes(header) > held:
        raise DataError(f"{what}: {path.name}: {_describe('x', header)} but the file holds only "
                        f"{human_bytes(held)}: the header is wrong or the file is truncated")


def check_npz_file(path: Path, what: str) -> None:
    """Refuse an .npz whose arrays claim more than their members hold, or that would
    decompress into more memory than ``QPIPE_MAX_DATA_BYTES``; reads only the headers."""
    budget, total = limit("QPIPE_MAX_DATA_BYTES"), 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            with zf.open(info) as member:
                header = _read_header(member, path, key, what)
                header_len = member.tell()
            if header is None or header[2].hasobject:  # refused later: never unpickled
                continue
            need = declared_bytes(header)
            if need > info.file_size - header_len:
                raise DataError(f"{what}: {path.name}: {_describe(key, header)} but its member holds only "
                                f"{human_bytes(max(0, info.file_size - header_len))}: the header is wrong "
                                "or the file is truncated")
            if info.compress_type != zipfile.ZIP_STORED:
                total += need
                if total > budget:
                    before = " (with the compressed arrays before it)" if total > need else ""
                    raise DataError(f"{what}: {path.name}: {_describe(key, header)} is compressed, so it would "
                                    f"be decompressed into memory{before}: more than the {human_bytes(budget)} "
                                    f"limit; {OVERRIDE}")


def _read_header(fh: Any, path: Path, key: str, what: str) -> tuple | None:
    try:
        return npy_header(fh)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: {path.name}: cannot read the header of array '{key}': {exc}") from None


# --------------------------------------------------------------------------- values


def check_values(values: np.ndarray, name: str, what: str, target: Any = None, *, start: int = 0,
                 allow_nonfinite: bool = False) -> None:
    """Refuse NaN/Inf in ``values``, values that overflow when cast to ``target``, and values with a
    fraction for an integer ``target`` (the cast would truncate them silently).

    ``start`` is the row of ``values[0]`` in the whole array (for blocks of a streamed
    array), so the index named is the array's own. Large arrays are checked in blocks, so the
    temporary masks stay small.
    """
    rows = max(1, CHECK_BLOCK // max(1, values[:1].size))
    if values.ndim and len(values) > rows:
        for first in range(0, len(values), rows):
            check_values(values[first:first + rows], name, what, target, start=start + first,
                         allow_nonfinite=allow_nonfinite)
        return
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        index = _first(~np.isfinite(values), start)
        message = f"{what}: {name} has {values[index_in(index, start)]} at index {index}"
        if not allow_nonfinite:
            raise DataError(f"{message}; remove or replace non-finite values, or set "
                            "data.allow_nonfinite: true to evaluate them anyway")
        warn_once(f"{message} (allowed by data.allow_nonfinite)")
    try:
        target = np.dtype(target) if target is not None else values.dtype
    except TypeError:  # a dtype numpy does not know: the backend checks it
        return
    info = _limits_of(target)
    if info is None or values.size == 0 or np.can_cast(values.dtype, target, casting="safe"):
        return
    with np.errstate(invalid="ignore"):
        bad = (values > info.max) | (values < info.min)
        if values.dtype.kind == "f":
            bad &= np.isfinite(values)  # NaN/Inf were reported (or allowed) above
    if bad.any():
        index = _first(bad, start)
        raise DataError(f"{what}: {name} has {values[index_in(index, start)]} at index {index}, outside the "
                        f"range of the model's {target} ({info.min:g} to {info.max:g}); rescale the data")
    if target.kind in "iu" and values.dtype.kind == "f":  # ids given as floats: only whole numbers cast
        fraction = values != np.rint(values)
        if fraction.any():
            index = _first(fraction, start)
            raise DataError(f"{what}: {name} has {values[index_in(index, start)]} at index {index}, not a whole "
                            f"number, but the model's input is {target} (ids, such as token ids); give "
                            "integer data")


def _limits_of(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.finfo(dtype)
    if dtype.kind in "iu":
        return np.iinfo(dtype)
    return None


def _first(mask: np.ndarray, start: int) -> tuple[int, ...] | int:
    flat = int(np.argmax(mask.reshape(-1)))
    where = np.unravel_index(flat, mask.shape)
    index: tuple[int, ...] = (int(where[0]) + start, *(int(i) for i in where[1:]))
    return index[0] if len(index) == 1 else index


def index_in(index: tuple[int, ...] | int, start: int) -> tuple[int, ...]:
    """A whole-array index -> the index into a block that begins at row ``start``."""
    parts = index if isinstance(index, tuple) else (index,)
    return (parts[0] - start, *parts[1:])


class BlockCheck:
    """Checks each block of a streamed array as it is read (picklable, for worker processes)."""

    def __init__(self, name: str, what: str, target: Any, allow_nonfinite: bool):
        self.name, self.what, self.target, self.allow_nonfinite = name, what, target, allow_nonfinite

    def __call__(self, block: np.ndarray, start: int) -> None:
        check_values(block, self.name, self.what, self.target, start=start, allow_nonfinite=self.allow_nonfinite)


# --------------------------------------------------------------------------- class labels


def check_class_labels(labels: np.ndarray, classes: int | None, what: str = "labels") -> np.ndarray:
    """Class ids (int64) from ``labels`` (ids or one-hot rows); refuse what is not one.

    ``classes`` is the model's number of outputs (1: a binary classifier with one sigmoid
    unit, so ids 0 and 1); None skips the range and width checks.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        if classes is not None and classes > 1 and labels.shape[1] != classes:
            raise DataError(f"{what} are one-hot rows of width {labels.shape[1]}, but the model has "
                            f"{classes} outputs; the labels do not belong to this model")
        labels = labels.argmax(axis=1)
    flat = labels.reshape(len(labels))
    if flat.dtype.kind not in "biuf":
        raise DataError(f"{what} have dtype {flat.dtype}; classification needs integer class ids")
    if flat.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(flat) | (flat != np.round(flat))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{what} have {flat[i]} at index {i}, not a class id; classification needs "
                            "whole-number labels (for regression targets use the regression evaluator)")
    top = None if classes is None else max(classes, 2)
    bad = (flat < 0) if top is None else ((flat < 0) | (flat >= top))
    if bad.any():
        i = int(np.argmax(bad))
        if top is None:
            raise DataError(f"{what} have {flat[i]:g} at index {i}, a negative class id; fix the labels")
        outputs = f"{classes} outputs" if (classes or 0) > 1 else "1 output (a binary classifier: classes 0 and 1)"
        raise DataError(f"{what} have {flat[i]:g} at index {i}, outside [0, {top}) for a model with {outputs}; "
                        "fix the labels, or for regression targets use the regression evaluator, not accuracy")
    return flat.astype(np.int64)
