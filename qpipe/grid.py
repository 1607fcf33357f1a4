"""Option lists in a variant: one variant per combination (a small grid search).

``options: {per_channel: [true, false]}`` on a quantizer whose ``per_channel`` takes one
value becomes two variants, ``<name>-per_channel-true`` and ``<name>-per_channel-false``.
"""

from __future__ import annotations

import math
import re
import typing
from typing import Any, Union

from qpipe.limits import limit
from qpipe.registry import Registry
from qpipe.schema import VariantConfig


def oversized_grid(variants: list[VariantConfig], registry: Registry) -> tuple[int, str] | None:
    """(index of the variant with the largest grid, message) when the option lists expand to
    more than QPIPE_MAX_VARIANTS variants, found before expanding them (four lists of 300
    values would be 8.1e9 variants); None when they fit."""
    sizes = [math.prod(len(values) for _, values in _grid_axes(v, registry)) for v in variants]
    most = limit("QPIPE_MAX_VARIANTS")
    if sum(sizes) <= most:
        return None
    i = max(range(len(sizes)), key=sizes.__getitem__)
    lists = " x ".join(str(len(values)) for _, values in _grid_axes(variants[i], registry))
    return i, (f"the option lists expand to {sum(sizes):,} variants ({lists} here); the limit is "
               f"{most}: shorten the lists or set QPIPE_MAX_VARIANTS to raise it")


def _grid_axes(variant: VariantConfig, registry: Registry) -> list[tuple[str, list]]:
    """(option, values) of each option given as a list where the option takes one value;
    [] when there is no grid (or an empty list, which fails option validation by itself)."""
    entry = registry.entries["quantizer"].get(variant.quantizer)
    if entry is None:
        return []
    fields = entry.cls.Options.model_fields
    axes = [(key, value) for key, value in variant.options.items()
            if isinstance(value, list) and key in fields and not _accepts_list(fields[key].annotation)]
    return [] if any(len(values) == 0 for _, values in axes) else axes


def expand_grid(variant: VariantConfig, registry: Registry) -> list[VariantConfig]:
    """A variant whose options give a list where the option takes one value becomes one
    variant per combination, named ``<name>-<option>-<value>...`` (a small grid search)."""
    axes = _grid_axes(variant, registry)
    if not axes:
        return [variant]
    combos: list[dict[str, Any]] = [{}]
    for key, values in axes:
        combos = [{**combo, key: value} for combo in combos for value in values]
    out = []
    for combo in combos:
        suffix = "-".join(f"{key}-{_slug(value)}" for key, value in combo.items())
        out.append(variant.model_copy(update={"name": f"{variant.name}-{suffix}",
                                              "options": {**variant.options, **combo}}))
    return out


def _accepts_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return any(_accepts_list(a) for a in typing.get_args(annotation))
    return False


def _slug(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)
