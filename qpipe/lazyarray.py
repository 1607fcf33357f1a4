"""Large arrays read from their file a batch at a time instead of loaded.

An array stored uncompressed (a ``.npy`` file, a ``numpy.savez`` member) and larger than
``LAZY_MIN_BYTES`` becomes a ``LazyArray``: rows are read where it is indexed, so a dataset
of any size evaluates in the memory of one batch. Only the ``.npy`` header is parsed; nothing
is unpickled.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from qpipe.datacheck import npy_header
from qpipe.errors import DataError


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


def _lazy_if_large(path: Path, header: Any, offset: int) -> LazyArray | None:
    if header is None:
        return None
    shape, fortran, dtype = header
    if fortran or dtype.hasobject or len(shape) == 0 or dtype.kind not in "biuf":
        return None
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize < LAZY_MIN_BYTES:
        return None
    return LazyArray(path, offset, shape, dtype)


def lazy_npy(path: Path) -> LazyArray | None:
    """A large C-ordered numeric .npy file as a LazyArray (None: load it normally)."""
    with open(path, "rb") as fh:
        header = npy_header(fh)
        return _lazy_if_large(path, header, fh.tell())


def lazy_npz_members(path: Path) -> dict[str, LazyArray]:
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
