"""Start QAT from calibrated activation ranges instead of TF-MOT's fixed [-6, 6].

TF-MOT's activation quantizers (``MovingAverageQuantizer``) start every range at [-6, 6] and
move it by an exponential moving average with decay 0.999, so after a few hundred steps a
range has moved only part of the way to the real one. Until then everything outside [-6, 6]
is clamped and gets no gradient: a regression model with targets in the hundreds predicts a
constant (tensorflow/tensorflow#44007), whatever the learning rate. Here each range is set
from the data before training: one pass in training mode over training samples, during
which the moving average is replaced by the running min/max (TF-MOT's own
``AllValuesQuantize``). Weights and batch-norm statistics touched by that pass are put back.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from qpipe import Dataset, QpipeError
from qpipe.tfenv import tensorflow

#: training samples the ranges are calibrated on
SAMPLES = 1024


@contextlib.contextmanager
def running_min_max() -> Iterator[None]:
    """While active, TF-MOT's moving-average activation ranges track the running min/max."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = getattr(quant_ops, "MovingAvgQuantize", None)
    if original is None or not hasattr(quant_ops, "AllValuesQuantize"):
        raise QpipeError("this TF-MOT has no MovingAvgQuantize/AllValuesQuantize; QAT ranges cannot be calibrated")

    def all_values(inputs: Any, min_var: Any, max_var: Any, per_channel: bool = False, *args: Any,
                   **kwargs: Any) -> Any:
        if per_channel:  # per-channel activation ranges: keep TF-MOT's own update
            return original(inputs, min_var, max_var, per_channel, *args, **kwargs)
        keep = {k: kwargs[k] for k in ("is_training", "num_bits", "narrow_range", "symmetric") if k in kwargs}
        return quant_ops.AllValuesQuantize(inputs, min_var, max_var, **keep)

    quant_ops.MovingAvgQuantize = all_values
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def _is_range(variable: Any) -> bool:
    return variable.name.rsplit("/", 1)[-1].split(":", 1)[0].endswith(("_min", "_max"))


def calibrate_ranges(qat_model: Any, data: Dataset, batch_size: int) -> dict[str, int]:
    """Set every quantization range of ``qat_model`` from up to ``SAMPLES`` rows of ``data``;
    return how many ranges were set, from how many samples (for the record)."""
    tf = tensorflow()
    ranges = [v for v in qat_model.variables if _is_range(v)]
    if not ranges:
        return {}
    others = [v for v in qat_model.variables if not _is_range(v)]
    saved = [v.numpy() for v in others]
    for variable in ranges:
        variable.assign(tf.zeros_like(variable))  # the ranges grow from 0, which they must contain
    sample = data.take(range(min(SAMPLES, len(data))))
    try:
        with running_min_max():
            for batch in sample.batches(batch_size):
                qat_model(next(iter(batch.values())) if len(batch) == 1 else batch, training=True)
    finally:
        for variable, value in zip(others, saved, strict=False):
            variable.assign(value)
    return {"ranges": len(ranges) // 2, "samples": len(sample)}
