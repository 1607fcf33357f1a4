"""Per-layer quantization sensitivity and float fallback, with TFLite's QuantizationDebugger.

The debugger runs the float and the int8 model side by side on calibration samples and
measures, for every quantized op, the error its int8 output carries. Ranking ops by that
error (RMSE over the output's quantization step) says which layers int8 hurts most; keeping
those in float (``denylisted_nodes``) is the float fallback.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from qpipe.tfenv import quiet, tensorflow


@dataclass
class LayerError:
    """One quantized op's error on the debug samples."""

    rank: int
    op: str
    tensor: str
    rmse_over_scale: float
    mean_squared_error: float
    max_abs_error: float


def layer_sensitivity(converter: Any, samples: Callable[[], Iterator[Any]]) -> list[LayerError]:
    """Rank the quantized ops of ``converter``'s int8 model by error, worst first.

    ``converter`` is a configured full-integer TFLiteConverter; ``samples`` yields
    representative inputs (as for ``representative_dataset``).
    """
    tf = tensorflow()
    with quiet():
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=samples)
        debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    layers = []
    for row in rows:
        mse = _number(row.get("mean_squared_error"))
        scale = _number(row.get("scale"))
        rmse_scale = math.sqrt(mse) / scale if scale > 0 else 0.0
        layers.append(LayerError(0, row["op_name"], row["tensor_name"], rmse_scale, mse,
                                 _number(row.get("max_abs_error"))))
    layers.sort(key=lambda layer: layer.rmse_over_scale, reverse=True)
    for i, layer in enumerate(layers, start=1):
        layer.rank = i
    return layers


def _number(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def convert_keeping_float(converter: Any, samples: Callable[[], Iterator[Any]], tensors: list[str]) -> bytes:
    """The int8 model with the ops producing ``tensors`` left in float."""
    tf = tensorflow()
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(tensors))
    with quiet():
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=samples, debug_options=options)
        return bytes(debugger.get_nondebug_quantized_model())


def write_report(layers: list[LayerError], folder: Path, stem: str) -> dict[str, Path]:
    """``<stem>.csv`` (the ranking) and ``<stem>.png`` (a bar chart) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"{stem}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LayerError.__dataclass_fields__))
        writer.writeheader()
        for layer in layers:
            writer.writerow(asdict(layer))
    png_path = folder / f"{stem}.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = layers[:20]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(shown) + 1.2))
    labels = [f"{layer.op} {_short(layer.tensor)}" for layer in shown][::-1]
    ax.barh(labels, [layer.rmse_over_scale for layer in shown][::-1], color="#c0392b")
    ax.set_xlabel("output RMSE / quantization step (higher = hurt more by int8)")
    ax.set_title("Per-layer int8 sensitivity")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return {"csv": csv_path, "png": png_path}


def _short(tensor: str, width: int = 48) -> str:
    first = tensor.split(";")[0]
    return first if len(first) <= width else "…" + first[-width:]
