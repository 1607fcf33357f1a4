"""The ``qpipe`` command line (typer). Plugins add sub-commands with ``qpipe_add_commands``.

Exit codes: 0 all variants ok; 1 a variant failed; 2 bad input (one line, no traceback
unless ``--debug``); 3 the accuracy gate failed; 70 an internal error; 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import typer

from qpipe import __version__
from qpipe.errors import QpipeError, Terminated, is_disk_full, short_error
from qpipe.scratch import scratch_scope

EXIT_VARIANT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_GATE_FAILED = 3
EXIT_IO_ERROR = 74  # the disk is full (sysexits' EX_IOERR)
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qpipe {__version__}")
        raise typer.Exit()


def fail(message: str, code: int = EXIT_USER_ERROR) -> "typer.Exit":
    """Print ``error: message`` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


class ErrorGuard:
    """Turns exceptions into one-line errors and exit codes (tracebacks only with --debug).

    Plugins adding commands use it too: ``with ErrorGuard(debug): ...``.
    """

    def __init__(self, debug: bool):
        self.debug = debug

    def __enter__(self) -> "ErrorGuard":
        return self

    def __exit__(self, kind, exc, tb) -> Literal[False]:
        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, SystemExit)):
            return False
        if self.debug:
            import traceback

            traceback.print_exception(kind, exc, tb)
        if isinstance(exc, KeyboardInterrupt):
            raise fail(*interrupt_message(exc))
        if isinstance(exc, QpipeError):
            raise fail(str(exc), exc.exit_code)
        if is_disk_full(exc):
            where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
            raise fail(f"no space left on the device{where}; free some space or write the output elsewhere "
                       "(--output); results.json records the run as crashed", EXIT_IO_ERROR)
        hint = "" if self.debug else " (rerun with --debug for the traceback)"
        raise fail(f"internal error: {short_error(exc)}{hint}", EXIT_INTERNAL)


def interrupt_message(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The one line and the exit code for Ctrl-C (130) or SIGTERM (143)."""
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM); results so far are in the output folder", EXIT_TERMINATED
    return "interrupted; results so far are in the output folder", EXIT_INTERRUPTED


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c():
    """While the block runs, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main
    thread, so a ``kill`` or a CI timeout closes open runs as Ctrl-C does."""
    def terminate(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (e.g. an embedding application): leave it be
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_app(pm: Any = None) -> typer.Typer:
    """The typer app; ``pm`` (a plugin manager) is created on first need when not given."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                      help="Quantize a trained model into every variant, evaluate each, track them side by side.")
    commands = _Commands(pm)
    app.callback()(_main)
    app.command()(commands.run)
    app.command()(commands.validate)
    app.command()(commands.plugins)
    app.command(name="cache")(cache_cmd)
    app.command(name="new-plugin")(new_plugin_cmd)
    app.command(name="plugin-venv")(plugin_venv_cmd)
    app.command(name="log")(commands.log)
    if pm is not None or os.environ.get("QPIPE_NO_PLUGIN_COMMANDS") is None:
        try:
            commands.pm().hook.qpipe_add_commands(app=app)
        except Exception as exc:  # a broken command plugin must not break the CLI
            typer.echo(f"warning: a plugin failed to add its commands: {exc}", err=True)
    return app


def _main(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    """qpipe: quantization pipelines for TensorFlow/LiteRT models."""


class _Commands:
    """qpipe's sub-commands that need the plugin manager, one method each."""

    def __init__(self, pm: Any = None):
        self._pm = pm

    def pm(self) -> Any:
        """The plugin manager given to ``build_app``, else the installed plugins (loaded once)."""
        if self._pm is None:
            from qpipe.plugins import get_plugin_manager

            self._pm = get_plugin_manager()
        return self._pm

    def run(
        self,
        pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: runs/<name>-<timestamp>)."),
        only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this variant (repeatable); the baseline always runs."),
        tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (overrides the YAML and MLFLOW_TRACKING_URI)."),
        no_tracking: bool = typer.Option(False, "--no-tracking", help="Run without MLflow tracking."),
        gate: bool = typer.Option(False, "--gate", help=f"Exit with code {EXIT_GATE_FAILED} when no variant meets the constraints."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Run N variants at once in worker processes (overrides executor.jobs)."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Neither reuse nor store cached variants."),
        force: bool = typer.Option(False, "--force", help="Write into an output folder that is not empty."),
        executor: Optional[str] = typer.Option(None, "--executor", help="'ray' runs variants as Ray tasks (overrides executor.name)."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address, e.g. ray://HOST:10001 (implies --executor ray; default executor.address, then RAY_ADDRESS)."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks and TensorFlow logs."),
    ) -> None:
        """Run every variant of PIPELINE and write results.json to the output folder."""
        from qpipe.tfenv import prepare_environment

        if debug:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        prepare_environment()
        with ErrorGuard(debug), sigterm_stops_like_ctrl_c():
            from qpipe.config import load_config, resolve
            from qpipe.registry import Registry

            if executor not in (None, "local", "ray"):
                raise QpipeError(f"--executor {executor}: unknown executor; use local or ray")
            pm = self.pm()
            resolved = resolve(load_config(pipeline), Registry.from_plugins(pm), only)
            settings = {"tracking_uri": tracking_uri, "no_tracking": no_tracking, "debug": debug,
                        "gate": gate, "jobs": jobs, "no_cache": no_cache, "force": force,
                        "executor": executor, "address": address}
            _run_and_report(pm, resolved, output, settings)

    def validate(
        self,
        pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Check PIPELINE (structure, component names, options) without running anything."""
        with ErrorGuard(debug):
            from qpipe.config import load_config, resolve
            from qpipe.registry import Registry

            resolved = resolve(load_config(pipeline), Registry.from_plugins(self.pm()))
            names = ", ".join(f"{rv.config.name} ({rv.config.quantizer})" for rv in resolved.variants)
            typer.echo(f"{pipeline}: ok; {len(resolved.variants)} variants: {names}; baseline: {resolved.baseline}")

    def plugins(self, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List installed plugins, their versions and the components each registers."""
        with ErrorGuard(False):
            from qpipe.registry import Registry

            pm = self.pm()
            registry = Registry.from_plugins(pm)
            listing = _plugin_listing(pm, registry)
            if as_json:
                failures = {**pm.load_failures, **registry.problems()}
                typer.echo(json.dumps({"plugins": listing, "load_failures": failures}, indent=2))
                return
            _print_plugins(listing, pm.load_failures, registry.problems())

    def log(
        self,
        output_dir: Path = typer.Argument(..., help="Output folder of a finished 'qpipe run'."),
        tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Tracking URI (default: "
                                                   "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."),
        use_recorded_uri: bool = typer.Option(False, "--use-recorded-uri", help="Log to the tracking URI the "
                                              "folder's pipeline copy records (trust the folder to choose the store)."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Replay a finished run's results.json to the trackers (e.g. after the server was down).

        The folder does not choose where it is logged unless --use-recorded-uri says so."""
        with ErrorGuard(debug):
            from qpipe.replay import replay

            warnings = replay(self.pm(), output_dir, {"tracking_uri": tracking_uri,
                                                      "use_recorded_uri": use_recorded_uri})
            for warning in warnings:
                typer.echo(f"warning: {warning}", err=True)
            typer.echo(f"logged {output_dir}")


def _run_and_report(pm: Any, resolved: Any, output: Path | None, settings: dict[str, Any]) -> None:
    """Run ``resolved`` with the console display, print the summary and raise the exit code:
    3 when the gate failed, 1 when a variant failed."""
    from qpipe.display import ConsoleDisplay, print_summary
    from qpipe.pipeline import run_pipeline
    from qpipe.schedule import chosen_executor

    display = ConsoleDisplay(total=len(resolved.variants))
    pm.register(display, name="qpipe-console")
    try:
        if chosen_executor(resolved.config.executor, settings) == "ray":
            from qpipe.remote import check_reachable

            check_reachable(resolved.config.executor, settings)  # before the output folder exists
        results, warnings = run_pipeline(pm, resolved, output, settings)
    finally:
        display.stop()
        pm.unregister(name="qpipe-console")
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    print_summary(results, Path(output) if output else None)
    if results.gate is not None and not results.gate["passed"]:
        raise fail(f"gate: {results.gate['reason']} ({', '.join(results.gate['constraints'])}); "
                   "see 'gate' in results.json", EXIT_GATE_FAILED)
    failed = [v.name for v in results.variants if v.status != "ok"]
    if failed:
        raise fail(f"{len(failed)} variant(s) failed: {', '.join(failed)} (see results.json)",
                   EXIT_VARIANT_FAILED)


def _plugin_listing(pm: Any, registry: Any) -> dict[str, Any]:
    """{plugin name: distribution, version, module, components by kind, hooks it implements}."""
    listing: dict[str, Any] = {}
    for name, info in sorted(pm.infos.items()):
        listing[name] = {"distribution": info.distribution, "version": info.version,
                         "module": info.module, "components": {}, "hooks": []}
    for kind, entries in registry.entries.items():
        for cname, entry in sorted(entries.items()):
            plugin = listing.setdefault(entry.plugin, {"components": {}, "hooks": []})
            plugin["components"].setdefault(kind, []).append(cname)
    for name in listing:
        plugin_obj = pm.get_plugin(name)
        if plugin_obj is not None:
            listing[name]["hooks"] = sorted(h.name for h in pm.get_hookcallers(plugin_obj) or [])
    return listing


def _print_plugins(listing: dict[str, Any], load_failures: dict[str, str], problems: dict[str, str]) -> None:
    """The plugin listing as a table, then the plugins that failed to load or are not usable."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qpipe plugins")
    for col in ("plugin", "version", "components"):
        table.add_column(col)
    for name, item in listing.items():
        comps = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in item["components"].items())
        table.add_row(name, item.get("version") or "", comps or "(hooks: " + ", ".join(item["hooks"]) + ")")
    console = Console()
    console.print(table)
    for name, error in load_failures.items():
        console.print(f"[red]failed to load plugin '{name}':[/red] {error}")
    for name, error in problems.items():
        console.print(f"[red]not usable: {name}:[/red] {error}")


def cache_cmd(
    pipeline: Path = typer.Argument(Path("pipeline.yaml"), help="The pipeline whose cache to show."),
    clear: bool = typer.Option(False, "--clear", help="Remove the cached variants."),
    older_than: Optional[float] = typer.Option(None, "--older-than", min=0,
                                               help="With --clear: only entries stored more than DAYS ago."),
) -> None:
    """Show where PIPELINE's variant cache is and its size; --clear empties it."""
    with ErrorGuard(False):
        from qpipe.cache import cache_dir
        from qpipe.cacheprune import prune, usage
        from qpipe.config import load_config

        loaded = load_config(pipeline)
        root = cache_dir(loaded.config, loaded.path.parent, {})
        if root is None:
            typer.echo(f"{pipeline}: the cache is off (cache: {{enabled: false}})")
            return
        if older_than is not None and not clear:
            raise fail("--older-than only applies with --clear")
        if clear:
            gone = prune(root, older_than)
            for link in gone.links:
                typer.echo(f"removed a symlink from the cache, not what it points to: {link}")
            typer.echo(f"removed {gone.entries} cached variant(s), {gone.bytes / 2**20:.1f} MiB, from {root}")
        held = usage(root)
        typer.echo(f"cache {root}: {held.entries} cached variant(s), {held.bytes / 2**20:.1f} MiB")


def new_plugin_cmd(
    name: str = typer.Argument(..., help="Plugin name: lower-case letters, digits, '_' (e.g. my_metrics)."),
    kind: str = typer.Option("evaluator", "--kind", help="What the plugin adds: evaluator, quantizer, calibrator or backend."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where to create the qpipe-NAME folder."),
) -> None:
    """Create a plugin package (pyproject entry point, one component of KIND, passing tests)."""
    with ErrorGuard(False):
        from qpipe.scaffold import new_plugin

        root = new_plugin(name, directory, kind)
        typer.echo(f"created {root}\nnext: cd {root}\n"
                   "      python -m qpipe plugin-venv .venv   # reuses this qpipe; nothing downloaded\n"
                   "      .venv/bin/python -m pip install --no-deps -e .\n"
                   "      .venv/bin/python -m pytest")


def plugin_venv_cmd(
    folder: Path = typer.Argument(Path(".venv"), help="The virtual environment to create."),
) -> None:
    """Create a venv that reuses this qpipe and its packages (for developing a plugin)."""
    with ErrorGuard(False):
        from qpipe.testing import overlay_venv

        if folder.exists() and any(folder.iterdir()):
            raise fail(f"{folder} already exists and is not empty; choose another folder")
        python = overlay_venv(folder)
        typer.echo(f"created {folder}: {python} sees qpipe {__version__}; "
                   f"{python.parent / 'qpipe'} runs the CLI")


def main(argv: list[str] | None = None, pm: Any = None) -> None:
    """Console-script entry point. A signal that lands outside a command's ErrorGuard (while
    plugins load, or while click parses or aborts) still exits 130/143, not 1 or a traceback.
    Every temporary file of the command lives in one folder, removed when it ends. ``pm``: a
    plugin manager to use instead of the installed plugins (for an embedding application)."""
    try:
        with sigterm_stops_like_ctrl_c(), scratch_scope():
            app = build_app(pm)
            app(args=argv if argv is not None else sys.argv[1:], prog_name="qpipe")
    except SystemExit as exc:  # click turns KeyboardInterrupt into "Aborted!" and exit 1
        interrupt = getattr(exc.__context__, "__cause__", None)
        if not isinstance(interrupt, KeyboardInterrupt):
            raise
        raise SystemExit(interrupt_message(interrupt)[1]) from None
    except KeyboardInterrupt as exc:
        message, code = interrupt_message(exc)
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(code) from None


def entry() -> None:
    """The ``qpipe`` console script: ``main``; and a signal that lands once the command is done,
    while the interpreter shuts down (where Python would print it as ignored and exit 0),
    still exits 130/143."""
    late: list[int] = []

    def exit_for_late_signal() -> None:
        if late:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + late[0])

    atexit.register(exit_for_late_signal)  # registered first, so it runs after every other
    try:
        main()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda sig, frame: late.append(sig))


if __name__ == "__main__":  # pragma: no cover
    entry()
