"""What MLflow tracking costs on an unchanged re-run: tracked vs untracked, paired.

    .venv/bin/python benchmarks/tracking.py                  # the root pipeline.yaml, 5 pairs
    .venv/bin/python benchmarks/tracking.py --rounds 9 --pipeline P.yaml --work /tmp/track

Fills the cache with one untracked run and creates the sqlite store with one tracked run
(neither timed: an existing store, as after the first run), then takes turns, ``--rounds``
times: ``qpipe run --no-tracking`` and ``qpipe run --tracking-uri sqlite:///WORK/mlflow.db``,
each into a new output folder, everything cached. Prints the median wall times, the median of
the pairs' differences (target: at most 1 s) and of their ratios. Each run is its own process
(MLflow's import is part of what tracking costs). Then splits the difference: ``--rounds``
fresh processes load qpipe and its plugins, then time ``import mlflow`` and opening the store
(``MlflowClient`` and one query), the floor any in-process tracking pays; the rest is logging.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 1.0


def timed(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qpipe.cli", "run", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):  # 3: the gate failed, still a full run
        raise SystemExit(f"qpipe run {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


#: what any tracked run pays before it logs anything: MLflow's import (after what every qpipe
#: run loads: the CLI, the pipeline, the plugins), then its store opened
PROBE = """import sys, time
import qpipe.cli, qpipe.pipeline
from qpipe.plugins import get_plugin_manager
get_plugin_manager()
started = time.perf_counter()
import mlflow
imported = time.perf_counter()
mlflow.MlflowClient(tracking_uri=sys.argv[1]).get_experiment_by_name(sys.argv[2])
print(imported - started, time.perf_counter() - imported)
"""


def floor(work: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds of ``import mlflow`` and of opening the store the tracked runs used, in a fresh process."""
    where = json.loads((work / "warm-tracked" / "results.json").read_text())["extra"]["mlflow"]
    done = subprocess.run([sys.executable, "-c", PROBE, where["tracking_uri"], where["experiment"]],
                          capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    imported, opened = (float(x) for x in done.stdout.split())
    return imported, opened


def measure(pipeline: Path, work: Path, rounds: int, env: dict[str, str] | None = None,
            split: bool = False) -> dict[str, float]:
    """Median untracked and tracked seconds, and the medians of the pairs' differences and ratios
    (``env``: extra environment variables, e.g. ``QPIPE_CACHE_DIR``); with ``split``, after each
    pair the median seconds of importing MLflow and opening the store (``import_s``, ``store_s``)
    and the variants a run logs (``variants``)."""
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    cwd = pipeline.parent
    timed([str(pipeline), "--no-tracking", "-o", str(work / "warm-untracked")], cwd, env)
    timed([str(pipeline), "--tracking-uri", uri, "-o", str(work / "warm-tracked")], cwd, env)
    pairs, floors = [], []
    for i in range(rounds):
        runs = {"untracked": [str(pipeline), "--no-tracking", "-o", str(work / f"untracked-{i}")],
                "tracked": [str(pipeline), "--tracking-uri", uri, "-o", str(work / f"tracked-{i}")]}
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate who goes first
        seconds = {name: timed(runs[name], cwd, env) for name in order}
        pairs.append((seconds["untracked"], seconds["tracked"]))
        if split:
            floors.append(floor(work, env))
        print(f"  round {i + 1}: untracked {seconds['untracked']:.2f} s, tracked {seconds['tracked']:.2f} s",
              file=sys.stderr)
    found = {"untracked_s": statistics.median(u for u, _ in pairs),
             "tracked_s": statistics.median(t for _, t in pairs),
             "added_s": statistics.median(t - u for u, t in pairs),
             "ratio": statistics.median(t / u for u, t in pairs)}
    if split:
        found.update(import_s=statistics.median(f[0] for f in floors), store_s=statistics.median(f[1] for f in floors),
                     variants=len(json.loads((work / "warm-tracked" / "results.json").read_text())["variants"]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, default=ROOT / "pipeline.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temp folder)")
    args = parser.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="qpipe-tracking-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    found = measure(args.pipeline.resolve(), work, args.rounds, split=True)
    verdict = "ok" if found["added_s"] <= TARGET_SECONDS else f"OVER the {TARGET_SECONDS:.0f} s target"
    print(f"tracking, cached re-run of {args.pipeline.name} ({args.rounds} pairs): "
          f"untracked {found['untracked_s']:.2f} s, "
          f"tracked {found['tracked_s']:.2f} s; tracking adds {found['added_s']:.2f} s ({verdict}), "
          f"tracked/untracked {found['ratio']:.2f}x (medians)")
    rest = found["added_s"] - found["import_s"] - found["store_s"]
    print(f"  of which: import mlflow {found['import_s']:.2f} s, open the sqlite store {found['store_s']:.2f} s "
          f"(a fresh process after each pair, medians); the rest, {rest:.2f} s, is logging the parent run and "
          f"{found['variants']} variants ({rest / max(found['variants'], 1):.2f} s a variant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
