"""Pydantic validation errors of a pipeline file as one line: ``file:line: key.path: message``.

The line comes from the YAML node at the key path (or its deepest existing parent); an
unknown key lists the valid ones and suggests the closest.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from qpipe.errors import ConfigError


def config_error(path: Path, root: yaml.Node | None, exc: ValidationError, model: type[BaseModel],
                 prefix: tuple = ()) -> ConfigError:
    """The first error of ``exc`` as a ConfigError naming file, line and key path (and how many
    more there are); ``model`` validated the YAML found under the key path ``prefix``."""
    errors = exc.errors()
    first = errors[0]
    loc = prefix + tuple(part for part in first["loc"] if not _is_union_tag(part))
    message = _describe(first, model, tuple(p for p in first["loc"] if not _is_union_tag(p)))
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return ConfigError(f"{path.name}:{line_of(root, loc)}: {format_loc(loc)}: {message}{more}")


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member's name ('str', 'dict[str,str]', 'function-before[...]') to loc
    return isinstance(part, str) and (part in {"str", "bool", "int", "float"} or "[" in part)


def _describe(error: Any, model: type[BaseModel], loc: tuple) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{key}'{hint}; valid keys: {', '.join(valid)}"
    if kind == "missing":
        return "required key is missing"
    msg = error["msg"]
    return msg.removeprefix("Value error, ")


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names of the pydantic model found by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _unwrap(current, want_container=isinstance(part, int))
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        else:  # list[...] / dict[str, ...]
            args = typing.get_args(current)
            current = args[-1] if args else None
    current = _unwrap(current, want_container=False)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any, want_container: bool) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        for member in members:
            is_model = isinstance(member, type) and issubclass(member, BaseModel)
            is_container = typing.get_origin(member) in (list, dict)
            if (want_container and is_container) or (not want_container and is_model):
                return member
        return members[0] if members else annotation
    return annotation


def format_loc(loc: tuple) -> str:
    """('variants', 1, 'options', 'x') -> 'variants[1].options.x'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def line_of(root: yaml.Node | None, loc: tuple) -> int:
    """1-based line of the YAML node at ``loc``; the deepest existing parent if it is missing."""
    node = root
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
