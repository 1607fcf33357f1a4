"""Variants cannot corrupt each other: the shared model is checked around every quantizer and
calibrator call.

All variants of a run share one loaded model (``ctx.model.model``). A quantizer that changes
it in place (trains, prunes or re-initialises its layers) would silently change every variant
run after it. ``guard_model`` fingerprints the model's weights before and after the call; a
change fails that variant, naming the plugin and pointing at ``ctx.model.copy()``, and the
original weights are put back so the later variants see the model as loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from qpipe.errors import PluginError, QpipeError

SNAPSHOT_KEY = "isolation.weights"
BROKEN_KEY = "isolation.broken"  # who changed the model beyond repair (a list, empty while intact)


def weight_arrays(model: Any) -> list[np.ndarray] | None:
    """The model's weights as NumPy arrays (Keras ``get_weights`` or TF ``variables``); None if unknown."""
    if hasattr(model, "get_weights"):
        return [np.asarray(w) for w in model.get_weights()]
    variables = getattr(model, "variables", None)
    if variables is None:
        return None
    return [np.asarray(v.numpy()) for v in variables]


def fingerprint(arrays: list[np.ndarray]) -> str:
    """A hash of the arrays' shapes, dtypes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _snapshot(loaded: Any) -> tuple[str, list[np.ndarray]] | None:
    """(fingerprint, copies of the weights) of the model as loaded, taken once per run."""
    memo = getattr(loaded, "memo", None)
    if memo is None:  # a stand-in for a model that is not loaded (every variant cached)
        return None

    def take() -> tuple[str, list[np.ndarray]] | None:
        arrays = weight_arrays(loaded.model)
        return None if arrays is None else (fingerprint(arrays), [a.copy() for a in arrays])

    return memo(SNAPSHOT_KEY, take)


def _restore(model: Any, arrays: list[np.ndarray], expected: str) -> bool:
    """Put the loaded weights back; True when the model matches its fingerprint again."""
    try:
        if hasattr(model, "set_weights"):
            model.set_weights(arrays)
        else:
            for variable, array in zip(model.variables, arrays, strict=True):
                variable.assign(array)
        after = weight_arrays(model)
    except Exception:  # the structure changed too (layers added or removed): cannot restore
        return False
    return after is not None and fingerprint(after) == expected


@contextmanager
def guard_model(loaded: Any, who: str) -> Iterator[None]:
    """Fail the call (and restore the model) if it changed the shared model's weights.

    ``who`` names the component and plugin for the error. The check runs even if the call
    raised, so a quantizer that mutates and then fails cannot corrupt the later variants.
    """
    snapshot = _snapshot(loaded) if loaded is not None else None
    if snapshot is not None and loaded.memo(BROKEN_KEY, list):
        raise QpipeError(f"the shared model was changed in place by {loaded.memo(BROKEN_KEY, list)[0]} earlier "
                         "in this run and could not be restored; this variant would measure a different model")
    try:
        yield
    finally:
        if snapshot is not None:
            _check_unchanged(loaded, snapshot, who)


def _check_unchanged(loaded: Any, snapshot: tuple[str, list[np.ndarray]], who: str) -> None:
    expected, arrays = snapshot
    now = weight_arrays(loaded.model)
    if now is not None and fingerprint(now) == expected:
        return
    restored = _restore(loaded.model, arrays, expected)
    fix = ("the shared model was restored for the other variants" if restored
           else "the shared model could not be restored: the variants after this one would be wrong")
    error = PluginError(f"{who} changed the shared model's weights in place; work on ctx.model.copy() "
                        f"(a private clone) instead ({fix})")
    if not restored:
        loaded.memo(BROKEN_KEY, list).append(who)
    raise error
