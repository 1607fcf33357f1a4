"""The console: a rich progress display (a lifecycle-hook plugin) and the summary table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from qpipe import hookimpl
from qpipe.results import PipelineResults

#: shown after a variant's status when sanity checks warned about it (then the count)
WARNING_MARK = "!"


class ConsoleDisplay:
    """Shows one progress line per variant on stderr while a pipeline runs."""

    def __init__(self, total: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False,
                                 disable=not self.console.is_terminal and not _force())
        self.overall = None
        self.tasks: dict[str, int] = {}
        self.total = total
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.progress.start()
            self.overall = self.progress.add_task("variants", total=self.total)
            self.started = True

    def stop(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False

    @hookimpl
    def qpipe_pipeline_started(self, run) -> None:
        self._start()
        self.console.print(f"[bold]{run.name}[/bold]: {self.total} variants -> {run.output_dir}")

    @hookimpl
    def qpipe_variant_started(self, variant: str) -> None:
        self._start()
        self.tasks[variant] = self.progress.add_task(f"{variant}: starting", total=None)

    @hookimpl
    def qpipe_variant_progress(self, variant: str, message: str) -> None:
        if variant in self.tasks:
            self.progress.update(self.tasks[variant], description=f"{variant}: {message}")
        elif not self.progress.disable:
            return
        if self.progress.disable:
            self.console.print(f"  {variant}: {message}", highlight=False)

    def _done(self, variant: str, text: str) -> None:
        task = self.tasks.get(variant)
        if task is not None:
            self.progress.update(task, description=f"{variant}: {text}", total=1, completed=1)
        if self.overall is not None:
            self.progress.advance(self.overall)
        if self.progress.disable:
            self.console.print(f"{variant}: {text}", highlight=False)

    @hookimpl
    def qpipe_variant_finished(self, result) -> None:
        acc = result.metrics.get("accuracy")
        extra = f" accuracy {acc:.4f}" if acc is not None else ""
        if result.warnings:
            extra += f" [yellow]({len(result.warnings)} warning(s))[/yellow]"
        self._done(result.name, f"[green]ok[/green]{extra}")

    @hookimpl
    def qpipe_variant_failed(self, result) -> None:
        self._done(result.name, "[red]failed[/red]")  # the error is printed once, by print_summary

    @hookimpl
    def qpipe_pipeline_finished(self) -> None:
        self.stop()

    @hookimpl
    def qpipe_pipeline_failed(self) -> None:
        self.stop()


#: metrics the fixed columns already show
_SHOWN = {"accuracy", "accuracy_delta", "size_bytes", "size_ratio", "latency_ms_p50", "latency_ms_p95"}


def _force() -> bool:
    return False


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _headline_cell(name: str, value) -> str:
    if value is None:
        return ""
    return f"{value / 1024:.1f} KB" if name.endswith("_bytes") else f"{value:.4g}"


def summary_table(results: PipelineResults, headline: Sequence[str] = ()) -> Table:
    """variant, status, accuracy, Δ, size, ratio, latency, then each ``headline`` metric
    (evaluators' ``headline`` declarations): one row per variant."""
    table = Table(title=f"{results.pipeline} (baseline: {results.baseline})")
    extra = [name for name in dict.fromkeys(headline) if name not in _SHOWN]
    for col in ("variant", "quantizer", "status", "accuracy", "Δ acc", "size", "ratio", "p50 ms", "p95 ms"):
        table.add_column(col, justify="left" if col in ("variant", "quantizer", "status") else "right")
    for name in extra:
        table.add_column(name.removesuffix("_bytes"), justify="right")
    for v in results.variants:
        m = v.metrics
        status = "[green]ok[/green]" if v.status == "ok" else "[red]failed[/red]"
        if v.warnings:
            status += f" [yellow]{WARNING_MARK}{len(v.warnings)}[/yellow]"
        delta = m.get("accuracy_delta")
        size = m.get("size_bytes")
        table.add_row(
            v.name, v.quantizer, status,
            _fmt(m.get("accuracy"), ".4f"),
            "" if delta is None else f"{delta * 100:+.2f} pt",
            "" if size is None else f"{size / 1024:.1f} KB",
            _fmt(m.get("size_ratio"), ".2f", "x"),
            _fmt(m.get("latency_ms_p50"), ".3f"),
            _fmt(m.get("latency_ms_p95"), ".3f"),
            *(_headline_cell(name, m.get(name)) for name in extra),
        )
    return table


def print_summary(results: PipelineResults, output_dir: Path | None = None, headline: Sequence[str] = ()) -> None:
    """Print the summary table (with the ``headline`` metrics) and where the results are."""
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(summary_table(results, headline))
    for v in results.variants:
        if v.status != "ok":
            console.print(f"[red]{v.name} failed:[/red] {v.error}", highlight=False)
        for warning in v.warnings:
            console.print(f"[yellow]{escape(v.name)} warning \\[{escape(warning['code'])}]:[/yellow] "
                          f"{escape(warning['message'])}", highlight=False)
    from qpipe.report import latency_note

    note = latency_note(results)
    if note:
        console.print(note, highlight=False)
    selected = results.selected
    if selected and selected.get("variant"):
        console.print(f"selected: [bold]{selected['variant']}[/bold] ({selected['reason']})", highlight=False)
    elif selected:
        console.print(f"[red]no variant selected:[/red] {selected['reason']}", highlight=False)
        for name, why in selected.get("rejected", {}).items():
            console.print(f"  {name}: {why}", highlight=False)
