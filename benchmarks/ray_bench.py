"""Variants per minute on a training-heavy grid: in this process vs a 2-node local Ray cluster.

    .venv/bin/python benchmarks/ray_bench.py [--variants 4] [--epochs 3]

The grid is ``--variants`` QAT variants (different learning rates) of the tiny digits model
plus the float32 baseline. The cluster is a head (1 CPU) and a worker node (1 CPU) started as
separate processes by ``qpipe.localray``; the worker cannot see the pipeline's folder (needs root
and ``unshare``). The time to start the cluster is reported apart; the Ray run's time includes
connecting, shipping the model and data, and every task.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from qpipe.tfenv import prepare_environment

prepare_environment()

from qpipe.localray import local_ray_cluster, ray_env  # noqa: E402
from qpipe.testing import make_tiny_project, plugin_manager, run_pipeline_file  # noqa: E402


def timed_run(project, variants, data, name, **sections) -> tuple[float, list]:
    path = project.write_pipeline(variants, name=f"{name}.yaml", data=data, evaluators=["accuracy", "size"],
                                  **sections)
    started = time.perf_counter()
    results = run_pipeline_file(path, plugin_manager(entry_points=["tfmot"]), output=project.root / name,
                                settings={"no_tracking": True, "no_cache": True})
    seconds = time.perf_counter() - started
    assert all(v.status == "ok" for v in results.variants), [v.error for v in results.variants]
    return seconds, results.variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})
    load = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="qpipe-raybench-"))
    try:
        project = make_tiny_project(root)
        data = {s: {"path": "data.npz", "inputs": x, "labels": y} for s, x, y in
                (("evaluation", "x_test", "y_test"), ("calibration", "x_train", "y_train"),
                 ("training", "x_train", "y_train"))}
        variants = [{"name": f"qat_{i}", "quantizer": "tfmot.qat",
                     "options": {"epochs": args.epochs, "learning_rate": 1e-4 * (i + 1)}} for i in range(args.variants)]
        total = len(variants) + 1
        local, _ = timed_run(project, variants, data, "in-process")
        started = time.perf_counter()
        with local_ray_cluster(head_cpus=1, hidden=root) as (address, _):
            up = time.perf_counter() - started
            remote, results = timed_run(project, variants, data, "ray", executor={"name": "ray", "address": address})
        nodes = sorted({v.metadata["worker"].get("node", "?")[:8] for v in results})
        print(f"load average before: {load:.2f}; {os.cpu_count()} cores")
        print(f"{total} variants ({args.variants} QAT x {args.epochs} epochs + float32)")
        print(f"in-process: {local:.1f} s = {total / local * 60:.1f} variants/min")
        print(f"2-node Ray: {remote:.1f} s = {total / remote * 60:.1f} variants/min "
              f"(cluster start {up:.1f} s, nodes used: {', '.join(nodes)})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
