"""What the converter's child process costs: the default pipeline converted in a child process
(qpipe's default, so a converter segfault fails one variant) vs in qpipe's own process
(``QPIPE_CONVERT_IN_PROCESS=1``), paired.

    .venv/bin/python benchmarks/convertproc.py               # 3 pairs, the root pipeline.yaml
    .venv/bin/python benchmarks/convertproc.py --rounds 5 --work /tmp/cp

Each round runs ``qpipe run pipeline.yaml --no-cache --no-tracking`` (its post-training
variants: float32, dynamic, float16, int8, int16x8, int4) both ways, taking turns (the order
alternates), each a fresh process into a new output folder. Prints the median wall times and
the median of the pairs' ratios (target: at most 1.10x); on a busy machine only the ratio means
something.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["float32", "dynamic", "float16", "int8", "int16x8", "int4"]
TARGET_RATIO = 1.10


def timed(out: Path, in_process: bool) -> float:
    env = dict(os.environ)
    env.pop("QPIPE_CONVERT_IN_PROCESS", None)
    if in_process:
        env["QPIPE_CONVERT_IN_PROCESS"] = "1"
    args = [sys.executable, "-m", "qpipe", "run", str(ROOT / "pipeline.yaml"), "--no-cache", "--no-tracking",
            "-o", str(out), *[a for v in VARIANTS for a in ("--only", v)]]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):  # 3: the gate failed, still a full run
        raise SystemExit(f"qpipe run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="scratch folder (kept); default: a temporary one")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qpipe-convertproc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    child, inside = [], []
    for i in range(args.rounds):
        order = [False, True] if i % 2 == 0 else [True, False]
        for in_process in order:
            seconds = timed(work / f"round{i}-{'in' if in_process else 'child'}", in_process)
            (inside if in_process else child).append(seconds)
        print(f"round {i + 1}: child process {child[-1]:.1f} s, in process {inside[-1]:.1f} s", flush=True)
    ratio = statistics.median(c / p for c, p in zip(child, inside, strict=True))
    print(f"median: child process {statistics.median(child):.1f} s, in process {statistics.median(inside):.1f} s; "
          f"ratio {ratio:.3f}x (target <= {TARGET_RATIO:.2f}x): {'ok' if ratio <= TARGET_RATIO else 'MISSED'}")


if __name__ == "__main__":
    main()
