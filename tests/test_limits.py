"""Bounded work: a variant grid, a zip-bomb .npz, a lying .npy header and a huge pipeline file
are refused before the work they would cause, in seconds and bounded memory; threads and
--jobs are capped at what the machine has."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from qpipe.config import load_config, resolve
from qpipe.data import load_source
from qpipe.errors import ConfigError, DataError
from qpipe.limits import cpu_count
from qpipe.registry import Registry
from qpipe.schema import DataSource

# Runs a command under a 3 GB address-space limit (so today's unbounded code fails fast instead
# of eating the machine) and reports its exit code, stderr, wall time and peak RSS.
MEASURE = textwrap.dedent("""\
    import json, resource, subprocess, sys, time
    def bound():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    start = time.perf_counter()
    proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=bound, timeout=300)
    print(json.dumps({"code": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout,
                      "seconds": time.perf_counter() - start,
                      "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
""")


def measured(*command: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def error_lines(report: dict) -> list[str]:
    return [line for line in report["stderr"].splitlines() if line.startswith("error: ")]


# --------------------------------------------------------------------------- the grid


def grid_bomb(path: Path, values: int = 300) -> Path:
    """Four option lists of ``values`` each: 300**4 = 8.1e9 variants from a few KB of YAML."""
    numbers = list(range(1, values + 1))
    path.write_text(yaml.safe_dump({
        "name": "bomb", "model": {"path": "model.keras"},
        "data": {"evaluation": {"path": "data.npz"}, "training": {"path": "data.npz"}},
        "variants": [{"name": "float32", "quantizer": "tflite.float32"},
                     {"name": "qat", "quantizer": "tfmot.qat",
                      "options": {"epochs": numbers, "batch_size": numbers, "seed": numbers,
                                  "learning_rate": [n / 1000 for n in numbers]}}],
        "tracking": False}, default_flow_style=None, width=1 << 20))
    return path


def test_a_grid_bomb_is_refused_by_validate_in_seconds_and_bounded_memory(tmp_path):
    path = grid_bomb(tmp_path / "pipeline.yaml")
    assert path.stat().st_size < 16_000
    report = measured(sys.executable, "-m", "qpipe.cli", "validate", str(path))
    assert report["code"] == 2, report
    [line] = error_lines(report)
    assert "variants[1].options" in line and "8,100,000,001 variants" in line and "300 x 300 x 300 x 300" in line
    assert "QPIPE_MAX_VARIANTS" in line and "Traceback" not in report["stderr"]
    assert report["seconds"] < 20, report["seconds"]  # the CLI's start-up included; see the next test
    assert report["peak_mb"] < 400, report["peak_mb"]


def test_the_grid_limit_can_be_raised(tmp_path, pm, monkeypatch):
    # (in-process only with a small grid: today's code would materialise a big one here)
    small = grid_bomb(tmp_path / "small.yaml", values=4)  # 256 + the baseline: one over
    with pytest.raises(ConfigError, match="257 variants"):
        resolve(load_config(small), Registry.from_plugins(pm))
    monkeypatch.setenv("QPIPE_MAX_VARIANTS", "300")
    assert len(resolve(load_config(small), Registry.from_plugins(pm)).variants) == 257
    monkeypatch.setenv("QPIPE_MAX_VARIANTS", "lots")
    with pytest.raises(ConfigError, match="QPIPE_MAX_VARIANTS='lots'"):
        resolve(load_config(small), Registry.from_plugins(pm))


# --------------------------------------------------------------------------- data files


def zip_bomb(path: Path, rows: int = 700_000_000) -> Path:
    """An .npz of ~5 MB whose one float64 array decompresses to rows * 8 bytes (5.6 GB): a
    valid zip64 archive (the CRC is right), written without compressing 5.6 GB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (rows,)})
    head, chunk = header.getvalue(), bytes(64 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    # after a full flush the compressor starts afresh, so equal chunks compress to equal bytes
    start = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(rows * 8, len(chunk))
    data = start + block * count + comp.compress(bytes(rest)) + comp.flush()
    crc = zlib.crc32(head)
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(bytes(rest), crc)
    size, name = len(head) + rows * 8, b"x.npy"
    extra = struct.pack("<HHQQ", 1, 16, size, len(data))  # zip64 sizes
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                        len(name), len(extra)) + name + extra
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF,
                          0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0, 0) + name + extra
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)
    return path


LOAD = "import sys; from pathlib import Path; from qpipe.schema import DataSource; " \
       "from qpipe.data import load_source; from qpipe.errors import QpipeError\n" \
       "try:\n    load_source(DataSource(path=sys.argv[1]), Path('.'), 'data.evaluation')\n" \
       "except QpipeError as exc:\n    print(f'error: {exc}', file=sys.stderr); sys.exit(2)\n"


def test_a_zip_bomb_npz_is_refused_in_seconds_and_bounded_memory(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 8_000_000
    report = measured(sys.executable, "-c", LOAD, str(bomb))
    assert report["code"] == 2, report
    [line] = error_lines(report)
    assert "bomb.npz" in line and "array 'x'" in line and "5.2 GiB" in line and "QPIPE_MAX_DATA_BYTES" in line
    assert report["seconds"] < 20 and report["peak_mb"] < 300, report


def test_a_header_claiming_1e9_rows_is_refused(tmp_path):
    x = np.zeros((10, 8), np.float32)
    for compressed in (True, False):
        path = tmp_path / f"liar-{compressed}.npz"
        (np.savez_compressed if compressed else np.savez)(path, x=x)
        _claim_rows(path, 1_000_000_000)
        report = measured(sys.executable, "-c", LOAD, str(path))
        assert report["code"] == 2, report
        [line] = error_lines(report)
        assert path.name in line and "array 'x'" in line and "1000000000" in line, line
        assert report["seconds"] < 20 and report["peak_mb"] < 300, report
    npy = tmp_path / "liar.npy"
    with open(npy, "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 8)})
        fh.write(x.tobytes())
    with pytest.raises(DataError, match=r"liar.npy: array 'x' \(shape \(1000000000, 8\).* holds only 320 bytes"):
        load_source(DataSource(path="liar.npy"), tmp_path, "data.evaluation")


def _claim_rows(path: Path, rows: int) -> None:
    """The .npz at ``path`` rewritten so the header of 'x' claims ``rows`` rows (data unchanged)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x.npy")
        member = zf.read(info)
    stream = io.BytesIO(member)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream) if np.lib.format.read_magic(stream) == (1, 0) \
        else np.lib.format.read_array_header_2_0(stream)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": fortran, "shape": (rows, *shape[1:])})
    forged = header.getvalue() + member[stream.tell():]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=info.compress_type) as zf:
        zf.writestr("x.npy", forged)
    path.write_bytes(out.getvalue())


def test_the_data_limit_has_an_override_and_streamed_files_stay_unlimited(tmp_path, monkeypatch):
    x = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    np.savez_compressed(tmp_path / "small.npz", x=x)
    np.savez(tmp_path / "stored.npz", x=x)
    monkeypatch.setenv("QPIPE_MAX_DATA_BYTES", "8K")
    with pytest.raises(DataError, match=r"small.npz: array 'x' .* is compressed.* 8.0 KiB limit"):
        load_source(DataSource(path="small.npz"), tmp_path, "data.evaluation")
    # uncompressed members are read from the file (streamed when large): the limit is for memory
    assert np.array_equal(load_source(DataSource(path="stored.npz"), tmp_path, "d")[0], x)
    monkeypatch.setenv("QPIPE_MAX_DATA_BYTES", "1M")
    assert np.array_equal(load_source(DataSource(path="small.npz"), tmp_path, "d")[0], x)


def test_a_huge_pipeline_file_is_refused_before_parsing(tmp_path, monkeypatch):
    text = "name: big\ndescription: '" + "x" * 1_200_000 + "\n"  # also malformed: the quote never closes
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"pipeline.yaml: the file is 1.1 MiB; .* limited to 1.0 MiB .*QPIPE_MAX_YAML"):
        load_config(path)
    monkeypatch.setenv("QPIPE_MAX_YAML_BYTES", "2M")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(path)


# --------------------------------------------------------------------------- threads and jobs


def test_threads_are_capped_at_the_cpu_count_with_a_warning(tmp_path, pm, capsys):
    cpus = cpu_count()
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "threads", "model": {"path": "m.keras"}, "data": {"evaluation": {"path": "d.npz"}},
        "backends": {"litert": {"threads": 4096}},
        "variants": [{"name": "float32", "quantizer": "tflite.float32"}],
        "evaluators": [{"name": "latency", "options": {"threads": 5000}}], "tracking": False}))
    resolved = resolve(load_config(path), Registry.from_plugins(pm))
    assert resolved.variants[0].backend.component.options.threads == cpus
    assert resolved.evaluators[0].component.options.threads == cpus
    err = capsys.readouterr().err
    assert f"backend litert: 4096 threads on a machine with {cpus} CPUs; using {cpus}" in err
    assert "evaluator latency: 5000 threads" in err


def test_jobs_are_capped_at_the_variants_and_cpus(project, pm):
    from qpipe.executors import RunSetup
    from qpipe.schedule import make_executor

    path = project.write_pipeline([{"name": "dynamic", "quantizer": "tflite.dynamic"}])
    resolved = resolve(load_config(path), Registry.from_plugins(pm))
    warnings: list[str] = []
    setup = RunSetup(pm, resolved, None, {"jobs": 5, "no_tracking": True}, project.root / "out",  # type: ignore[arg-type]
                     None, warnings.append)  # type: ignore[arg-type]
    executor = make_executor(setup)
    try:
        assert executor.jobs == min(2, cpu_count())
        assert warnings == [f"--jobs/executor.jobs 5 is more than the "
                                   f"{'2 variants' if cpu_count() >= 2 else '1 CPUs'}; "
                                   f"running {executor.jobs} at once"]
    finally:
        executor.close(cancel=True)
