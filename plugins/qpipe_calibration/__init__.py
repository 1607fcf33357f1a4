"""Built-in plugin: the ``sample`` calibrator picks representative samples.

``method: first`` takes the first N rows, ``random`` N rows drawn with a seed,
``stratified`` N rows spread evenly over the label classes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

import qpipe
from qpipe import Calibration, CalibrateContext, Calibrator, QpipeError


class SampleOptions(qpipe.Options):
    count: int = Field(200, ge=1, description="number of representative samples")
    method: Literal["first", "random", "stratified"] = Field("random", description="how rows are picked")
    seed: int = Field(0, description="random seed for 'random' and 'stratified'")


def stratified_indices(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` row indices spread as evenly as possible over the classes in ``labels``."""
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    picked: list[int] = []
    depth = 0
    while len(picked) < count:
        for c in classes:
            if depth < len(pools[c]) and len(picked) < count:
                picked.append(int(pools[c][depth]))
        depth += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


class Sample(Calibrator):
    """Representative samples from data.calibration: first N, random N, or stratified by label."""

    name = "sample"
    Options = SampleOptions

    def calibrate(self, ctx: CalibrateContext) -> Calibration:
        data = ctx.data
        n = len(data)
        count = self.options.count
        if count > n:
            raise QpipeError(f"calibrator sample: count {count} is more than the {n} rows of "
                             f"data.calibration; lower count to at most {n}")
        rng = np.random.default_rng(self.options.seed)
        if self.options.method == "first":
            indices = np.arange(count)
        elif self.options.method == "random":
            indices = np.sort(rng.choice(n, size=count, replace=False))
        else:
            labels = data.class_labels()
            if labels is None:
                raise QpipeError("calibrator sample: method 'stratified' needs labels; add 'labels:' "
                                 "to data.calibration or use method 'random'")
            indices = stratified_indices(labels, count, rng)
        return Calibration(samples=data.take(indices), metadata={"indices": indices.tolist()})


@qpipe.hookimpl
def qpipe_register_calibrators(register) -> None:
    register(Sample)
