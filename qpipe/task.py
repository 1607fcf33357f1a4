"""What the model does: classification, binary classification or regression.

The task decides which evaluators mean something (accuracy for classifiers, MAE/RMSE for
regression) and which metrics the summary shows. It is read from ``task:`` in the pipeline,
or inferred from the model's output shape and the evaluation labels. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qpipe.errors import DataError

TASKS = ("classification", "binary", "regression")


@dataclass(frozen=True)
class Task:
    """The task's name (``None`` when it cannot be known) and how it was decided."""

    name: str | None
    source: str  # "pipeline" | "inferred"
    reason: str

    def describe(self) -> str:
        """"regression (inferred: non-integer labels)"."""
        how = self.reason if self.source == "pipeline" else f"inferred: {self.reason}"
        return f"{self.name} ({how})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "reason": self.reason}


def output_width(shape: tuple[int | None, ...] | None) -> int | None:
    """Values per sample of an output of ``shape`` (batch first); None if a dimension is free."""
    if not shape:
        return None
    dims = shape[1:]
    if any(d is None for d in dims):
        return None
    return int(math.prod(d for d in dims if d is not None)) if dims else 1


def infer_task(width: int | None, labels: Any) -> Task:
    """The task of a model with ``width`` outputs per sample, judged from its ``labels``.

    Integer labels below ``width`` or one-hot rows: classification; a single output with
    0/1 labels: binary; non-integer labels, several targets per sample, or a single output
    with integer labels beyond 0/1: regression. Without labels only a multi-value output
    can be judged: it is unknown (no label-based evaluator runs anyway).
    """
    if labels is None:
        return Task(None, "inferred", "no labels in data.evaluation")
    y = np.asarray(labels)
    if y.dtype.kind not in "biuf":
        raise DataError(f"data.evaluation: labels of dtype {y.dtype} are neither class ids nor targets")
    y = y.reshape(len(y), -1)
    integral = bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))
    cols = y.shape[1]
    if cols > 1:
        if integral and set(np.unique(y)) <= {0, 1} and bool(np.all(y.sum(axis=1) == 1)):
            return Task("classification", "inferred", f"one-hot labels over {cols} classes")
        return Task("regression", "inferred", f"{cols} target values per sample")
    if not integral:
        return Task("regression", "inferred", "non-integer labels")
    low, high = int(y.min()), int(y.max())
    if width == 1:
        if low >= 0 and high <= 1:
            return Task("binary", "inferred", "one output and 0/1 labels")
        return Task("regression", "inferred", f"one output and integer targets from {low} to {high}")
    if width is not None and (low < 0 or high >= width):
        first = int(np.argmax((y.reshape(-1) < 0) | (y.reshape(-1) >= width)))
        raise DataError(f"cannot tell the task: data.evaluation labels have {y.reshape(-1)[first]:g} at index "
                        f"{first}, outside [0, {width}) for a model with {width} outputs (integer labels from "
                        f"{low} to {high}); check the labels, or set 'task:' in the pipeline")
    return Task("classification", "inferred", f"integer labels over {width or high + 1} outputs")


def decide_task(declared: str | None, width: int | None, labels: Any) -> Task:
    """``task:`` from the pipeline when given, else the inferred task."""
    if declared is not None:
        return Task(declared, "pipeline", "set by 'task:' in the pipeline")
    return infer_task(width, labels)


def decide_tasks(declared: str | dict[str, str] | None, outputs: list[Any], labels: Any) -> dict[str, Task]:
    """The task of each output of a multi-output model (``outputs``: its ``TensorInfo``s), from
    ``task:`` (one task for all, or a mapping by output name) or inferred from that output's
    labels (``labels``: ``{output name: array}``). An output without labels has no task."""
    names = [t.name for t in outputs]
    if isinstance(declared, dict):
        unknown = [name for name in declared if name not in names]
        if unknown:
            raise DataError(f"task: no model output '{unknown[0]}'; the model's outputs are: {', '.join(names)}")
    by_output = labels if isinstance(labels, dict) else {}
    tasks = {}
    for info in outputs:
        given = declared.get(info.name) if isinstance(declared, dict) else declared
        if given is not None:
            tasks[info.name] = Task(given, "pipeline", "set by 'task:' in the pipeline")
            continue
        try:
            tasks[info.name] = infer_task(output_width(info.shape), by_output.get(info.name))
        except DataError as exc:
            raise DataError(f"output '{info.name}': {exc}") from None
        if info.name not in by_output:
            tasks[info.name] = Task(None, "inferred", "no labels for this output in data.evaluation")
    return tasks
