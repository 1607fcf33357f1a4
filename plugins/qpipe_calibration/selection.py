"""Sample selection: which rows of data.calibration become the representative samples.

Pure numpy: each function returns sorted row indices.
"""

from __future__ import annotations

import numpy as np


def first_indices(n: int, count: int) -> np.ndarray:
    """The first ``count`` rows."""
    return np.arange(count, dtype=np.int64)


def random_indices(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct rows drawn with ``rng``."""
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


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


def kcenter_indices(features: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """k-center greedy: start from a seeded random row, then add the row farthest from the chosen.

    The chosen rows cover the feature space: every row is close to some chosen one, so rare
    kinds of input are represented instead of drowned by common ones.
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    first = int(rng.integers(len(x)))
    chosen = [first]
    distance = np.sum((x - x[first]) ** 2, axis=1)
    distance[first] = -1.0
    while len(chosen) < count:
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.sum((x - x[nxt]) ** 2, axis=1))
        distance[chosen] = -1.0
    return np.sort(np.asarray(chosen, dtype=np.int64))
