"""Constraints, the objective, and picking the variant to ship (and the CI gate).

A constraint is a string ``"<metric> <op> <number>"`` (``accuracy_delta >= -0.01``); the
objective is ``{maximize: METRIC}`` or ``{minimize: METRIC}``. The selected variant is the
best one, by the objective, among the variants that finished and meet every constraint. The
baseline is the reference the others are measured against, not a candidate, unless the
pipeline says ``select: {allow_baseline: true}``.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
}
_PATTERN = re.compile(r"^\s*([A-Za-z_][\w./-]*)\s*(>=|<=|==|>|<)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Constraint:
    """``metric op value``, e.g. ``accuracy_delta >= -0.01``."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        match = _PATTERN.match(str(text))
        if not match:
            raise ValueError(f"constraint {text!r} must look like 'METRIC >= NUMBER' "
                             f"(operators: {', '.join(OPERATORS)})")
        return cls(match.group(1), match.group(2), float(match.group(3)))

    def names(self, metrics: dict[str, float]) -> list[str]:
        """The metrics this constraint checks: its own, else its per-output forms
        (``species/accuracy_delta`` for ``accuracy_delta``)."""
        return [self.metric] if self.metric in metrics else per_output(self.metric, metrics) or [self.metric]

    def measured(self, metrics: dict[str, float]) -> dict[str, float | None]:
        """``{metric: value or None}`` for every metric this constraint checks."""
        return {name: metrics.get(name) for name in self.names(metrics)}

    def check(self, metrics: dict[str, float]) -> str | None:
        """None when met, else why not. A metric measured per output (``species/accuracy_delta``)
        and named without one must hold for every output that measures it."""
        for name in self.names(metrics):
            value = metrics.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return f"{name} was not measured"
            if not OPERATORS[self.op](value, self.value):
                return f"{name} = {value:.6g}, needs {self.op} {self.value:g}"
        return None

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def per_output(metric: str, metrics: dict[str, float]) -> list[str]:
    """The per-output forms of ``metric`` in ``metrics`` (``species/accuracy`` for ``accuracy``)."""
    return [name for name in metrics if name.endswith("/" + metric)]


def unmet(constraints: list[Constraint], metrics: dict[str, float]) -> list[str]:
    """Reasons the metrics miss the constraints (empty when all hold)."""
    return [reason for c in constraints if (reason := c.check(metrics)) is not None]


def implied(headline: list[dict[str, str]], constraints: list[Constraint], reference: dict[str, float],
            outputs: list[str], tolerance: float) -> list[Constraint]:
    """Constraints that keep the labelled ``outputs`` of a multi-output model no constraint names
    from getting worse: each one's headline quality metrics may lose at most ``tolerance`` of
    the baseline's value (``reference``, its raw metrics), so a variant that keeps one head
    and wrecks another is not selected."""
    named = {c.metric.removesuffix("_delta") for c in constraints}
    out = []
    for h in headline:
        output, metric = h.get("output"), h["metric"]
        base = metric.split("/", 1)[-1]
        if h["role"] != "quality" or output not in outputs or metric not in reference:
            continue
        if any(n == metric or n == base or n.startswith(output + "/") for n in named):
            continue
        slack = round(tolerance * abs(reference[metric]), 10)
        out.append(Constraint(metric + "_delta", "<=", slack) if h["better"] == "lower"
                   else Constraint(metric + "_delta", ">=", -slack))
    return out


def objective_value(metrics: dict[str, float], metric: str, direction: str) -> float | None:
    """The objective's value; a metric measured per output and named without one: its worst output's."""
    if metric in metrics:
        return metrics[metric]
    values = [metrics[name] for name in per_output(metric, metrics)]
    if not values:
        return None
    return min(values) if direction == "maximize" else max(values)


def select(variants: list[Any], constraints: list[Constraint], objective: tuple[str, str] | None,
           baseline: str | None = None) -> dict[str, Any]:
    """Choose among VariantResults; returns the ``selected`` record for results.json.

    ``objective`` is ``("maximize" | "minimize", metric)``; without one, the smallest
    variant (by ``size_bytes``) that meets the constraints wins. ``baseline``, if given, is
    the reference and cannot be selected; nor can a simulated variant (``metadata.simulated``).
    """
    direction, metric = objective or ("minimize", "size_bytes")
    rejected: dict[str, str] = {}
    eligible = []
    for v in variants:
        reasons = [f"failed: {v.error}"] if v.status != "ok" else unmet(constraints, v.metrics)
        if v.status == "ok" and objective_value(v.metrics, metric, direction) is None:
            reasons.append(f"objective metric {metric} was not measured")
        if v.metadata.get("simulated"):  # e.g. keras.bfloat16: measures a number format, ships nothing
            reasons.insert(0, "simulated, not a deployable artifact")
        if v.name == baseline:  # its own misses are still worth knowing
            reasons.insert(0, "the baseline is the reference (select.allow_baseline: true lets it ship)")
        if reasons:
            rejected[v.name] = "; ".join(reasons)
        else:
            eligible.append(v)
    record: dict[str, Any] = {
        "objective": f"{direction} {metric}",
        "constraints": [str(c) for c in constraints],
        "rejected": rejected,
        "variant": None,
    }
    kind = "quantized variant" if baseline is not None else "variant"
    if not eligible:
        record["reason"] = f"no {kind} meets the constraints" if constraints else f"no {kind} finished"
        return record
    value = {v.name: float(objective_value(v.metrics, metric, direction) or 0.0) for v in eligible}
    best = (max if direction == "maximize" else min)(eligible, key=lambda v: value[v.name])
    met = f" and meets {', '.join(str(c) for c in constraints)}" if constraints else ""
    record.update(variant=best.name, value=value[best.name],
                  reason=f"{direction}s {metric} ({value[best.name]:.6g}) among "
                         f"{len(eligible)} eligible {kind}(s){met}")
    return record
