"""The model zoo table of docs/models.md, measured now: every zoo family through every variant.

Builds each model of ``tests/zoo.py`` (two-head classifier+regressor, token attention, LSTM
text classifier, GRU forecaster, batch-1 SavedModel, conv autoencoder, ResNet block, BN
regression MLP, depthwise-separable CNN) in a scratch folder, writes a pipeline with the full
variant list for each, runs ``qpipe run`` on it (no tracking, no cache) and prints the table
family x variant -> status, headline delta (in the metric's unit), size ratio, and the reason
where a variant does not work.

    .venv/bin/python benchmarks/models.py [--work DIR] [--only FAMILY ...] [--write docs/models.md]

About 10 minutes on 2 cores. A run that qpipe refuses or that dies (e.g. a converter
segfault) is shown as such: its exit code and last error line, every variant it did not
record marked "not run".
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import zoo  # noqa: E402  (tests/zoo.py: the builders, shared with tests/test_model_zoo.py)

LOWER_IS_BETTER = {"mae", "rmse"}
FRACTIONS = {"accuracy"}


def run(pipeline: Path, output: Path, timeout: float) -> dict[str, Any]:
    """``qpipe run`` in its own process: results.json (if written), exit code, last stderr line."""
    qpipe = Path(sys.executable).parent / "qpipe"
    started = time.perf_counter()
    try:
        proc = subprocess.run([str(qpipe), "run", str(pipeline), "--no-tracking", "--no-cache", "--output",
                               str(output)], capture_output=True, text=True, timeout=timeout)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = None, f"timed out after {timeout:.0f} s"
    results_file = output / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if line.lower().startswith("error")), lines[-1] if lines else "")
    return {"results": results, "code": code, "error": error, "seconds": time.perf_counter() - started}


def headline(zm: zoo.ZooModel, metrics: dict[str, float]) -> list[tuple[str, str | None]]:
    """(metric name, the key it is found under) per output: ``quality/mae`` where the run
    measured each output, the plain name where it measured one output only."""
    out: list[tuple[str, str | None]] = []
    for output, task in zm.tasks.items():
        metric = "accuracy" if task in ("classification", "binary") else "mae"
        per_output = f"{output}/{metric}" if output else metric
        if per_output in metrics:
            out.append((per_output, per_output))
        elif output and metric in metrics:
            out.append((per_output, None))  # the run did not measure this output
        else:
            out.append((per_output, metric if metric in metrics else None))
    return out


def delta_text(metric: str, value: float, delta: float) -> str:
    base = metric.rsplit("/", 1)[-1]
    if base in FRACTIONS:
        return f"{100 * delta:+.2f} pt"
    before = value - delta
    rel = f" ({100 * delta / abs(before):+.1f}%)" if before else ""
    return f"{delta:+.4f}{rel}"


def note(notes: list[list[str]], name: str, text: str) -> int:
    """The number of ``text`` among ``notes`` ([variant names..., text]), added if new."""
    for i, entry in enumerate(notes, 1):
        if entry[-1] == text:
            entry.insert(-1, name)
            return i
    notes.append([name, text])
    return len(notes)


def cell(zm: zoo.ZooModel, v: dict[str, Any] | None, notes: list[list[str]]) -> str:
    """One table cell: 'ok Δ, ratio' or 'failed [n]', n the number of its reason in ``notes``."""
    if v is None:
        return "not run"
    if v.get("status") != "ok":
        return f"failed [{note(notes, v['name'], clean(v.get('error') or 'no reason given'))}]"
    m = v.get("metrics", {})
    parts = []
    for name, key in headline(zm, m):
        if key is None:
            parts.append(f"{name} not measured")
            continue
        shown = name if zm.multi_output else f"Δ{name}"
        d = m.get(f"{key}_delta")
        parts.append(f"{shown} {delta_text(name, m[key], d)}" if d is not None else f"{name} {m[key]:.4g}")
    text = "ok: " + ", ".join(parts) + f", {m.get('size_ratio', float('nan')):.2f}×"
    codes = sorted({w.get("code", "?") for w in v.get("warnings", [])})
    if codes:
        text += f" ⚠[{note(notes, v['name'], 'warnings ' + ', '.join(codes))}]"
    return text


def clean(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def baseline_text(zm: zoo.ZooModel, results: dict[str, Any]) -> str:
    base = next((v for v in results.get("variants", []) if v["name"] == "float32" and v["status"] == "ok"), None)
    if base is None:
        return "—"
    m = base["metrics"]
    shown = [f"{name} {m[key]:.4f}" for name, key in headline(zm, m) if key is not None]
    return ", ".join(shown) + f"; {m.get('size_bytes', 0) / 1024:.1f} KB"


def family_rows(zm: zoo.ZooModel, label: str, outcome: dict[str, Any]) -> tuple[str, list[str]]:
    """The table row and the lines under it: run-level notes (bullets), then numbered reasons."""
    results, notes, lines = outcome["results"], list[list[str]](), []
    by_name = {v["name"]: v for v in results.get("variants", [])}
    cells = [cell(zm, by_name.get(v["name"]), notes) for v in zoo.VARIANTS]
    if not results:
        lines.append(f"- run refused (exit {outcome['code']}): {clean(outcome['error'])}")
    elif results.get("status") != "finished" or outcome["code"] not in (0, 1):
        lines.append(f"- run ended with exit {outcome['code']}, results.json status "
                     f"'{results.get('status')}': {clean(outcome['error'])}")
    if outcome.get("by_hand"):
        lines.append("- " + hand_note(outcome["by_hand"]))
    lines += [f"{i}. {', '.join(entry[:-1])}: {entry[-1]}" for i, entry in enumerate(notes, 1)]
    row = f"| {label} | {baseline_text(zm, results)} | " + " | ".join(cells) + " |"
    return row, lines


def single_output_variant(zm: zoo.ZooModel) -> zoo.ZooModel:
    """The two-head model with the first head's labels only, as a single-output pipeline (what
    qpipe without per-output labels accepts): its verdict covers that head alone."""
    first = next(iter(zm.tasks))
    assert first is not None and isinstance(zm.labels, dict) and isinstance(zm.train_labels, dict)
    return zoo.ZooModel(zm.family, zm.title, zm.flavor, zm.root, zm.model, labels=zm.labels[first],
                        train_labels=zm.train_labels[first], tasks={None: zm.tasks[first]}, batch=zm.batch)


def by_hand(zm: zoo.ZooModel, out: Path, results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every head's headline metric of each ok variant, from a direct LiteRT evaluation."""
    data = zm.arrays()
    return {v["name"]: zoo.direct_metrics(zm, zoo.litert_outputs(out / v["artifact"], data["x_test"]), data)
            for v in results.get("variants", []) if v["status"] == "ok" and v.get("artifact")}


def hand_note(hand: dict[str, dict[str, float]]) -> str:
    """One line: each head's metric per variant, measured by hand (not by qpipe)."""
    base = hand.get("float32", {})
    parts = []
    for name, values in hand.items():
        shown = [f"{k} {delta_text(k, v, v - base[k]) if k in base and name != 'float32' else f'{v:.4f}'}"
                 for k, v in values.items() if not k.endswith("rmse")]
        parts.append(f"{name}: {', '.join(shown)}")
    return ("every head measured by hand (direct LiteRT evaluation of each .tflite; the run itself measured "
            "only the labelled head): " + "; ".join(parts))


def measure(families: list[str], work: Path, timeout: float) -> list[tuple[zoo.ZooModel, str, dict]]:
    runs = []
    for family in families:
        zm = zoo.build(family, work / "models" / family)
        tries = [(zm, family)]
        for i, (model, label) in enumerate(tries):
            pipeline = model.root / f"pipeline{i or ''}.yaml"
            pipeline.write_text(yaml.safe_dump(zoo.pipeline_dict(model), sort_keys=False))
            outcome = run(pipeline, work / "out" / f"{family}{i or ''}", timeout)
            print(f"{label}: exit {outcome['code']} in {outcome['seconds']:.0f} s", file=sys.stderr, flush=True)
            runs.append((model, label, outcome))
            if model.multi_output and not outcome["results"]:  # per-output labels refused: show today's verdict
                first = next(iter(model.tasks))
                tries.append((single_output_variant(model), f"{family} (labels: {first} only)"))
            if i:  # that verdict covers one head: measure every head by hand to show what it missed
                outcome["by_hand"] = by_hand(zm, work / "out" / f"{family}{i}", outcome["results"])
    return runs


def document(runs: list[tuple[zoo.ZooModel, str, dict]]) -> str:
    names = [v["name"] for v in zoo.VARIANTS]
    lines = ["| family | baseline | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    reasons = []
    for zm, label, outcome in runs:
        row, notes = family_rows(zm, label, outcome)
        lines.append(row)
        reasons.append(f"**{label}** ({zm.title}; {outcome['seconds']:.0f} s)" + ("" if notes else ": all ok"))
        reasons.extend(notes)
        reasons.append("")
    return "\n".join(lines) + "\n\n" + "\n".join(reasons)


HEADER = """# The model zoo: which variants work on which model families

Generated by `benchmarks/models.py` (`--write docs/models.md`), which builds the small models
of `tests/zoo.py`, runs each through the full variant list with `qpipe run` (no tracking, no
cache) and reads `results.json`. `tests/test_model_zoo.py` runs the same models and checks
every `ok` variant's metrics against a direct LiteRT evaluation of its `.tflite`, and every
failure for a reason that names its cause.

Each cell: the status; for `ok`, the headline change against float32 (accuracy in points;
MAE in the target's own unit, with the relative change) and the size ratio (float32 file /
variant file); for a failure, a note number: the reasons follow the table, per family.
The float32 column is the baseline's own headline metric and file size. Variant options:
`int8` is full-integer with int8 I/O, `mixed` is `litert.mixed` under `budget: {size_ratio: 4}`,
`qat`/`ternary`/`binary` train one epoch on 256 training rows.

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (kept); default: a temporary one")
    parser.add_argument("--only", nargs="+", choices=list(zoo.BUILDERS), help="families to run")
    parser.add_argument("--write", type=Path, help="write the page (e.g. docs/models.md)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per qpipe run")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qpipe-zoo-"))
    runs = measure(args.only or list(zoo.BUILDERS), work, args.timeout)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    measured = (f"Measured {stamp} at commit `{git.stdout.strip() or '?'}` on {platform.machine()}, "
                f"Python {platform.python_version()}.\n\n")
    page = HEADER + measured + document(runs)
    print(page)
    if args.write:
        args.write.write_text(page.rstrip() + "\n")


if __name__ == "__main__":
    main()
