"""Range estimators: one activation tensor's statistics -> the ``(min, max)`` to quantize it with.

``minmax`` keeps the observed range (what the TFLite converter does), ``percentile`` clips
to the given percentiles, ``mse`` picks the clipping range that minimizes the quantization
error on the observed values, ``entropy`` picks the threshold whose quantized histogram is
closest (KL divergence) to the observed one, as TensorRT's entropy calibrator does.

Estimators are pure numpy: they see ``TensorStats`` and the number of activation bits of
the quantizer that asks (8 for int8, 16 for int16x8, which is symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union

import numpy as np
from pydantic import Field, field_validator

import qpipe


@dataclass
class TensorStats:
    """What was seen on one activation tensor: exact min and max, and a sample of its values."""

    name: str
    min: float
    max: float
    #: float32 values, all of them or a seeded random subset (see ``count``)
    values: np.ndarray
    #: how many values the tensor held over all calibration samples
    count: int


# --------------------------------------------------------------------------- options


class MinMaxOptions(qpipe.Options):
    """The observed minimum and maximum (what the TFLite converter does)."""

    name: Literal["minmax"] = "minmax"


class PercentileOptions(qpipe.Options):
    """Clip to the ``100 - percentile`` and ``percentile`` percentiles of the values."""

    name: Literal["percentile"] = "percentile"
    percentile: float = Field(99.99, description="upper percentile kept, in (50, 100]; 100 is minmax")

    @field_validator("percentile")
    @classmethod
    def _in_range(cls, value: float) -> float:
        if not 50 < value <= 100:
            raise ValueError(f"percentile must be in (50, 100], e.g. 99.99; got {value:g}")
        return value


class MseOptions(qpipe.Options):
    """The clipping range with the least mean squared quantization error on the values."""

    name: Literal["mse"] = "mse"
    candidates: int = Field(160, ge=8, le=4096, description="clipping ranges tried (log-spaced)")


class EntropyOptions(qpipe.Options):
    """The threshold minimizing KL divergence between float and quantized histograms (TensorRT)."""

    name: Literal["entropy"] = "entropy"
    bins: int = Field(2048, ge=256, le=65536, description="histogram bins over [0, max |x|]")


EstimatorOptions = Annotated[
    Union[MinMaxOptions, PercentileOptions, MseOptions, EntropyOptions], Field(discriminator="name")]

OPTIONS: dict[str, type[qpipe.Options]] = {"minmax": MinMaxOptions, "percentile": PercentileOptions,
                                           "mse": MseOptions, "entropy": EntropyOptions}
NAMES = tuple(OPTIONS)


def parse_estimator(value: Any) -> Any:
    """Accept ``percentile`` as shorthand for ``{name: percentile}`` and the nested form
    ``{name: percentile, options: {percentile: 99}}``; name unknown names and keys clearly."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        return value
    name = value.get("name")
    if name is None:
        raise ValueError(f"estimator needs a 'name': one of {', '.join(NAMES)}")
    if name not in NAMES:
        raise ValueError(qpipe.unknown_name_message("estimator", str(name), list(NAMES)))
    nested = value.get("options", {})
    if not isinstance(nested, dict):
        raise ValueError(f"estimator '{name}': 'options' must be a mapping of option to value")
    flat = {**{k: v for k, v in value.items() if k != "options"}, **nested}
    valid = [k for k in OPTIONS[name].model_fields if k != "name"]
    for key in flat:
        if key != "name" and key not in valid:
            raise ValueError(f"estimator '{name}' has no option '{key}'; valid: {', '.join(valid) or 'none'}")
    return flat


# --------------------------------------------------------------------------- quantization grid


def quant_params(lo: float, hi: float, bits: int) -> tuple[float, int, int, int]:
    """``(scale, zero_point, qmin, qmax)`` TFLite uses for activations in ``[lo, hi]``.

    8 bits: asymmetric, the range widened to hold 0. 16 bits: symmetric, zero point 0.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if bits == 16:
        qmax = 2 ** 15 - 1
        scale = max(abs(lo), abs(hi)) / qmax
        return (scale or 1.0), 0, -qmax, qmax
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (hi - lo) / (qmax - qmin) or 1.0
    zero_point = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return scale, zero_point, qmin, qmax


def fake_quantize(values: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """``values`` quantized to the ``[lo, hi]`` grid of ``bits`` bits and back to float."""
    scale, zero_point, qmin, qmax = quant_params(lo, hi, bits)
    q = np.clip(np.round(values / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


# --------------------------------------------------------------------------- estimators


def minmax(stats: TensorStats, options: MinMaxOptions, bits: int) -> tuple[float, float]:
    return stats.min, stats.max


def percentile(stats: TensorStats, options: PercentileOptions, bits: int) -> tuple[float, float]:
    p = options.percentile
    if p >= 100 or stats.values.size == 0:
        return stats.min, stats.max
    lo, hi = np.percentile(stats.values.astype(np.float64), [100.0 - p, p])
    return max(float(lo), stats.min), min(float(hi), stats.max)


def mse(stats: TensorStats, options: MseOptions, bits: int) -> tuple[float, float]:
    """Shrink the observed range by a factor in [1/1024, 1]; keep the one with least error."""
    x = stats.values.astype(np.float64)
    if x.size == 0 or stats.max <= stats.min:
        return stats.min, stats.max
    if x.size > 1 << 16:
        x = np.random.default_rng(0).choice(x, size=1 << 16, replace=False)
    factors = np.unique(np.concatenate([np.geomspace(1 / 1024, 1.0, options.candidates), [1.0]]))
    best, best_error = (stats.min, stats.max), np.inf
    for factor in factors:
        lo, hi = stats.min * factor, stats.max * factor
        error = float(np.mean((x - fake_quantize(x, lo, hi, bits)) ** 2))
        if error < best_error:
            best, best_error = (lo, hi), error
    return float(best[0]), float(best[1])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zeros = p == 0
    nonzeros = p.size - int(zeros.sum())
    if nonzeros == 0:
        return None
    return p + eps * zeros - (eps * zeros.sum() / nonzeros) * ~zeros


def entropy(stats: TensorStats, options: EntropyOptions, bits: int) -> tuple[float, float]:
    """TensorRT's entropy calibration on the histogram of ``|x|``; a symmetric threshold.

    The threshold is searched from ``2**(bits-1)`` bins upwards; when the grid has at least
    as many levels as the histogram has bins (16-bit activations), this is minmax.
    """
    levels = 2 ** (bits - 1)
    absmax = max(abs(stats.min), abs(stats.max))
    nbins = options.bins
    if absmax == 0 or stats.values.size == 0 or levels >= nbins:
        return stats.min, stats.max
    hist, edges = np.histogram(np.abs(stats.values), bins=nbins, range=(0.0, absmax))
    hist = hist.astype(np.float64)
    step = max(1, (nbins - levels) // 240)
    best_i, best_kl = nbins, np.inf
    for i in list(range(levels, nbins, step)) + [nbins]:
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        nonzero = p != 0
        merged = i // levels
        starts = np.arange(levels) * merged
        sums = np.add.reduceat(sliced, starts)
        norms = np.add.reduceat(nonzero.astype(np.float64), starts)
        lengths = np.diff(np.append(starts, i))
        q = np.repeat(np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0), lengths)
        q[~nonzero] = 0
        if p.sum() == 0 or q.sum() == 0:
            continue
        ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum())
        if ps is None or qs is None:
            continue
        mask = ps > 0
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    threshold = float(edges[best_i])
    return max(stats.min, -threshold), min(stats.max, threshold)


ESTIMATORS: dict[str, Callable[[TensorStats, Any, int], tuple[float, float]]] = {
    "minmax": minmax, "percentile": percentile, "mse": mse, "entropy": entropy,
}


def estimate(stats: TensorStats, options: Any, bits: int) -> tuple[float, float]:
    """The ``(min, max)`` the estimator named by ``options.name`` gives this tensor."""
    lo, hi = ESTIMATORS[options.name](stats, options, bits)
    if not hi > lo:  # a constant tensor: keep a valid, non-empty range
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi == lo:
            hi = lo + 1e-6
    return float(lo), float(hi)
