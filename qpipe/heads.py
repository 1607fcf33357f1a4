"""Models with several outputs ("heads"): predictions named by output, metric names per output.

A single-output model's predictions stay one array everywhere (evaluators, the baseline, the
cache), so nothing changes for it. A model with several outputs has its predictions as
``{output name: array}`` in the model's order, named as ``LoadedModel.outputs`` names them;
each label evaluator and fidelity then run once per output and their metrics are named
``<output>/<metric>`` (deltas ``<output>/<metric>_delta``). Pure numpy.
"""

from __future__ import annotations

import re
from typing import Any, Union

import numpy as np

from qpipe.errors import QpipeError

#: between an output's name and a metric's: ``quality/mae``
SEPARATOR = "/"

#: what the host keeps of a variant's predictions
Predictions = Union[np.ndarray, dict[str, np.ndarray]]

_POSITIONAL = re.compile(r"^output_(\d+)$")


def output_names(model: Any) -> list[str]:
    """The names of a ``LoadedModel``'s outputs, in order."""
    return [t.name for t in (getattr(model, "outputs", None) or [])]


def name_outputs(raw: Any, names: list[str], what: str = "the backend") -> Predictions:
    """A backend's predictions as the host keeps them: one array for a single-output model,
    else ``{model output name: array}`` in the model's order.

    ``raw`` may be an array, a list or tuple (by position) or a dict. A dict's keys are matched
    to ``names`` by name, else as ``output_<i>`` (the names a converted Keras model's signature
    gives its outputs), else by a name's suffix (``quant_species``: TF-MOT's renamed layers),
    else by position.
    """
    if isinstance(raw, (list, tuple)):
        raw = dict(zip(names, raw, strict=False)) if len(raw) == len(names) else {f"output_{i}": a for i, a in enumerate(raw)}
    if not isinstance(raw, dict):
        if len(names) > 1:
            raise QpipeError(f"{what} returned one array for a model with {len(names)} outputs "
                             f"({', '.join(names)}); a backend returns {{output name: array}} for such a model")
        return np.asarray(raw)
    arrays = {str(k): np.asarray(v) for k, v in raw.items()}
    if len(arrays) == 1 and len(names) <= 1:
        return next(iter(arrays.values()))
    if len(arrays) != len(names):
        raise QpipeError(f"{what} returned {len(arrays)} outputs ({', '.join(arrays)}) for a model with "
                         f"{len(names)} ({', '.join(names)})")
    if set(arrays) == set(names):
        return {name: arrays[name] for name in names}
    positions = {int(m.group(1)): key for key in arrays if (m := _POSITIONAL.match(key))}
    if sorted(positions) == list(range(len(names))):
        return {name: arrays[positions[i]] for i, name in enumerate(names)}
    ends = {name: [key for key in arrays if key.endswith(name) or name.endswith(key)] for name in names}
    if all(len(keys) == 1 for keys in ends.values()) and len({keys[0] for keys in ends.values()}) == len(names):
        return {name: arrays[ends[name][0]] for name in names}  # renamed, e.g. quant_species (TF-MOT)
    return dict(zip(names, arrays.values(), strict=True))


def concat(parts: list[Any]) -> Any:
    """Batches of predictions joined along the first axis (arrays, dicts or lists of arrays)."""
    first = parts[0]
    if isinstance(first, dict):
        return {key: np.concatenate([np.asarray(p[key]) for p in parts], axis=0) for key in first}
    if isinstance(first, (list, tuple)):
        return [np.concatenate([np.asarray(p[i]) for p in parts], axis=0) for i in range(len(first))]
    return np.concatenate([np.asarray(p) for p in parts], axis=0)


def per_output(outputs: Any) -> dict[str, np.ndarray]:
    """``{name: array}`` of a multi-output model's predictions; ``{"": array}`` for one output."""
    if outputs is None:
        return {}
    return dict(outputs) if isinstance(outputs, dict) else {"": np.asarray(outputs)}


def prefixed(output: str, metric: str) -> str:
    """``quality/mae``; the metric itself for the single output (named ``""``)."""
    return f"{output}{SEPARATOR}{metric}" if output else metric


def split(metric: str) -> tuple[str | None, str]:
    """``("quality", "mae_delta")`` for ``quality/mae_delta``; ``(None, name)`` without an output."""
    output, sep, name = metric.rpartition(SEPARATOR)
    return (output, name) if sep else (None, metric)
