"""qpipe's performance benchmark: every number is a ratio measured in one run on one machine.

    .venv/bin/python benchmarks/bench.py            # everything, about 8-10 minutes on 2 cores
    .venv/bin/python benchmarks/bench.py --quick    # skips the MobileNetV2 pipelines and the 1 GB file

Sections (each contender runs as its own process; peak memory is the summed RSS of its
process tree, sampled every 50 ms):
  startup     qpipe --help and qpipe validate (wall time)
  root        the root pipeline.yaml (digits; its five post-training variants) vs benchmarks/handwritten.py
              doing the same conversions and evaluations; then an unchanged re-run (the cache)
  tracking    the whole root pipeline re-run with everything cached, tracked into an existing sqlite
              store vs untracked, three pairs taking turns (benchmarks/tracking.py)
  mobilenet   MobileNetV2 (alpha 0.35, 32x32, weights=None), five post-training variants
              (float32, dynamic, float16, int8 per-channel, int8 per-tensor): qpipe with the
              converter per variant (before convert-once), qpipe with engine ai-edge-quantizer
              (after: one conversion, the variants quantized with ai-edge-quantizer), the same
              with --jobs 2, the hand-written script (tf.saved_model.save, as documented), and
              the hand-written script exporting with Model.export as qpipe does
  throughput  LiteRT evaluation: qpipe's backend vs a hand-written batched loop vs a per-sample loop,
              float32 and int8, on the digits model and on MobileNetV2, taking turns for nine
              rounds (median of each round's ratios); and int8 vs float32 latency
  stream      a ~1 GB uncompressed .npz evaluated by qpipe: peak memory vs a 16 MB one
Results go to benchmarks/results.md (and are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
QPIPE = [PY, "-m", "qpipe.cli"]
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- measuring


def _tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
        stack += children.get(p, [])
    return total


def measure(cmd: list[str], cwd: Path = ROOT, env: dict | None = None, ok: tuple = (0,)) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak MiB of its process tree). Fails loudly."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - started
    sampler.join()
    if proc.returncode not in ok:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{output[-3000:]}")
    return seconds, peak[0] / 2**20


def best_of(n: int, cmd: list[str]) -> float:
    return min(measure(cmd)[0] for _ in range(n))


# --------------------------------------------------------------------------- helpers run in subprocesses


def make_mobilenet(folder: Path) -> None:
    """MobileNetV2 (alpha 0.35, 32x32x3, 10 classes, random weights) and its data."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    model.save(folder / "mobilenet.keras")
    rng = np.random.default_rng(0)
    np.savez(folder / "mobilenet.npz", x_eval=rng.random((500, 32, 32, 3), dtype=np.float32),
             y_eval=rng.integers(0, 10, 500), x_cal=rng.random((500, 32, 32, 3), dtype=np.float32),
             y_cal=rng.integers(0, 10, 500))


def write_stored_npz(path: Path, rows: int, shape: tuple[int, ...], classes: int = 10) -> None:
    """An uncompressed .npz (x float32, y int64) written 2048 rows at a time (bounded memory)."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, full, dtype in (("x", (rows, *shape), np.float32), ("y", (rows,), np.int64)):
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                              "fortran_order": False, "shape": full})
                for start in range(0, rows, 2048):
                    n = min(2048, rows - start)
                    block = (rng.random((n, *shape), dtype=np.float32) if key == "x"
                             else rng.integers(0, classes, n).astype(np.int64))
                    member.write(block.tobytes())


def throughput(out: str, *models: str) -> None:
    """Samples/s of qpipe's LiteRT backend vs a hand-written batched loop vs a per-sample loop.

    ``models`` are LABEL=PATH pairs. This machine's speed drifts within seconds, so the
    contenders take turns (the order alternating) for nine rounds, each round's ratios are
    taken between neighbours, and the medians are reported.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from handwritten import Model

    results = {label: _throughput_of(path, Model) for label, path in (m.split("=", 1) for m in models)}
    Path(out).write_text(json.dumps(results))


def _throughput_of(path: str, Model: type) -> dict[str, float]:
    """Median samples/s and paired ratios of the three contenders on one .tflite."""
    from qpipe.components import Artifact
    from qpipe.data import Dataset
    from qpipe_litert import LiteRTBackend, LiteRTOptions

    runner = LiteRTBackend(LiteRTOptions(threads=2, batch_size=256)).load(Artifact(Path(path)))
    shape = tuple(next(iter(runner.inputs.values()))["shape"][1:])
    x = np.random.default_rng(1).random((4096, *shape), dtype=np.float32)
    data = Dataset(inputs={"input": x})
    hand, single = Model(path, 2), Model(path, 2)
    contenders = {
        "qpipe": lambda: len(x) / _timed(lambda: runner.predict(data, 256)),
        "batched": lambda: len(x) / _timed(lambda: [hand(x[i:i + 256]) for i in range(0, len(x), 256)]),
        "per_sample": lambda: 1024 / _timed(lambda: [single(x[i:i + 1]) for i in range(1024)]),
    }
    for measure_once in contenders.values():  # warm-up
        measure_once()
    rounds = []
    for r in range(9):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        rounds.append({name: contenders[name]() for name in order})

    def median(values: list[float]) -> float:
        return float(np.median(values))

    return {**{name: median([r[name] for r in rounds]) for name in contenders},
            "qpipe/batched": median([r["qpipe"] / r["batched"] for r in rounds]),
            "qpipe/per_sample": median([r["qpipe"] / r["per_sample"] for r in rounds]),
            "batched/per_sample": median([r["batched"] / r["per_sample"] for r in rounds])}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- sections


def pipeline_yaml(path: Path, model: str, data: str, variants: list[str], evaluators: list, extra: str = "",
                  engine: str | None = None) -> Path:
    lines = [f"name: {path.stem}", f"model: {{path: {model}}}", "data:",
             f"  evaluation: {{path: {data}, inputs: x_eval, labels: y_eval}}"]
    if any(v in ("int8", "int8pt", "int16x8") for v in variants):
        lines.append(f"  calibration: {{path: {data}, inputs: x_cal, labels: y_cal}}")
    lines += ["calibrator: {name: sample, options: {count: 100, method: random, seed: 0}}",
              "backends: {litert: {threads: 2, batch_size: 256}}", "variants:"]
    with_engine = f", engine: {engine}" if engine else ""
    kinds = {"int8": ("int8", f"{{io: int8, per_channel: true{with_engine}}}"),
             "int8pt": ("int8", f"{{io: int8, per_channel: false{with_engine}}}")}
    if engine:
        kinds.update({k: (k, f"{{engine: {engine}}}") for k in ("dynamic", "float16")})
    for v in variants:
        quantizer, options = kinds.get(v, (v, None))
        opt = f", options: {options}" if options else ""
        lines.append(f"  - {{name: {v}, quantizer: tflite.{quantizer}{opt}}}")
    lines.append("evaluators: " + json.dumps(evaluators))
    lines.append("tracking: false")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the MobileNetV2 pipelines and the 1 GB file")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []  # (measure, value, target)
    notes: list[str] = []
    load_before = os.getloadavg()
    t_all = time.perf_counter()

    def row(what: str, value: str, target: str = "") -> None:
        rows.append((what, value, target))
        print(f"{what:<62} {value:>14}  {target}", flush=True)

    # ---- startup
    row("qpipe --help (s, best of 3)", f"{best_of(3, [*QPIPE, '--help']):.2f}", "< 1 s")
    row("qpipe validate pipeline.yaml (s, best of 3)",
        f"{best_of(3, [*QPIPE, 'validate', str(ROOT / 'pipeline.yaml')]):.2f}", "< 1 s")

    # ---- root pipeline vs hand-written, then the cache
    cache = work / "cache"
    env = {"QPIPE_CACHE_DIR": str(cache)}
    # the five post-training variants the hand-written script does too (pipeline.yaml may hold more)
    only = [a for v in ("dynamic", "float16", "int8", "int16x8") for a in ("--only", v)]
    q_s, q_mb = measure([*QPIPE, "run", "pipeline.yaml", *only, "--no-tracking", "-o", str(work / "root-1")], env=env)
    h_s, h_mb = measure([PY, "benchmarks/handwritten.py", "examples/digits/model.keras", "examples/digits/data.npz",
                         "x_test", "y_test", "x_train", str(work / "root-hand"), "--calibration", "200"])
    r_s, _ = measure([*QPIPE, "run", "pipeline.yaml", *only, "--no-tracking", "-o", str(work / "root-2")], env=env)
    row("root pipeline: qpipe wall / hand-written wall", f"{q_s / h_s:.2f}x ({q_s:.1f}/{h_s:.1f} s)", "<= 1.15x")
    row("root pipeline: qpipe peak RSS / hand-written", f"{q_mb / h_mb:.2f}x ({q_mb:.0f}/{h_mb:.0f} MiB)")
    row("root pipeline: unchanged re-run / first run (cache)", f"{r_s / q_s:.2f}x ({r_s:.1f}/{q_s:.1f} s)",
        "<= 0.25x")
    hits = json.loads((work / "root-2" / "results.json").read_text())["extra"]["cache"]
    notes.append(f"re-run cache: {hits['hits']} hits, {hits['misses']} misses")

    # ---- MLflow tracking on the cached default pipeline (all its variants), paired (tracking.py)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tracking import TARGET_SECONDS, measure as measure_tracking

    tracked = measure_tracking(ROOT / "pipeline.yaml", work / "tracking", 3, env)
    row("tracking: cached re-run, tracked - untracked (s, median of 3 pairs)",
        f"{tracked['added_s']:.2f} ({tracked['tracked_s']:.1f}/{tracked['untracked_s']:.1f} s)",
        f"<= {TARGET_SECONDS:.0f} s")
    row("tracking: cached re-run, tracked / untracked", f"{tracked['ratio']:.2f}x")

    if not args.quick:
        # ---- MobileNetV2, five post-training variants
        subprocess.run([PY, __file__, "_make_mobilenet", str(work)], check=True, cwd=ROOT)
        # int16x8 does not load in LiteRT for this untrained network (DEPTHWISE_CONV_2D quantization
        # overflow), so the fifth variant is int8 with per-tensor weight scales
        variants = ["float32", "dynamic", "float16", "int8", "int8pt"]
        evals = ["accuracy", "fidelity", "size", {"name": "latency", "options": {"runs": 20, "warmup": 3}}]
        runs = {}
        # after: one conversion, the variants quantized by ai-edge-quantizer (engine auto measures
        # both engines for int8, so it is asked for by name: docs/engines.md)
        for label, engine, extra_args in (("before", "converter", []), ("after", "ai-edge-quantizer", []),
                                          ("aeq-jobs2", "ai-edge-quantizer", ["--jobs", "2"])):
            pipe = pipeline_yaml(work / f"mobilenet-{label}.yaml", "mobilenet.keras", "mobilenet.npz", variants,
                                 evals, engine=engine)
            runs[label] = measure([*QPIPE, "run", str(pipe), "--no-cache", *extra_args, "-o", str(work / f"mn-{label}")],
                                  ok=(0, 1))
            failed = [v["name"] for v in json.loads((work / f"mn-{label}" / "results.json").read_text())["variants"]
                      if v["status"] != "ok"]
            if failed:
                notes.append(f"MobileNetV2 {label}: failed variants {failed}")
        mh_s, mh_mb = measure([PY, "benchmarks/handwritten.py", str(work / "mobilenet.keras"),
                               str(work / "mobilenet.npz"), "x_eval", "y_eval", "x_cal", str(work / "mn-hand"),
                               "--calibration", "100", "--runs", "20", "--warmup", "3",
                               "--variants", ",".join(variants)])
        mx_s, _ = measure([PY, "benchmarks/handwritten.py", str(work / "mobilenet.keras"),
                           str(work / "mobilenet.npz"), "x_eval", "y_eval", "x_cal", str(work / "mn-hand-export"),
                           "--calibration", "100", "--runs", "20", "--warmup", "3",
                           "--variants", ",".join(variants), "--export"])
        (b_s, b_mb), (a_s, a_mb), (j_s, j_mb) = runs["before"], runs["after"], runs["aeq-jobs2"]
        row("MobileNetV2 x5, converter per variant (before convert-once) / hand-written",
            f"{b_s / mh_s:.2f}x ({b_s:.0f}/{mh_s:.0f} s)")
        row("MobileNetV2 x5, convert once, engine ai-edge-quantizer (after) / hand-written",
            f"{a_s / mh_s:.2f}x ({a_s:.0f}/{mh_s:.0f} s)", "<= 0.5x")
        row("MobileNetV2 x5, engine ai-edge-quantizer, --jobs 2 / hand-written", f"{j_s / mh_s:.2f}x ({j_s:.0f}/{mh_s:.0f} s)")
        row("MobileNetV2 x5, after / hand-written exporting with Model.export as qpipe does",
            f"{a_s / mx_s:.2f}x ({a_s:.0f}/{mx_s:.0f} s)")
        row("MobileNetV2 x5: peak RSS before / after / --jobs 2 / hand (MiB)",
            f"{b_mb:.0f}/{a_mb:.0f}/{j_mb:.0f}/{mh_mb:.0f}")
        engines = {v["name"]: v["metadata"].get("engine") for v in
                   json.loads((work / "mn-after" / "results.json").read_text())["variants"]}
        notes.append(f"MobileNetV2 'after' engines: {engines}")
        mn = {v["name"]: v for v in json.loads((work / "mn-before" / "results.json").read_text())["variants"]}
        converts = [mn[v]["metadata"].get("convert_seconds") for v in variants if v in mn]
        notes.append("MobileNetV2 convert seconds per variant (before): "
                     + ", ".join(f"{v} {c}" for v, c in zip(variants, converts, strict=False)))
        f32, i8 = mn["float32"]["metrics"], mn["int8"]["metrics"]
        row("int8 / float32 latency p50, batch 1 (MobileNetV2)",
            f"{i8['latency_ms_p50'] / f32['latency_ms_p50']:.2f}x "
            f"({i8['latency_ms_p50']:.2f}/{f32['latency_ms_p50']:.2f} ms)")

        # ---- evaluation throughput: the digits model (root run) and MobileNetV2
        out = work / "throughput.json"
        subprocess.run([PY, __file__, "_throughput", str(out),
                        *(f"digits {k}={work / 'root-1' / f'{k}.tflite'}" for k in ("float32", "int8")),
                        *(f"MobileNetV2 {k}={work / 'mn-before' / f'{k}.tflite'}" for k in ("float32", "int8"))],
                       check=True, cwd=ROOT)
        tp = json.loads(out.read_text())
        for label, t in tp.items():
            row(f"evaluation throughput {label}: qpipe / hand batched loop",
                f"{t['qpipe/batched']:.2f}x ({t['qpipe']:.0f}/{t['batched']:.0f}/s)", ">= 0.9x")
            row(f"evaluation throughput {label}: qpipe / per-sample loop",
                f"{t['qpipe/per_sample']:.1f}x ({t['per_sample']:.0f}/s; hand batched "
                f"{t['batched/per_sample']:.1f}x)", ">= 5x")
        row("int8 / float32 batched throughput (qpipe, MobileNetV2)",
            f"{tp['MobileNetV2 int8']['qpipe'] / tp['MobileNetV2 float32']['qpipe']:.2f}x")

        # ---- a 1 GB file in bounded memory
        big_rows = (1 << 30) // (32 * 32 * 3 * 4)
        write_stored_npz(work / "big.npz", big_rows, (32, 32, 3))
        write_stored_npz(work / "small.npz", (16 << 20) // (32 * 32 * 3 * 4), (32, 32, 3))
        size_mb = (work / "big.npz").stat().st_size / 2**20
        results = {}
        for name in ("small", "big"):
            pipe = work / f"stream-{name}.yaml"
            pipe.write_text(f"name: stream\nmodel: {{path: mobilenet.keras}}\ndata:\n  evaluation: "
                            f"{{path: {name}.npz, inputs: x, labels: y}}\nvariants:\n  - {{name: float32, "
                            f"quantizer: tflite.float32}}\nevaluators: [accuracy, size]\nbackends: {{litert: "
                            f"{{threads: 2, batch_size: 256}}}}\ntracking: false\n")
            results[name] = measure([*QPIPE, "run", str(pipe), "--no-cache", "-o", str(work / f"stream-{name}")])
        (_, s_mb), (b_s, b_mb) = results["small"], results["big"]
        row(f"{size_mb:.0f} MiB .npz evaluated: peak RSS (MiB) vs the 16 MiB file", f"{b_mb:.0f} vs {s_mb:.0f}",
            "bounded")
        row(f"{size_mb:.0f} MiB .npz: samples/s through the whole run", f"{big_rows / b_s:.0f}")

    total = time.perf_counter() - t_all
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{os.sysconf('SC_PHYS_PAGES') * PAGE / 2**30:.0f} GiB, Python {platform.python_version()}, "
               f"load average before {load_before[0]:.2f}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    lines = ["# qpipe benchmark results", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu} ({machine}); "
             f"the benchmark took {total / 60:.1f} min{' (--quick)' if args.quick else ''}.", "",
             "| measure | value | target |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", *[f"- {n}" for n in notes], ""]
    args.out.write_text("\n".join(lines))
    print(f"\nwritten to {args.out} ({total / 60:.1f} min)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_make_mobilenet":
        make_mobilenet(Path(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_throughput":
        throughput(*sys.argv[2:])
    else:
        main()
