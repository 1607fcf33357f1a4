"""Bounded-memory data: large uncompressed .npz members and .npy files are read a batch at a
time (LazyArray), behave like arrays for every stage, and keep peak memory near one batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import qpipe.lazyarray
from qpipe.components import TensorInfo
from qpipe.config import load_config, resolve
from qpipe.data import bind_to_model, load_source
from qpipe.inputs import load_inputs
from qpipe.lazyarray import LazyArray
from qpipe.registry import Registry
from qpipe.schema import DataSource
from qpipe.testing import plugin_manager, run_pipeline_file


def write_stored_npz(path: Path, chunks: dict[str, tuple[tuple[int, ...], str, object]]) -> None:
    """An uncompressed .npz written chunk by chunk: {key: (shape, dtype, rows(start, stop) -> array)}."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (shape, dtype, rows) in chunks.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                              "fortran_order": False, "shape": shape})
                for start in range(0, shape[0], 4096):
                    member.write(np.ascontiguousarray(rows(start, min(start + 4096, shape[0]))).tobytes())


@pytest.fixture
def lazy_everything(monkeypatch):
    monkeypatch.setattr(qpipe.lazyarray, "LAZY_MIN_BYTES", 0)


def test_lazy_array_indexes_like_an_ndarray(tmp_path, lazy_everything):
    rng = np.random.default_rng(0)
    x = rng.random((50, 3, 2)).astype(np.float32)
    u = rng.integers(0, 255, (50, 4)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, u=u)
    source = DataSource(path="d.npz", inputs="x", labels=None)
    lazy, _ = load_source(source, tmp_path, "data.evaluation")
    assert isinstance(lazy, LazyArray) and lazy.shape == x.shape and len(lazy) == 50
    for key in (7, -1, slice(3, 17), slice(None, None, 4), slice(40, 100), [5, 1, 1, 49, 20], np.array([[1, 2], [3, 4]]),
                x[:, 0, 0] > 0.5, (slice(2, 9), 1), (4, slice(1, None)), (Ellipsis, 0), ([3, 9], 2, 1)):
        got = lazy[key]
        assert isinstance(got, np.ndarray) and np.array_equal(got, x[key]), key
    assert np.array_equal(np.asarray(lazy), x) and np.array_equal(list(lazy)[3], x[3])
    with pytest.raises(IndexError):
        lazy[50]
    # a cast is applied per block, lazily
    as_float = load_source(DataSource(path="d.npz", inputs="u"), tmp_path, "e")[0].astype(np.float32)
    assert isinstance(as_float, LazyArray) and as_float.dtype == np.float32
    assert np.array_equal(as_float[10:20], u[10:20].astype(np.float32)) and as_float[10:20].dtype == np.float32


def test_what_is_read_lazily_and_what_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(qpipe.lazyarray, "LAZY_MIN_BYTES", 1000)
    big = np.arange(2000, dtype=np.float32).reshape(500, 4)
    small = np.arange(500, dtype=np.int64) % 3
    np.savez(tmp_path / "stored.npz", x=big, y=small[:100])
    np.savez_compressed(tmp_path / "packed.npz", x=big, y=small)
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "images.npy", big)
    np.save(tmp_path / "folder" / "labels.npy", small)
    np.save(tmp_path / "one.npy", big)

    def load(path, **kw):
        return load_source(DataSource(path=path, **kw), tmp_path, "data.evaluation")

    x, y = load("stored.npz")
    assert isinstance(x, LazyArray) and isinstance(y, np.ndarray)  # 400 bytes of labels: loaded
    x, y = load("packed.npz")
    assert isinstance(x, np.ndarray)  # compressed members cannot be read in place
    x, y = load("folder", inputs="images", labels="labels")
    assert isinstance(x, LazyArray) and np.array_equal(x[:], big) and np.array_equal(y, small)
    x, y = load("one.npy")
    assert isinstance(x, LazyArray) and y is None
    dataset = bind_to_model((x, small), [TensorInfo("in", (None, 4), "float32")], "data.evaluation")
    assert isinstance(dataset.inputs["in"], LazyArray)
    assert np.array_equal(np.concatenate([b["in"] for b in dataset.batches(64)]), big)
    assert np.array_equal(dataset.take([3, 1]).inputs["in"], big[[3, 1]])
    (tmp_path / "notes.txt").write_text("not arrays")
    with pytest.raises(qpipe.DataError, match="expected an .npz"):
        load("notes.txt")


def test_a_pipeline_on_lazy_data_gives_the_same_results(project, lazy_everything, monkeypatch):
    variants = [{"name": "int8", "quantizer": "tflite.int8"}]
    pipeline = project.write_pipeline(variants)
    pm = plugin_manager()
    inputs = load_inputs(pm, resolve(load_config(pipeline), Registry.from_plugins(pm)))
    assert isinstance(inputs.evaluation.single_input(), LazyArray)
    assert isinstance(inputs.calibration.single_input(), LazyArray)
    settings = {"no_tracking": True, "no_cache": True}
    lazy = run_pipeline_file(pipeline, pm, output=project.root / "lazy", settings=settings)
    monkeypatch.setattr(qpipe.lazyarray, "LAZY_MIN_BYTES", 1 << 40)
    eager = run_pipeline_file(pipeline, output=project.root / "eager", settings=settings)
    for name in ("float32", "int8"):
        assert lazy.variant(name).status == "ok", lazy.variant(name).error
        for metric in ("accuracy", "size_bytes", "top1_agreement", "max_abs_error"):
            assert lazy.variant(name).metrics.get(metric) == eager.variant(name).metrics.get(metric), (name, metric)


def test_batches_stream_a_large_file_in_bounded_memory(tmp_path):
    rows, shape = 65536, (32, 32, 1)  # 256 MiB of float32
    write_stored_npz(tmp_path / "big.npz", {
        "x": ((rows, *shape), "float32", lambda a, b: np.full((b - a, *shape), a % 7, np.float32)),
        "y": ((rows,), "int64", lambda a, b: np.arange(a, b) % 10)})
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from qpipe.components import TensorInfo
        from qpipe.schema import DataSource
        from qpipe.data import bind_to_model, load_source

        def peak():
            return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) // 1024
        before = peak()
        raw = load_source(DataSource(path="big.npz", inputs="x", labels="y"), Path({str(tmp_path)!r}), "data")
        data = bind_to_model(raw, [TensorInfo("image", (None, 32, 32, 1), "float32")], "data")
        total = sum(float(batch["image"][:, 0, 0, 0].sum()) for batch in data.batches(512))
        print(before, peak(), total, len(data))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before, after, total, count = proc.stdout.split()
    assert int(count) == rows and float(total) == sum((a % 7) * min(4096, rows - a) for a in range(0, rows, 4096))
    assert int(after) - int(before) < 48, (before, after)  # MiB: a batch or two, not the 256 MiB file


def test_match_inputs_pairs_one_with_one_else_by_name():
    from qpipe import DataError, match_inputs

    assert match_inputs(["serving_default_img:0"], ["img"], "the .tflite") == {"serving_default_img:0": "img"}
    assert match_inputs(["a", "b"], ["b", "a", "extra"], "the .tflite") == {"a": "a", "b": "b"}
    with pytest.raises(DataError, match=r"the \.onnx expects inputs \['a', 'b'\]; .*missing \['b'\]"):
        match_inputs(["a", "b"], ["a", "c"], "the .onnx")
