"""``top_k``: the fraction of samples whose label is among the k highest-scoring classes."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

import qpipe
from qpipe import EvalContext, Evaluator, QpipeError


class TopKOptions(qpipe.Options):
    k: int = Field(3, ge=1, description="how many of the highest-scoring classes count as a hit")


class TopK(Evaluator):
    """Top-k accuracy of a classifier (integer labels, one score per class)."""

    name = "top_k"
    Options = TopKOptions
    metrics: ClassVar[tuple[str, ...]] = ("top3_accuracy",)
    headline: ClassVar[tuple[str, ...]] = ("top3_accuracy",)
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    @classmethod
    def declared_metrics(cls, options: TopKOptions) -> tuple[str, ...]:
        return (f"top{options.k}_accuracy",)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        if ctx.data is None or ctx.data.labels is None:
            raise QpipeError("top_k: data.evaluation has no labels; add 'labels:' to data.evaluation")
        scores = np.asarray(ctx.outputs).reshape(len(ctx.data), -1)
        labels = np.asarray(ctx.data.labels).reshape(-1).astype(np.int64)
        if scores.shape[1] < self.options.k:
            raise QpipeError(f"top_k: k={self.options.k} but the model scores only {scores.shape[1]} "
                             "classes; lower options.k")
        top = np.argsort(-scores, axis=1)[:, :self.options.k]
        hits = (top == labels[:, None]).any(axis=1)
        return {f"top{self.options.k}_accuracy": float(hits.mean())}
