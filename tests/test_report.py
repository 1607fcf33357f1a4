"""The run report: summary table (CSV, Markdown), Pareto front, PNG charts."""

from __future__ import annotations

import csv
import io

import pytest

from qpipe.report import (
    QUALITY_CHART,
    LATENCY_CHART,
    SUMMARY_CSV,
    SUMMARY_MD,
    Point,
    pareto_front,
    points,
    quality_metric,
    report_files,
    summary_csv,
    summary_markdown,
    try_write_report,
    write_report,
)
from qpipe.results import PipelineResults, VariantResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def variant(name: str, accuracy: float | None, size: float, p50: float = 0.1, p95: float = 0.2,
            status: str = "ok", error: str | None = None) -> VariantResult:
    metrics = {} if status != "ok" else {"size_bytes": size, "latency_ms_p50": p50, "latency_ms_p95": p95,
                                         "size_ratio": 100_000 / size}
    if accuracy is not None and status == "ok":
        metrics["accuracy"] = accuracy
        metrics["accuracy_delta"] = accuracy - 0.95
    return VariantResult(name=name, quantizer=f"tflite.{name}", status=status, error=error, metrics=metrics)


@pytest.fixture
def results() -> PipelineResults:
    return PipelineResults(pipeline="demo", baseline="float32", status="finished", variants=[
        variant("float32", 0.95, 100_000),
        variant("float16", 0.95, 50_000),
        variant("dynamic", 0.94, 26_000),
        variant("int8", 0.93, 25_000, p50=0.05, p95=0.09),
        variant("int16x8", 0.92, 27_000, p50=0.4, p95=0.6),  # bigger and worse than dynamic: dominated
        variant("broken", None, 0, status="failed", error="converter | exploded\non two lines"),
    ], selected={"variant": "dynamic", "reason": "smallest within 1 point"}, headline=HEADLINE)


#: what the accuracy, size and latency evaluators declare (the runner writes this into results.json)
HEADLINE = [{"metric": "accuracy", "better": "higher", "role": "quality"},
            {"metric": "size_bytes", "better": "lower", "role": "cost"},
            {"metric": "size_ratio", "better": "higher", "role": "cost"},
            {"metric": "latency_ms_p50", "better": "lower", "role": "cost"},
            {"metric": "latency_ms_p95", "better": "lower", "role": "cost"}]


def test_pareto_front_keeps_only_undominated_points():
    pts = [Point("a", 10, 0.9), Point("b", 5, 0.9), Point("c", 5, 0.8), Point("d", 20, 0.95), Point("e", 30, 0.95)]
    assert [p.name for p in pareto_front(pts)] == ["b", "d"]
    assert pareto_front([]) == []
    # equal points do not dominate each other
    assert {p.name for p in pareto_front([Point("x", 1, 1), Point("y", 1, 1)])} == {"x", "y"}


def test_front_of_a_run_ignores_failed_variants(results):
    assert quality_metric(results) == "accuracy"
    assert [p.name for p in pareto_front(points(results))] == ["int8", "dynamic", "float16"]


def test_a_lower_is_better_metric_flips_the_front():
    pts = [Point("a", 10, 5.0), Point("b", 5, 5.0), Point("c", 5, 9.0), Point("d", 20, 1.0), Point("e", 30, 1.0)]
    assert [p.name for p in pareto_front(pts, lower=True)] == ["b", "d"]
    assert [p.name for p in pareto_front(pts)] == ["c"]  # read as higher-is-better: the worst error wins


def test_without_a_measured_quality_metric_there_is_no_quality_column_or_chart(results, tmp_path):
    for v in results.variants:
        v.metrics.pop("accuracy", None)
        v.metrics.pop("accuracy_delta", None)
    assert quality_metric(results) is None
    header = next(line for line in summary_markdown(results).splitlines() if line.startswith("| variant"))
    assert "accuracy" not in header and "size" in header
    assert QUALITY_CHART not in {p.name for p in write_report(results, tmp_path)}


def test_csv_has_every_metric_and_marks_front_and_selection(results):
    rows = list(csv.DictReader(io.StringIO(summary_csv(results))))
    assert [r["variant"] for r in rows] == [v.name for v in results.variants]
    by_name = {r["variant"]: r for r in rows}
    assert by_name["dynamic"]["selected"] == "1" and by_name["int8"]["selected"] == "0"
    assert by_name["int16x8"]["pareto"] == "0" and by_name["int8"]["pareto"] == "1"
    assert float(by_name["int8"]["size_bytes"]) == 25_000
    assert by_name["broken"]["status"] == "failed" and by_name["broken"]["accuracy"] == ""
    assert "exploded" in by_name["broken"]["error"]


def test_markdown_table_is_well_formed(results):
    text = summary_markdown(results)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(results.variants)
    widths = {line.replace("\\|", "").count("|") for line in table}
    assert widths == {11}, "every row has the header's 10 columns (escaped pipes in errors)"
    assert "| dynamic | tflite.dynamic | ok | 0.9400 | -1.00 pt | 25.4 KB |" in text
    assert "Selected: **dynamic**" in text
    assert "Pareto front (accuracy against size, higher is better): int8, dynamic, float16" in text


def test_write_report_writes_tables_and_png_charts(results, tmp_path):
    written = write_report(results, tmp_path)
    assert {p.name for p in written} == {SUMMARY_CSV, SUMMARY_MD, QUALITY_CHART, LATENCY_CHART}
    for name in (QUALITY_CHART, LATENCY_CHART):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert report_files(tmp_path) == [tmp_path / n for n in (SUMMARY_CSV, SUMMARY_MD, QUALITY_CHART, LATENCY_CHART)]


def test_charts_drawn_before_are_copied_from_the_cache(results, tmp_path, monkeypatch):
    from qpipe import report
    from qpipe.cacheprune import prune, usage

    cache = tmp_path / "cache"
    (tmp_path / "one").mkdir()
    write_report(results, tmp_path / "one", cache)
    drawn = []
    for name in ("draw_quality_chart", "draw_latency_chart"):
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda data, path, real=real: drawn.append(path.name) or real(data, path))
    (tmp_path / "two").mkdir()
    write_report(results, tmp_path / "two", cache)
    assert drawn == []  # same data: both charts copied, matplotlib not needed
    for name in (QUALITY_CHART, LATENCY_CHART):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    results.variants[0].metrics["latency_ms_p50"] = 0.05  # a changed measurement is drawn anew
    (tmp_path / "three").mkdir()
    write_report(results, tmp_path / "three", cache)
    assert drawn == [LATENCY_CHART]
    assert usage(cache).bytes > 0 and prune(cache).bytes > 0 and usage(cache).bytes == 0


def test_charts_are_skipped_when_nothing_was_measured(tmp_path):
    results = PipelineResults(pipeline="demo", baseline="a", variants=[variant("a", None, 0, status="failed")])
    written = write_report(results, tmp_path)
    assert {p.name for p in written} == {SUMMARY_CSV, SUMMARY_MD}
    assert "| a | tflite.a | failed |" in (tmp_path / SUMMARY_MD).read_text()


def test_a_report_failure_is_a_warning_not_a_crash(results, tmp_path):
    warnings = try_write_report(results, tmp_path / "missing-folder")
    assert len(warnings) == 1 and warnings[0].startswith("report: could not write")
