"""The console: a rich progress display (a lifecycle-hook plugin) and the summary table."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from qpipe import hookimpl
from qpipe.report import headline_columns, task_line
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
        self.overall: TaskID | None = None
        self.tasks: dict[str, TaskID] = {}
        self.total = total
        self.started = False
        self.headline: list[str] = []  # quality metrics shown as each variant ends

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
    def qpipe_pipeline_started(self, run) -> None:
        self._start()
        self.headline = [h["metric"] for h in run.results.headline if h["role"] == "quality"]
        self.console.print(f"[bold]{run.name}[/bold]: {self.total} variants -> {run.output_dir}")

    @hookimpl
    def qpipe_variant_finished(self, result) -> None:
        shown = [(k, result.metrics[k]) for k in self.headline if result.metrics.get(k) is not None]
        extra = "".join(f" {k} {value:.4f}" for k, value in shown)
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


def _force() -> bool:
    return False


def summary_table(results: PipelineResults) -> Table:
    """variant, quantizer, status and the headline columns (``qpipe.report.headline_columns``)."""
    columns = headline_columns(results)
    table = Table(title=f"{results.pipeline} (baseline: {results.baseline})")
    for col in ("variant", "quantizer", "status"):
        table.add_column(col, justify="left")
    for column in columns:
        table.add_column(column.title, justify="right")
    for v in results.variants:
        status = "[green]ok[/green]" if v.status == "ok" else "[red]failed[/red]"
        if v.warnings:
            status += f" [yellow]{WARNING_MARK}{len(v.warnings)}[/yellow]"
        table.add_row(v.name, v.quantizer, status, *(c.cell(v.metrics) for c in columns))
    return table


def print_summary(results: PipelineResults, output_dir: Path | None = None) -> None:
    """Print the summary table (the headline metrics the evaluators declared) and where the results are."""
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(summary_table(results))
    if task_line(results):
        console.print(f"task: {task_line(results)}", highlight=False)
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
