"""Built-in plugin: the ``sample`` calibrator picks representative samples and estimates ranges.

Sample selection (``method``): ``first`` N rows, ``random`` N rows drawn with a seed,
``stratified`` N rows spread evenly over the label classes, ``diverse`` N rows chosen by
k-center greedy on the model's penultimate features.

Range estimation (``estimator``, optional): ``minmax``, ``percentile``, ``mse`` or
``entropy`` (see ``qpipe_calibration.estimators``). Without an estimator the quantizer
calibrates by itself (the TFLite converter takes min/max over the samples). With one, the
float model is run on the samples once per (model, samples) and every activation's range is
estimated from what was seen; variants with other estimators reuse those statistics.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

import qpipe
from qpipe import Calibration, CalibrateContext, Calibrator, Dataset, QpipeError

from qpipe_calibration.estimators import EstimatorOptions, TensorStats, estimate, parse_estimator
from qpipe_calibration.selection import first_indices, kcenter_indices, random_indices, stratified_indices


class SampleOptions(qpipe.Options):
    count: int = Field(200, description="number of representative samples")
    method: Literal["first", "random", "stratified", "diverse"] = Field(
        "random", description="how rows are picked")
    seed: int = Field(0, description="random seed for 'random', 'stratified' and 'diverse'")
    estimator: EstimatorOptions | None = Field(
        None, description="activation range estimator: minmax, percentile, mse or entropy, as a name "
                          "or {name: ..., options}; none lets the quantizer take min/max itself")

    @field_validator("count")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"count must be at least 1 (got {value}); it is the number of samples to pick")
        return value

    @field_validator("estimator", mode="before")
    @classmethod
    def _estimator(cls, value: Any) -> Any:
        return parse_estimator(value)


class Sample(Calibrator):
    """Representative samples (first, random, stratified, diverse) and optional range estimation."""

    name = "sample"
    Options = SampleOptions

    def calibrate(self, ctx: CalibrateContext) -> Calibration:
        data = ctx.data
        if data is None or len(data) == 0:
            raise QpipeError("calibrator sample: data.calibration is empty")
        indices = self.select(ctx)
        samples = data.take(indices)
        o = self.options
        metadata: dict[str, Any] = {"method": o.method, "count": int(len(indices)), "seed": o.seed,
                                    "indices": indices.tolist()}
        if o.estimator is None:
            return Calibration(samples=samples, metadata=metadata)

        stats, info = self.statistics(ctx, samples)
        estimator = o.estimator
        cache: dict[int, dict[str, tuple[float, float]]] = {}

        def ranges_for(bits: int) -> dict[str, tuple[float, float]]:
            if bits not in cache:
                cache[bits] = {name: estimate(s, estimator, bits) for name, s in stats.items()}
            return cache[bits]

        started = time.perf_counter()
        ranges = ranges_for(8)
        metadata["estimator"] = estimator.model_dump(mode="json")
        metadata["statistics"] = {**info, "estimate_seconds": round(time.perf_counter() - started, 3)}
        return Calibration(samples=samples, ranges=ranges, metadata=metadata, estimate=ranges_for)

    # ------------------------------------------------------------------ selection
    def select(self, ctx: CalibrateContext) -> np.ndarray:
        """Row indices of data.calibration, sorted."""
        data, o = ctx.data, self.options
        n = len(data)
        if o.count > n:
            raise QpipeError(f"calibrator sample: count {o.count} is more than the {n} rows of "
                             f"data.calibration; lower count to at most {n}")
        rng = np.random.default_rng(o.seed)
        if o.method == "first":
            return first_indices(n, o.count)
        if o.method == "random":
            return random_indices(n, o.count, rng)
        if o.method == "stratified":
            labels = data.class_labels()
            if labels is None:
                raise QpipeError("calibrator sample: method 'stratified' needs labels; add 'labels:' "
                                 "to data.calibration or use method 'random' or 'diverse'")
            return stratified_indices(labels, o.count, rng)
        ctx.report("calibrating: reading penultimate features")
        return kcenter_indices(self.features(ctx), o.count, rng)

    def features(self, ctx: CalibrateContext) -> np.ndarray:
        """Penultimate features of every calibration row (once per run and dataset)."""
        from qpipe.conversion import float_tflite
        from qpipe_calibration.activations import Probe, penultimate_features

        key = f"qpipe_calibration.features:{fingerprint(ctx.data)}"
        return ctx.model.memo(key, lambda: penultimate_features(Probe(float_tflite(ctx.model)), ctx.data))

    # ------------------------------------------------------------------ statistics
    def statistics(self, ctx: CalibrateContext, samples: Dataset) -> tuple[dict[str, TensorStats], dict]:
        """Activation statistics of the float model on ``samples``, computed once per run.

        Keyed by the samples' content, so every estimator over the same selection shares them.
        Returns the statistics and facts about them (``reused`` is True on a cache hit).
        """
        from qpipe.conversion import float_tflite
        from qpipe_calibration.activations import Probe, collect_statistics

        key = f"qpipe_calibration.statistics:{fingerprint(samples)}"
        computed: list[bool] = []

        def compute() -> tuple[dict[str, TensorStats], float]:
            computed.append(True)
            ctx.report("calibrating: running the float model to read activations")
            started = time.perf_counter()
            stats = collect_statistics(Probe(float_tflite(ctx.model)), samples, seed=self.options.seed)
            if not stats:
                raise QpipeError("calibrator sample: the float model has no float activation tensors "
                                 "to estimate ranges for")
            return stats, round(time.perf_counter() - started, 3)

        stats, seconds = ctx.model.memo(key, compute)
        return stats, {"key": key.rsplit(":", 1)[1][:12], "tensors": len(stats), "seconds": seconds,
                       "reused": not computed}


def fingerprint(data: Dataset) -> str:
    """Content hash of a dataset's inputs (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(data.inputs):
        array = np.ascontiguousarray(data.inputs[name])
        digest.update(json.dumps([name, array.shape, str(array.dtype)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@qpipe.hookimpl
def qpipe_register_calibrators(register) -> None:
    register(Sample)
