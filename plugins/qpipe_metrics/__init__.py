"""Built-in plugin: the evaluators ``accuracy``, ``regression``, ``fidelity``, ``size``, ``latency``."""

from __future__ import annotations

import datetime as _dt
import gzip
import time

import numpy as np
from pydantic import Field, field_validator

import qpipe
from qpipe import EvalContext, Evaluator, QpipeError, clamp_threads


def _flat(outputs: np.ndarray) -> np.ndarray:
    arr = np.asarray(outputs, dtype=np.float64)
    return arr.reshape(len(arr), -1)


def _integer(outputs: np.ndarray | None) -> bool:
    """Whether the outputs are integers (ids, an argmax), not scores to dequantize."""
    return outputs is not None and np.asarray(outputs).dtype.kind in "biu"


def integer_fidelity(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Integer outputs against the baseline's: ``exact_match``, the share of samples whose ids
    all equal the baseline's (a float error between ids means nothing)."""
    a, b = np.asarray(ours).reshape(len(ours), -1), np.asarray(theirs).reshape(len(theirs), -1)
    return {"exact_match": float(np.mean(np.all(a == b, axis=1)))}


class AccuracyOptions(qpipe.Options):
    top_k: list[int] = Field(default_factory=list, description="also report top-k accuracy for these k")

    @field_validator("top_k")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(k < 1 for k in values):
            raise ValueError("top_k values must be >= 1")
        return values


class Accuracy(Evaluator):
    """Top-1 (and optional top-k) classification accuracy against the labels.

    Also ``top<k>_accuracy`` for each k in ``top_k``. Refuses labels that are not class ids.
    """

    name = "accuracy"
    default_order = 10  # runs when a pipeline lists no evaluators
    needs_labels = True
    Options = AccuracyOptions
    metrics = ("accuracy",)
    headline = ("accuracy",)
    tasks = ("classification", "binary")

    @classmethod
    def declared_metrics(cls, options: AccuracyOptions | None = None) -> tuple[str, ...]:
        return cls.metrics + tuple(f"top{k}_accuracy" for k in (options.top_k if options else []))

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        scores = _flat(ctx.outputs)
        if _integer(ctx.outputs) and scores.shape[1] == 1:  # the model outputs class ids (an argmax)
            ids = ctx.outputs.reshape(len(scores))
            return {"accuracy": float(np.mean(ids == ctx.data.class_labels()))}
        labels = ctx.data.class_labels(classes=scores.shape[1])
        if scores.shape[1] == 1:  # a single sigmoid unit: binary classifier
            predicted = (scores[:, 0] >= 0.5).astype(np.int64)
        else:
            predicted = scores.argmax(axis=1)
        metrics = {"accuracy": float(np.mean(predicted == labels))}
        for k in self.options.top_k:
            top = np.argsort(-scores, axis=1)[:, :k]
            metrics[f"top{k}_accuracy"] = float(np.mean((top == labels[:, None]).any(axis=1)))
        return metrics


class Regression(Evaluator):
    """Mean absolute error and root-mean-square error against the labels."""

    name = "regression"
    default_order = 20  # runs when a pipeline lists no evaluators
    needs_labels = True
    metrics = ("mae", "rmse")
    headline = ("mae", "rmse")
    lower_is_better = ("mae", "rmse")
    tasks = ("regression",)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        predicted = _flat(ctx.outputs)
        target = np.asarray(ctx.data.labels, dtype=np.float64)
        if target.size != predicted.size:
            raise QpipeError(f"regression: {target.size // max(len(target), 1)} target value(s) per sample but "
                             f"the model outputs {predicted.shape[1]}; check data.evaluation.labels")
        target = target.reshape(predicted.shape)
        error = predicted - target
        return {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error ** 2)))}


class Fidelity(Evaluator):
    """Agreement with the baseline's outputs: abs. and relative error, R²; cosine and top-1 for vectors.

    ``relative_error`` is the mean absolute difference over the baseline outputs' mean
    absolute deviation and ``r2`` is 1 - SS(difference) / SS(baseline about its mean): both
    0 / 1 for a perfect copy, about 1 / 0 for an output stuck at the baseline's mean.
    ``cosine_similarity`` and ``top1_agreement`` only for outputs of more than one value.
    Integer outputs (ids, an argmax) are compared as integers: ``exact_match`` only.
    """

    name = "fidelity"
    default_order = 30  # runs when a pipeline lists no evaluators
    metrics = ("max_abs_error", "mean_abs_error", "relative_error", "r2", "cosine_similarity", "top1_agreement",
               "exact_match")

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        if ctx.baseline_outputs is None:
            return {}
        ours, theirs = _flat(ctx.outputs), _flat(ctx.baseline_outputs)
        if ours.shape != theirs.shape:
            raise QpipeError(f"fidelity: output shape {ours.shape} differs from the baseline's {theirs.shape}")
        if _integer(ctx.outputs) and _integer(ctx.baseline_outputs):
            return integer_fidelity(ctx.outputs, ctx.baseline_outputs)
        error = np.abs(ours - theirs)
        metrics = {"max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}
        spread = np.abs(theirs - theirs.mean(axis=0))
        if spread.mean() > 0:  # a constant baseline gives nothing to be relative to
            metrics["relative_error"] = float(error.mean() / spread.mean())
            metrics["r2"] = float(1.0 - np.sum(error ** 2) / np.sum(spread ** 2))
        if ours.shape[1] > 1:  # cosine of one number is its sign: only vectors
            norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
            cosine = np.sum(ours * theirs, axis=1) / np.where(norms == 0, 1, norms)
            metrics["cosine_similarity"] = float(cosine.mean())
            metrics["top1_agreement"] = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
        return metrics


def gzip_size(path) -> int:
    """Bytes of the file after gzip -9 (how well it compresses for download)."""
    with open(path, "rb") as fh:
        return len(gzip.compress(fh.read(), compresslevel=9, mtime=0))


class Size(Evaluator):
    """Bytes on disk, gzip bytes, and the baseline's size divided by this variant's."""

    name = "size"
    default_order = 40  # runs when a pipeline lists no evaluators
    metrics = ("size_bytes", "size_gzip_bytes", "size_ratio")
    headline = ("size_bytes", "size_ratio")
    lower_is_better = ("size_bytes", "size_gzip_bytes")
    role = "cost"

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        size = ctx.artifact.size_bytes()
        metrics = {"size_bytes": float(size)}
        if ctx.artifact.path.is_file():
            metrics["size_gzip_bytes"] = float(gzip_size(ctx.artifact.path))
        if ctx.baseline_artifact is not None and size:
            metrics["size_ratio"] = ctx.baseline_artifact.size_bytes() / size
        return metrics


class LatencyOptions(qpipe.Options):
    batch_size: int = Field(1, ge=1, description="samples per timed invoke")
    warmup: int = Field(5, ge=0, description="untimed invokes first")
    runs: int = Field(50, ge=1, description="timed invokes in all, split over the rounds")
    rounds: int = Field(5, ge=1, description="rounds of timed invokes; p50 is the median of the rounds' medians")
    max_spread: float = Field(0.5, gt=0, description="flag latency_noisy when the spread (IQR / median of "
                                                     "the timed invokes) exceeds this: too noisy to rank by")
    threads: int | None = Field(None, ge=1, description="threads (default: the backend's)")

    @field_validator("threads")
    @classmethod
    def _at_most_cpus(cls, value: int | None) -> int | None:
        return None if value is None else clamp_threads(value, "evaluator latency")


class Latency(Evaluator):
    """Wall time per invoke in rounds, in ms: p50 (median of the round medians), p95, and the spread.

    Per batch and per sample; ``latency_spread`` is the timed invokes' IQR over their median.

    Timing measures the machine as much as the model: it is re-measured when the variant is
    restored from the cache (``remeasure``), and a spread over ``max_spread`` is flagged
    (``latency_noisy`` 1.0, ``metadata.latency.noisy``).
    """

    name = "latency"
    default_order = 60  # runs when a pipeline lists no evaluators
    Options = LatencyOptions
    metrics = ("latency_ms_p50", "latency_ms_p95", "latency_ms_per_sample_p50", "latency_ms_per_sample_p95",
               "latency_spread", "latency_noisy")
    headline = ("latency_ms_p50",)
    lower_is_better = metrics
    role = "cost"
    #: the host runs it again on a cache hit instead of replaying the stored numbers
    remeasure = True

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        opts = self.options
        runner = ctx.runner if opts.threads is None else ctx.runner.with_threads(opts.threads)
        batch = next(ctx.data.batches(opts.batch_size))
        for _ in range(opts.warmup):
            runner.predict_batch(batch)
        rounds = min(opts.rounds, opts.runs)
        medians, times = [], []
        for r in range(rounds):
            timed = []
            for _ in range(opts.runs // rounds + (r < opts.runs % rounds)):
                start = time.perf_counter()
                runner.predict_batch(batch)
                timed.append((time.perf_counter() - start) * 1000.0)
            medians.append(float(np.median(timed)))
            times += timed
            time.sleep(0)  # let other work run between rounds, so a burst of load hits one round
        n = len(next(iter(batch.values())))
        p50 = float(np.median(medians))
        p25, p75, p95 = np.percentile(times, [25, 75, 95])
        spread = float((p75 - p25) / p50) if p50 > 0 else 0.0
        noisy = spread > opts.max_spread
        ctx.record("latency", {"measured": _dt.datetime.now().isoformat(timespec="seconds"),
                               "rounds": rounds, "runs": len(times), "spread": round(spread, 4),
                               "noisy": noisy, "max_spread": opts.max_spread})
        return {"latency_ms_p50": p50, "latency_ms_p95": float(p95), "latency_ms_per_sample_p50": p50 / n,
                "latency_ms_per_sample_p95": float(p95 / n), "latency_spread": spread,
                "latency_noisy": float(noisy)}


@qpipe.hookimpl
def qpipe_register_evaluators(register) -> None:
    for evaluator in (Accuracy, Regression, Fidelity, Size, Latency):
        register(evaluator)
