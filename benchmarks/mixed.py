"""Print the mixed-precision table of docs/mixed-precision.md, measured now.

Runs ``examples/mixed/pipeline.yaml``, ``pipeline-narrow.yaml`` and ``pipeline-mobilenetv2.yaml``
(uniform variants — int8, int4, float fallback, bfloat16; on MobileNetV2 also float16, full
int8 and int16x8 — and litert.mixed at a grid of size budgets and under the accuracy
constraint) without tracking or cache and prints, per model, one row per variant: accuracy,
its delta to float32, the share of top-1 predictions equal to float32's and the relative
output error against it (``fidelity``: finer than accuracy, which moves one sample at a
time), file size, ratio to float32, the ratio as a multiple of uniform int8's, bits per
weight and the quantize time; then, per uniform (non-mixed) variant, the mixed point that
dominates it (at least as accurate, no larger), or how far the mixed front falls short.

    .venv/bin/python benchmarks/mixed.py [--work DIR] [--only wide|narrow|mobilenetv2]   # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {"wide": ROOT / "examples" / "mixed" / "pipeline.yaml",
             "narrow": ROOT / "examples" / "mixed" / "pipeline-narrow.yaml",
             "mobilenetv2": ROOT / "examples" / "mixed" / "pipeline-mobilenetv2.yaml"}


def run(pipeline: Path, work: Path) -> dict:
    """Run ``pipeline`` into ``work``; return results.json."""
    qpipe = Path(sys.executable).parent / "qpipe"
    started = time.perf_counter()
    subprocess.run([str(qpipe), "run", str(pipeline), "--no-tracking", "--no-cache", "--output", str(work)],
                   check=True, stdout=subprocess.DEVNULL)
    results = json.loads((work / "results.json").read_text())
    results["_seconds"] = time.perf_counter() - started
    return results


def table(results: dict) -> str:
    """The markdown table, one row per variant."""
    variants = {v["name"]: v for v in results["variants"]}
    int8 = variants["int8"]["metrics"].get("size_ratio") or float("nan")
    header = ("| variant | quantizer | accuracy | Δ acc (pt) | top-1 = float | output error | size (KB) | × float32 "
              "| × int8's ratio | bits/weight | quantize s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        m = v.get("metrics", {})
        if v.get("status") != "ok":
            lines.append(f"| {name} | {v['quantizer']} | failed: {v.get('error', '')[:60]} |||||||||")
            continue
        ratio = m.get("size_ratio", float("nan"))
        bits = m.get("bits_per_weight")
        agree, error = m.get("top1_agreement"), m.get("relative_error")
        lines.append(f"| {name} | {v['quantizer']} | {m['accuracy']:.4f} | {100 * m.get('accuracy_delta', 0):+.2f} "
                     f"| {'' if agree is None else f'{100 * agree:.2f}%'} | {'' if error is None else f'{error:.4f}'} "
                     f"| {m['size_bytes'] / 1024:.1f} | {ratio:.2f} | {ratio / int8:.2f} "
                     f"| {'' if bits is None else f'{bits:.2f}'} | {m.get('quantize_seconds', 0):.1f} |")
    return "\n".join(lines)


def dominance(results: dict) -> str:
    """One line per uniform (non-mixed) variant: the mixed point that is at least as accurate
    and no larger (strictly better in one), or, if none, how far the front is from it."""
    ok = [v for v in results["variants"] if v.get("status") == "ok" and "accuracy" in v.get("metrics", {})]
    mixed = [v for v in ok if v["quantizer"] == "litert.mixed"]
    lines = []
    for u in (v for v in ok if v["quantizer"] != "litert.mixed"):
        acc, size = u["metrics"]["accuracy"], u["metrics"]["size_bytes"]
        simulated = ", simulated" if u.get("metadata", {}).get("simulated") else ""
        head = f"- {u['name']} ({u['quantizer']}{simulated}, {point(u)}): "
        better = [m for m in mixed if m["metrics"]["accuracy"] >= acc and m["metrics"]["size_bytes"] <= size
                  and (m["metrics"]["accuracy"] > acc or m["metrics"]["size_bytes"] < size)]
        if better:
            best = min(better, key=lambda m: m["metrics"]["size_bytes"])
            lines.append(head + f"dominated by {best['name']} ({point(best)})")
            continue
        smaller = [m for m in mixed if m["metrics"]["size_bytes"] <= size]
        gap = ("no mixed point this small" if not smaller else
               "best mixed point no larger is {} ({}), {:.2f} pt less accurate".format(
                   (b := max(smaller, key=lambda m: m["metrics"]["accuracy"]))["name"], point(b),
                   100 * (acc - b["metrics"]["accuracy"])))
        lines.append(head + "NOT dominated: " + gap)
    return "\n".join(lines)


def point(variant: dict) -> str:
    """``Δ acc pt, size KB`` of a variant."""
    m = variant["metrics"]
    return f"{100 * m.get('accuracy_delta', 0):+.2f} pt, {m['size_bytes'] / 1024:.1f} KB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--only", choices=sorted(PIPELINES), help="run one of the models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for name, pipeline in PIPELINES.items():
            if args.only and name != args.only:
                continue
            results = run(pipeline, (args.work or Path(scratch)) / name)
            print(f"## {results['pipeline']} ({pipeline.relative_to(ROOT)})\n")
            print(table(results))
            print("\nDoes the mixed front dominate each uniform variant (as accurate or more, no larger)?\n")
            print(dominance(results))
            print(f"\nwhole run: {results['_seconds']:.0f} s\n")


if __name__ == "__main__":
    main()
