"""Per-layer sensitivity at every weight width, measured with ai-edge-quantizer and LiteRT.

For each op that owns a weight tensor (conv, depthwise conv, fully connected, embedding
lookup) and each candidate width, only that op is quantized (dynamic range: int weights,
activations quantized by the kernel at run time), the file is run in LiteRT on a few
samples, and the cost is measured: the output error against the float model, the accuracy
delta (when the samples carry class labels) and the bytes it saves. A width is offered for
an op only when ai-edge-quantizer actually stores the op's weights at that width and LiteRT
runs the result to finite outputs; anything else is recorded with the reason.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qpipe import Dataset, QpipeError
from qpipe.conversion import calibrate_ai_edge_quantizer, relative_errors, tflite_outputs
from qpipe.tfenv import quiet

from qpipe_litert.inspect import WEIGHT_INPUTS, inspect_tflite

#: candidate weight widths, narrowest first (bits)
WIDTHS = {"int2": 2, "int4": 4, "int8": 8}
#: static int8 weights with int8 / int16 activations (calibrated): measured for ``qpipe analyze``;
#: they save no bytes over dynamic int8, so the size search does not take them
ACTIVATION_WIDTHS = {"w8a8": 8, "w8a16": 16}
FLOAT = "float"


@dataclass
class Layer:
    """One op owning a weight tensor, named by its first output tensor."""

    index: int
    op: str
    scope: str
    output: str
    weights: int

    @property
    def short(self) -> str:
        first = self.output.split(";")[0]
        return first if len(first) <= 48 else "…" + first[-48:]


@dataclass
class Cost:
    """What quantizing one layer alone to one width costs and saves."""

    layer: int
    op: str
    name: str
    width: str
    runs: bool
    error: float
    accuracy_delta: float | None
    bytes_saved: int
    note: str = ""
    #: {output: relative error}, for a model with several outputs (``error`` is their mean)
    output_errors: dict[str, float] = field(default_factory=dict)


def width_bits(width: str) -> int:
    """Stored weight bits of a width name (float: 32)."""
    return WIDTHS.get(width, 8 if width in ACTIVATION_WIDTHS else 32)


def layers_of(flatbuffer: bytes) -> list[Layer]:
    """The ops of ``flatbuffer`` that own a constant weight tensor, in graph order."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    by_output = {w.output: w for w in inspect_tflite(flatbuffer).weights}
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    graph = model.subgraphs[0]
    layers = []
    for op in graph.operators:
        name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
        if name not in WEIGHT_INPUTS or op.outputs is None or not len(op.outputs):
            continue
        output = graph.tensors[int(op.outputs[0])].name
        output = output.decode() if isinstance(output, bytes) else str(output)
        weight = by_output.get(output)
        if weight is None or weight.dtype != "FLOAT32":
            continue
        scope = tfl_flatbuffer_utils.get_op_scope(op, graph.tensors)
        layers.append(Layer(len(layers), name, scope, output, weight.count))
    return layers


class Unsupported(QpipeError):
    """ai-edge-quantizer's policy has no dynamic-range config for this op at this width."""


def recipe(layers: list[Layer], assignment: dict[int, str]) -> list[dict[str, Any]]:
    """An ai-edge-quantizer recipe with one exact-scope rule per quantized layer."""
    from ai_edge_quantizer import qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    for layer in layers:
        width = assignment.get(layer.index, FLOAT)
        regex, op = "^" + re.escape(layer.scope) + "$", qtyping.TFLOperationName(layer.op)
        try:
            if width in WIDTHS:
                manager.add_dynamic_config(regex=regex, operation_name=op, num_bits=WIDTHS[width])
            elif width in ACTIVATION_WIDTHS:
                manager.add_static_config(regex=regex, operation_name=op, weight_num_bits=8,
                                          activation_num_bits=ACTIVATION_WIDTHS[width])
        except ValueError as exc:
            raise Unsupported(f"ai-edge-quantizer has no {width} config for {layer.op}") from exc
    return manager.get_quantization_recipe()


def apply(flatbuffer: bytes, layers: list[Layer], assignment: dict[int, str],
          calibration: Dataset | None = None) -> bytes:
    """``flatbuffer`` with each layer's weights at its assigned width (static activation widths
    are calibrated on ``calibration``)."""
    from ai_edge_quantizer import quantizer

    rules = recipe(layers, assignment)
    if not rules:
        return flatbuffer
    engine = quantizer.Quantizer(bytearray(flatbuffer))
    engine.load_quantization_recipe(rules)
    static = any(w in ACTIVATION_WIDTHS for w in assignment.values())
    if static and calibration is None:
        raise QpipeError("static activation widths need calibration samples")
    try:
        with quiet():
            ranges = calibrate_ai_edge_quantizer(engine, flatbuffer, calibration) if static else None
            result = engine.quantize(ranges, enable_progress_bar=False, enable_progress_report=False)
            return bytes(result.quantized_model)
    except QpipeError:
        raise
    except Exception as exc:
        raise QpipeError(f"ai-edge-quantizer failed on a mixed recipe: {type(exc).__name__}: {exc}") from exc


def stored_bits(content: bytes, layers: list[Layer]) -> dict[int, int]:
    """The bits each layer's weight tensor is stored with in ``content``."""
    by_output = {w.output: w.bits for w in inspect_tflite(content).weights}
    return {layer.index: by_output.get(layer.output, 0) for layer in layers}


class Probe:
    """Runs candidate files in LiteRT on a few samples and scores them against the float model.

    The score weighs every output of the model, whatever the task: each output's squared
    difference from the float model's over that output's own spread (its variance about its
    mean over the samples), averaged over the outputs, so a softmax head and a regression head
    count alike. An accuracy delta is added only where the labels are class ids of an output
    of class scores (``class_output``).
    """

    def __init__(self, flatbuffer: bytes, data: Dataset, threads: int = 2, names: list[str] | None = None):
        """``names``: the model's output names, which keyed labels use (``ctx.model.outputs``)."""
        self.data, self.threads, self.names = data, threads, names
        self.reference = self.outputs(flatbuffer)
        self.labelled = class_output(self.reference, data.labels)
        self.float_accuracy = self.accuracy(self.reference)

    def outputs(self, content: bytes) -> dict[str, np.ndarray]:
        """Every output of ``content`` on the samples, by the model's output name (else signature's)."""
        with quiet():
            return {name: values.astype(np.float64) for name, values in
                    tflite_outputs(content, self.data, len(self.data), threads=self.threads, names=self.names).items()}

    def accuracy(self, outputs: dict[str, np.ndarray]) -> float | None:
        if self.labelled is None:
            return None
        name, labels = self.labelled
        return float((outputs[name].argmax(axis=1) == labels).mean())

    def errors(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """{output: squared difference from the float outputs over their variance}."""
        return relative_errors(self.reference, outputs, squared=True)

    def score(self, content: bytes) -> tuple[bool, float, float | None]:
        """(finite outputs, relative output MSE over every output, accuracy delta or None)."""
        runs, error, delta, _ = self.score_outputs(content)
        return runs, error, delta

    def score_outputs(self, content: bytes) -> tuple[bool, float, float | None, dict[str, float]]:
        """``score`` and the error of each output."""
        outputs = self.outputs(content)
        if not all(np.isfinite(values).all() for values in outputs.values()):
            return False, float("inf"), None, {}
        errors = self.errors(outputs)
        accuracy = self.accuracy(outputs)
        delta = None if accuracy is None or self.float_accuracy is None else accuracy - self.float_accuracy
        return True, float(np.mean(list(errors.values()))), delta, errors


def class_output(outputs: dict[str, np.ndarray], labels: Any) -> tuple[str, np.ndarray] | None:
    """(output name, class ids) when ``labels`` are class ids for an output of class scores:
    integer ids below its width, or one-hot rows of its width; None otherwise (regression
    targets, images, an output of one value). ``labels`` keyed by output name are matched by
    name; plain labels belong to the first output, as the host evaluates them."""
    if labels is None:
        return None
    pairs = ([(name, labels[name]) for name in outputs if name in labels] if isinstance(labels, dict)
             else [(next(iter(outputs)), labels)])
    for name, values in pairs:
        scores, y = outputs[name], np.asarray(values)
        if scores.ndim != 2 or scores.shape[1] < 2 or len(y) != len(scores) or y.dtype.kind not in "biuf":
            continue
        if y.ndim == 2 and y.shape[1] == scores.shape[1] and set(np.unique(y)) <= {0, 1} and (y.sum(1) == 1).all():
            y = y.argmax(axis=1)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim == 1 and np.isfinite(y).all() and (y == np.round(y)).all() and \
                y.min() >= 0 and y.max() < scores.shape[1]:
            return name, y.astype(np.int64)
    return None


def measure(flatbuffer: bytes, layers: list[Layer], probe: Probe, widths: list[str],
            report: Callable[[str], None] = lambda message: None) -> list[Cost]:
    """The cost of every (layer, width), each layer quantized alone."""
    costs = []
    for layer in layers:
        report(f"sensitivity: {layer.op} {layer.short}")
        for width in widths:
            try:
                content = apply(flatbuffer, layers, {layer.index: width}, probe.data)
            except Unsupported as exc:
                costs.append(Cost(layer.index, layer.op, layer.short, width, False, float("inf"), None, 0, str(exc)))
                continue
            stored = stored_bits(content, [layer])[layer.index]
            saved = len(flatbuffer) - len(content)
            if stored != width_bits(width):
                costs.append(Cost(layer.index, layer.op, layer.short, width, False, float("inf"), None, saved,
                                  f"ai-edge-quantizer stores {layer.op} weights as {stored}-bit, not {width}"))
                continue
            runs, error, delta, by_output = probe.score_outputs(content)
            costs.append(Cost(layer.index, layer.op, layer.short, width, runs, error, delta, saved,
                              "" if runs else "LiteRT gives non-finite outputs",
                              {k: round(v, 8) for k, v in by_output.items()} if len(by_output) > 1 else {}))
    return costs


def write_report(costs: list[Cost], folder: Path, stem: str) -> list[Path]:
    """``<stem>.csv`` (every layer and width) and ``<stem>.<width>.png`` (a chart per width)."""
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"{stem}.csv"
    fields = list(Cost.__dataclass_fields__)
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([fields, *([getattr(c, f) for f in fields] for c in costs)])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [csv_path]
    for width in sorted({c.width for c in costs}, key=width_bits):
        rows = [c for c in costs if c.width == width]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.4))
        labels = [f"{c.layer} {c.op} {c.name}" for c in rows][::-1]
        values = [c.error if c.runs else 0.0 for c in rows][::-1]
        colors = ["#c0392b" if c.runs else "#999999" for c in rows][::-1]
        ax.barh(labels, values, color=colors)
        ax.set_xscale("symlog", linthresh=1e-6)
        ax.set_xlabel("output MSE against float / output variance, mean over outputs (grey: not offered)")
        ax.set_title(f"Per-layer sensitivity, weights at {width} (one layer at a time)")
        fig.tight_layout()
        path = folder / f"{stem}.{width}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

