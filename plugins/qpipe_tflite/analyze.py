"""``qpipe analyze PIPELINE --variant V``: which layers does int8 hurt most?

Loads the pipeline's model and calibration data, sets up the variant's converter exactly as
``qpipe run`` would, and ranks its quantized ops with the QuantizationDebugger. Prints the
ranking and writes it as CSV and a PNG chart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from qpipe import QpipeError


def analyze_variant(pm: Any, pipeline: Path, variant: str, output: Path | None) -> tuple[list, dict]:
    """Rank the layers of ``variant`` by int8 error; returns (layers, written files)."""
    from qpipe import CalibrateContext, QuantizeContext
    from qpipe.commands import Registry, load_config, load_inputs, resolve
    from qpipe.commands import new_timestamp as timestamp

    from qpipe.tflite import representative_dataset
    from qpipe_tflite.sensitivity import layer_sensitivity, write_report

    resolved = resolve(load_config(pipeline), Registry.from_plugins(pm), only=[variant])
    chosen = next((rv for rv in resolved.variants if rv.config.name == variant), None)
    quantizer = chosen.quantizer.component if chosen else None
    by_width = getattr(quantizer, "sensitivity_by_width", None)  # e.g. litert.mixed: every width
    if chosen is None or not (by_width or getattr(quantizer, "supports_sensitivity", False)):
        raise QpipeError(f"variant '{variant}' ({chosen.config.quantizer if chosen else '?'}) is not a "
                         "full-integer int8 converter variant; analyze works on tflite.int8 (and litert.mixed) variants")
    inputs = load_inputs(pm, resolved)
    folder = output or resolved.loaded.base_dir / "runs" / f"{resolved.config.name}-analyze-{variant}-{timestamp()}"
    folder.mkdir(parents=True, exist_ok=True)
    calibration = chosen.calibrator.component.calibrate(
        CalibrateContext(variant=variant, work_dir=folder, model=inputs.model, data=inputs.calibration))
    ctx = QuantizeContext(variant=variant, work_dir=folder, model=inputs.model, calibration=calibration)
    if by_width:
        rows, written = by_width(ctx)
        return rows, {"csv": written[0], "png": ", ".join(str(p) for p in written[1:])}
    layers = layer_sensitivity(quantizer.make_converter(ctx), lambda: representative_dataset(calibration))
    files = write_report(layers, folder, f"{variant}.sensitivity")
    return layers, files


def register_command(app: typer.Typer) -> None:
    """Add ``analyze`` to the qpipe command line."""

    @app.command()
    def analyze(
        pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
        variant: str = typer.Option(..., "--variant", "-v", help="A tflite.int8 variant of the pipeline."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the CSV and chart."),
        top: int = typer.Option(10, "--top", help="Rows to print."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Rank VARIANT's layers by the error int8 quantization adds (most sensitive first)."""
        from rich.console import Console
        from rich.table import Table

        from qpipe.commands import ErrorGuard, get_plugin_manager
        from qpipe.tfenv import prepare_environment

        prepare_environment()
        with ErrorGuard(debug):
            layers, files = analyze_variant(get_plugin_manager(), pipeline, variant, output)
            if layers and isinstance(layers[0], dict):
                _print_widths(layers, files)
                return
            table = Table(title=f"int8 sensitivity of {variant} (worst first)")
            for column in ("rank", "op", "tensor", "RMSE/step", "max abs error"):
                table.add_column(column, justify="right" if column in ("rank", "RMSE/step", "max abs error") else "left")
            for layer in layers[:top]:
                table.add_row(str(layer.rank), layer.op, layer.tensor.split(";")[0],
                              f"{layer.rmse_over_scale:.3f}", f"{layer.max_abs_error:.4g}")
            console = Console(width=140) if not Console().is_terminal else Console()
            console.print(table)
            console.print(f"wrote {files['csv']} and {files['png']}", highlight=False)


def _print_widths(rows: list[dict], files: dict) -> None:
    """Print per-layer, per-width costs (``sensitivity_by_width`` rows)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per-layer sensitivity by weight width (each layer quantized alone)")
    for column in ("layer", "op", "width", "runs", "output error (worst output)", "Δ accuracy", "bytes saved", "note"):
        table.add_column(column)
    for r in rows:
        delta, by_output = r["accuracy_delta"], r.get("output_errors") or {}
        worst = max(by_output, key=by_output.get) if by_output else None  # several outputs: the most moved
        error = f"{r['error']:.3g}" + (f" ({worst}: {by_output[worst]:.3g})" if worst else "")
        table.add_row(str(r["layer"]), r["op"], r["width"], "yes" if r["runs"] else "no",
                      error, "" if delta is None else f"{100 * delta:+.2f} pt",
                      str(r["bytes_saved"]), r["note"])
    console = Console(width=160) if not Console().is_terminal else Console()
    console.print(table)
    console.print(f"wrote {files['csv']} and {files['png']}", highlight=False)
