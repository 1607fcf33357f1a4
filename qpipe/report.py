"""The run's report: a summary table (CSV and Markdown) and two PNG charts, in the output folder.

Written at the end of every run, tracked or not (trackers log these files): ``summary.csv``
(every metric of every variant), ``summary.md`` (the headline columns), ``quality_vs_size.png``
(the first headline quality metric, e.g. accuracy or MAE, against file size, the Pareto front
marked) and ``latency.png`` (median and p95 latency per variant). The headline metrics and
which way each is better come from the evaluators' declarations (``results.headline``).
matplotlib is imported only when the charts are drawn, without pyplot, so no global backend
is touched (Agg canvas).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpipe.metrics import headline_of
from qpipe.results import PipelineResults, VariantResult, contained
from qpipe.task import Task

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
QUALITY_CHART = "quality_vs_size.png"
LATENCY_CHART = "latency.png"
REPORT_FILES = (SUMMARY_CSV, SUMMARY_MD, QUALITY_CHART, LATENCY_CHART)


@dataclass(frozen=True)
class Point:
    """One variant on the quality/size plane."""

    name: str
    size: float
    quality: float


def selected_variant(results: PipelineResults) -> tuple[str | None, str | None]:
    """(variant, reason) of the selection, from ``results.selected`` or ``results.extra``."""
    selected = results.selected or results.extra.get("selected") or {}
    return selected.get("variant"), selected.get("reason")


def quality_metric(results: PipelineResults) -> str | None:
    """The metric charted against size: the first headline quality metric measured."""
    measured = headline_of(results, "quality")
    return measured[0]["metric"] if measured else None


def lower_is_better(results: PipelineResults, metric: str | None) -> bool:
    """Whether smaller values of ``metric`` are better (errors), per the evaluators' declarations."""
    return any(h["metric"] == metric and h["better"] == "lower" for h in results.headline or [])


def points(results: PipelineResults, metric: str | None = None) -> list[Point]:
    """Every ok variant that has both a size and the quality metric."""
    metric = metric or quality_metric(results)
    out = []
    for v in _ok(results):
        size, quality = _number(v.metrics.get("size_bytes")), _number(v.metrics.get(metric)) if metric else None
        if size is not None and quality is not None:
            out.append(Point(v.name, size, quality))
    return out


def pareto_front(candidates: list[Point], lower: bool = False) -> list[Point]:
    """The points no other point beats on both counts (smaller or equal size, better or equal
    quality, strictly better on one), sorted by size. ``lower``: smaller quality is better."""
    sign = -1.0 if lower else 1.0
    front = [p for p in candidates
             if not any(q.size <= p.size and sign * q.quality >= sign * p.quality
                        and (q.size < p.size or sign * q.quality > sign * p.quality) for q in candidates)]
    return sorted(front, key=lambda p: (p.size, -sign * p.quality))


def front_of(results: PipelineResults) -> list[Point]:
    """The run's Pareto front on its chart metric."""
    metric = quality_metric(results)
    return pareto_front(points(results, metric), lower_is_better(results, metric))


# --------------------------------------------------------------------------- tables


def metric_columns(results: PipelineResults) -> list[str]:
    """Every metric key of every variant, in order of first appearance."""
    keys: dict[str, None] = {}
    for v in results.variants:
        keys.update(dict.fromkeys(v.metrics))
    return list(keys)


def summary_csv(results: PipelineResults) -> str:
    """One row per variant: name, quantizer, status, Pareto, selected, every metric, error."""
    front = {p.name for p in front_of(results)}
    chosen, _ = selected_variant(results)
    metrics = metric_columns(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "quantizer", "status", "pareto", "selected", *metrics, "error", "warnings"])
    for v in results.variants:
        writer.writerow([v.name, v.quantizer, v.status, int(v.name in front), int(v.name == chosen),
                         *("" if v.metrics.get(k) is None else v.metrics[k] for k in metrics), v.error or "",
                         " ".join(w["code"] for w in v.warnings)])
    return buffer.getvalue()


@dataclass(frozen=True)
class Column:
    """One headline column of the summary: a metric's value, or its change against the baseline."""

    title: str
    metric: str
    style: str  # "number", "bytes", "ratio", "ms", "points" (delta of a fraction x100), "delta"

    def cell(self, metrics: dict[str, Any]) -> str:
        value = _number(metrics.get(self.metric))
        if value is None:
            return ""
        if self.style == "delta":
            return delta_text(value, _number(metrics.get(self.metric.removesuffix("_delta"))))
        return {"bytes": f"{value / 1024:.1f} KB", "ratio": f"{value:.2f}x", "ms": f"{value:.3f}",
                "points": f"{value * 100:+.2f} pt"}.get(self.style, f"{value:.4f}")


#: metrics that are fractions (their deltas read in points): accuracy, top-k accuracy, agreement
FRACTION_SUFFIXES = ("accuracy", "agreement", "precision", "recall", "f1", "auc", "iou")


def is_fraction(metric: str) -> bool:
    """Whether ``metric`` (``species/accuracy``, ``top3_accuracy``) is a fraction of samples."""
    return metric.removesuffix("_delta").rsplit("/", 1)[-1].endswith(FRACTION_SUFFIXES)


def delta_text(delta: float, value: float | None = None) -> str:
    """A change in the metric's own unit, with the relative change when the baseline's value
    (``value - delta``) is known and not zero: ``+0.1170 (+72%)``."""
    text = f"{delta:+.4f}"
    reference = None if value is None else value - delta
    if reference and delta:
        relative = delta / abs(reference)
        text += f" ({relative:+.1%})" if abs(relative) < 0.1 else f" ({relative:+.0%})"
    return text


def headline_columns(results: PipelineResults) -> list[Column]:
    """The summary's metric columns, from the evaluators' headline declarations: each quality
    metric with its delta against the baseline (in points for fractions such as accuracy, else in
    the metric's own unit with the relative change), then costs. A model with several outputs
    has a column per output's metric (``quality/mae``)."""
    columns = []
    for h in headline_of(results, "quality") + headline_of(results, "cost"):
        name = h["metric"]
        if name.endswith("_bytes"):
            columns.append(Column(name.removesuffix("_bytes").replace("_", " "), name, "bytes"))
        elif name.endswith("_ratio"):
            columns.append(Column("ratio" if name == "size_ratio" else name.replace("_", " "), name, "ratio"))
        elif "_ms" in name:
            columns.append(Column(name.replace("latency_ms_", "").replace("_", " ") + " ms", name, "ms"))
        else:
            columns.append(Column(name.replace("_", " "), name, "number"))
        if h["role"] == "quality":  # in points for fractions (accuracy), else in the metric's unit
            columns.append(Column(f"Δ {name}", f"{name}_delta", "points" if is_fraction(name) else "delta"))
    return columns


def summary_markdown(results: PipelineResults) -> str:
    """The headline columns as a Markdown table, with the selection and the Pareto front."""
    front = [p.name for p in front_of(results)]
    chosen, reason = selected_variant(results)
    columns = headline_columns(results)
    header = ["variant", "quantizer", "status", *(c.title for c in columns), "note"]
    lines = [f"# {results.pipeline} (baseline: {results.baseline})", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(columns) + ["---"]) + "|"]
    for v in results.variants:
        notes = [n for n, on in (("selected", v.name == chosen), ("Pareto", v.name in front)) if on]
        if v.warnings:
            notes.append(f"{len(v.warnings)} warning(s)")
        if v.status != "ok":
            notes.append(_cell(v.error or "failed"))
        lines.append("| " + " | ".join([_cell(v.name), _cell(v.quantizer), v.status,
                                        *(c.cell(v.metrics) for c in columns), ", ".join(notes)]) + " |")
    lines.append("")
    lines += warning_lines(results)
    if task_line(results):
        lines.append(f"Task: {task_line(results)}")
    if chosen:
        lines.append(f"Selected: **{chosen}** ({reason})")
    elif reason:
        lines.append(f"No variant selected: {reason}")
    if front:
        metric = quality_metric(results)
        better = "lower" if lower_is_better(results, metric) else "higher"
        lines.append(f"Pareto front ({metric} against size, {better} is better): {', '.join(front)}")
    note = latency_note(results)
    if note:
        lines += ["", note]
    return "\n".join(lines).rstrip() + "\n"


def task_line(results: PipelineResults) -> str:
    """``regression (inferred: ...)``; per output for a model with several; "" when unknown."""
    if results.tasks:
        return "; ".join(f"{name}: {Task(**task).describe() if task.get('name') else 'no labels (fidelity only)'}"
                         for name, task in results.tasks.items())
    return Task(**results.task).describe() if results.task and results.task.get("name") else ""


def warning_lines(results: PipelineResults) -> list[str]:
    """The sanity-check warnings as a Markdown list (nothing when there are none)."""
    items = [f"- {_cell(v.name)} `{w['code']}`: {_cell(w['message'])}" for v in results.variants for w in v.warnings]
    return ["Warnings:", "", *items, ""] if items else []


def latency_note(results: PipelineResults) -> str | None:
    """Where the latencies come from (this run, re-measured on a cache hit) and which are too
    noisy to rank by; None when no variant has a latency."""
    timed = [v for v in results.variants if v.status == "ok" and "latency_ms_p50" in v.metrics]
    if not timed:
        return None
    again = [v.name for v in timed if "latency_ms_p50" in v.metadata.get("remeasured", [])]
    stale = [v.name for v in timed if v.metadata.get("cache") == "hit" and v.name not in again]
    parts = [f"Latency: measured in this run for {len(timed) - len(stale)} of {len(timed)} variant(s)"
             + (f" (re-measured after a cache hit: {', '.join(again)})" if again else "")]
    if stale:
        parts.append(f"replayed from the cache, not re-measured: {', '.join(stale)}")
    noisy = [f"{v.name} ({v.metrics.get('latency_spread', 0):.0%})" for v in timed if v.metrics.get("latency_noisy")]
    if noisy:
        parts.append(f"too noisy to rank (spread IQR/median over the limit): {', '.join(noisy)}")
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------- charts


def quality_chart_data(results: PipelineResults) -> dict[str, Any] | None:
    """What the quality/size chart shows (None if nothing to plot)."""
    metric = quality_metric(results)
    pts = points(results, metric)
    if not pts:
        return None
    lower = lower_is_better(results, metric)
    return {"pipeline": results.pipeline, "metric": metric, "lower_is_better": lower,
            "points": [[p.name, p.size, p.quality] for p in pts],
            "front": [p.name for p in pareto_front(pts, lower)], "chosen": selected_variant(results)[0],
            "sweeps": sweeps(results, pts)}


def sweeps(results: PipelineResults, pts: list[Point]) -> dict[str, list[str]]:
    """Quantizers with three or more charted variants (a grid of options, e.g. budgets):
    their variants by size, drawn as one line against the other variants."""
    charted = {p.name: p for p in pts}
    groups: dict[str, list[Point]] = {}
    for v in _ok(results):
        if v.name in charted:
            groups.setdefault(v.quantizer, []).append(charted[v.name])
    return {q: [p.name for p in sorted(group, key=lambda p: p.size)] for q, group in groups.items() if len(group) >= 3}


def draw_quality_chart(data: dict[str, Any], path: Path) -> Path:
    """Quality against size (KB), each variant labelled, the Pareto front joined."""
    pts = {name: Point(name, size, quality) for name, size, quality in data["points"]}
    front = [pts[name] for name in data["front"]]
    fig, ax = _figure((7, 4.5))
    others = [p for p in pts.values() if p.name not in data["front"]]
    if others:
        ax.scatter([p.size / 1024 for p in others], [p.quality for p in others], color="#9e9e9e",
                   label="dominated", zorder=3)
    ax.scatter([p.size / 1024 for p in front], [p.quality for p in front], color="#d62728",
               label="Pareto front", zorder=4)
    ax.step([p.size / 1024 for p in front], [p.quality for p in front], where="post", color="#d62728",
            linewidth=1, alpha=0.6)
    for quantizer, names in data.get("sweeps", {}).items():
        ax.plot([pts[n].size / 1024 for n in names], [pts[n].quality for n in names], linestyle="--",
                linewidth=1, alpha=0.7, label=f"{quantizer} sweep")
    offsets = ((5, 4), (5, -11), (5, 14), (5, -21))  # neighbours' labels take turns above and below
    for i, p in enumerate(sorted(pts.values(), key=lambda p: p.size)):
        ax.annotate(p.name + (" (selected)" if p.name == data["chosen"] else ""), (p.size / 1024, p.quality),
                    textcoords="offset points", xytext=offsets[i % len(offsets)], fontsize=8)
    ax.set_xlabel("size (KB)")
    lower = data.get("lower_is_better", False)
    ax.set_ylabel(f"{data['metric']} ({'lower' if lower else 'higher'} is better)")
    ax.set_title(f"{data['pipeline']}: {data['metric']} against size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right" if lower else "lower right", fontsize=8)
    return _save(fig, path)


def latency_chart_data(results: PipelineResults) -> dict[str, Any] | None:
    """What the latency chart shows: (variant, p50, p95) rows (None if no latency was measured)."""
    measured = [(v.name, _number(v.metrics.get("latency_ms_p50")), _number(v.metrics.get("latency_ms_p95")))
                for v in _ok(results)]
    rows = [[n, p50, p95] for n, p50, p95 in measured if p50 is not None]
    return {"pipeline": results.pipeline, "rows": rows} if rows else None


def draw_latency_chart(data: dict[str, Any], path: Path) -> Path:
    """Median latency per variant as bars, p95 as the whisker."""
    rows = data["rows"]
    fig, ax = _figure((7, 0.6 + 0.45 * len(rows)))
    names = [n for n, _, _ in rows]
    p50 = [v for _, v, _ in rows]
    upper = [max(0.0, (p95 if p95 is not None else v) - v) for _, v, p95 in rows]
    ax.barh(names, p50, xerr=[[0.0] * len(rows), upper], color="#1f77b4", capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel("latency per call (ms): bar median, whisker p95")
    ax.set_title(f"{data['pipeline']}: latency per variant")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- writing


def write_report(results: PipelineResults, output_dir: Path, cache_dir: Path | None = None) -> list[Path]:
    """Write the summary table and the charts into ``output_dir``; return the files written.

    With ``cache_dir`` (the run's variant cache), a chart whose data was drawn before is
    copied from there: matplotlib is then not even imported (about 2 s saved per run).
    """
    from qpipe.cache import reuse_file

    output_dir = Path(output_dir)
    written = []
    for name, text in ((SUMMARY_CSV, summary_csv(results)), (SUMMARY_MD, summary_markdown(results))):
        (output_dir / name).write_text(text, encoding="utf-8")
        written.append(output_dir / name)
    for name, data_of, draw in ((QUALITY_CHART, quality_chart_data, draw_quality_chart),
                                (LATENCY_CHART, latency_chart_data, draw_latency_chart)):
        data = data_of(results)
        if data is None:
            continue
        path = output_dir / name
        if cache_dir is None:
            draw(data, path)
        else:
            reuse_file(Path(cache_dir), data, path, functools.partial(draw, data))
        written.append(path)
    return written


def try_write_report(results: PipelineResults, output_dir: Path, cache_dir: Path | None = None) -> list[str]:
    """``write_report``, turning a failure into a warning (the run's results matter more);
    a full disk is raised, and ends the run."""
    from qpipe.errors import is_disk_full

    try:
        write_report(results, output_dir, cache_dir)
    except Exception as exc:  # noqa: BLE001 - a broken chart must not fail the run
        if is_disk_full(exc):  # a full disk does: the run cannot be written out
            raise
        return [f"report: could not write the summary or charts: {type(exc).__name__}: {exc}"]
    return []


def report_files(output_dir: Path) -> list[Path]:
    """The report files present in ``output_dir`` (not symlinks leading out of it)."""
    return [Path(output_dir) / name for name in REPORT_FILES
            if (path := contained(output_dir, name)) is not None and path.is_file()]


def _figure(size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def _ok(results: PipelineResults) -> list[VariantResult]:
    return [v for v in results.variants if v.status == "ok"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
