"""Greedy search over (layer, width) with measured per-layer costs.

Every layer starts at its widest offered width (float when float is a candidate, else int8;
depthwise convs, which ai-edge-quantizer quantizes only to int8, go no narrower). The search
then narrows one layer one step at a time, always the step that adds the least output error
per byte it saves, until no layer can go narrower. That ordered list of steps is the whole search space: a
size budget takes the shortest prefix whose predicted size fits; a constraint search starts
from the full list and undoes one step at a time (one layer up a width) until the measured
model meets the constraints. Predictions add the single-layer costs (bytes saved, accuracy
delta); the quantizer checks them against the real file.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpipe_litert.widths import FLOAT, WIDTHS, Cost, Layer, width_bits


@dataclass
class Step:
    """Narrow ``layer`` from ``before`` to ``after``."""

    layer: int
    before: str
    after: str
    error: float
    bytes_saved: int


class CostTable:
    """Measured costs by (layer, width), with the widths each layer may take."""

    def __init__(self, layers: list[Layer], costs: list[Cost], allow_float: bool):
        self.layers = layers
        self.costs = {(c.layer, c.width): c for c in costs}
        self.reasons: dict[int, str] = {}
        self.offered: dict[int, list[str]] = {}
        for layer in layers:
            runnable = sorted((c.width for c in costs if c.layer == layer.index and c.runs and c.width in WIDTHS),
                              key=width_bits)
            if not runnable:
                notes = "; ".join(sorted({c.note for c in costs if c.layer == layer.index and c.note}))
                self.reasons[layer.index] = f"no quantized width runs for this op ({notes or 'none measured'})"
            self.offered[layer.index] = runnable + ([FLOAT] if allow_float or not runnable else [])

    def cost(self, layer: int, width: str) -> tuple[float, int, float]:
        """(error, bytes saved, accuracy delta) of ``layer`` alone at ``width``; float costs nothing."""
        if width == FLOAT:
            return 0.0, 0, 0.0
        c = self.costs[(layer, width)]
        return c.error, c.bytes_saved, c.accuracy_delta or 0.0

    def start(self) -> dict[int, str]:
        """Every layer at its widest offered width: float when float is offered, else int8."""
        return {layer.index: self.offered[layer.index][-1] for layer in self.layers}

    def predict(self, assignment: dict[int, str], float_bytes: int) -> dict[str, float]:
        """Predicted file bytes and accuracy delta: single-layer costs added up."""
        parts = [self.cost(i, w) for i, w in assignment.items()]
        return {"size_bytes": float(float_bytes - sum(p[1] for p in parts)),
                "accuracy_delta": float(sum(p[2] for p in parts)),
                "error": float(sum(p[0] for p in parts))}


def greedy_steps(table: CostTable) -> tuple[dict[int, str], list[Step]]:
    """The start assignment and the narrowing steps, cheapest error per byte first."""
    start = table.start()
    current = dict(start)
    steps: list[Step] = []
    while True:
        best: tuple[float, Step] | None = None
        for layer in table.layers:
            offered = table.offered[layer.index]
            position = offered.index(current[layer.index])
            if position == 0:
                continue
            narrower = offered[position - 1]
            error_now, saved_now, _ = table.cost(layer.index, current[layer.index])
            error_next, saved_next, _ = table.cost(layer.index, narrower)
            gained = saved_next - saved_now
            if gained <= 0:
                continue
            score = max(error_next - error_now, 0.0) / gained
            if best is None or score < best[0]:
                best = (score, Step(layer.index, current[layer.index], narrower, error_next, gained))
        if best is None:
            return start, steps
        steps.append(best[1])
        current[best[1].layer] = best[1].after


def assignment_after(start: dict[int, str], steps: list[Step], count: int) -> dict[int, str]:
    """The assignment after the first ``count`` steps."""
    current = dict(start)
    for step in steps[:count]:
        current[step.layer] = step.after
    return current


def steps_for_size(table: CostTable, start: dict[int, str], steps: list[Step], float_bytes: int,
                   target: float) -> int:
    """The fewest steps whose predicted size is within ``target`` bytes (all steps if none)."""
    for count in range(len(steps) + 1):
        if table.predict(assignment_after(start, steps, count), float_bytes)["size_bytes"] <= target:
            return count
    return len(steps)


def bits_per_weight(layers: list[Layer], assignment: dict[int, str]) -> float:
    """Weight-count-weighted bits of an assignment (float weights count 32)."""
    total = sum(layer.weights for layer in layers)
    return sum(width_bits(assignment[layer.index]) * layer.weights for layer in layers) / total if total else 0.0
