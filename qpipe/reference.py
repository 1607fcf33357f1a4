"""The component reference in the README, generated from the registry and ``Options`` models.

``python -m qpipe.reference`` prints it; a test checks the README holds the current text
between the ``<!-- components:start -->`` and ``<!-- components:end -->`` markers, so the
docs cannot drift from the code. ``--write README.md`` updates the file in place.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from pydantic_core import PydanticUndefined

from qpipe.components import KINDS
from qpipe.registry import Registry

START, END = "<!-- components:start -->", "<!-- components:end -->"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "`") for a in args)
    if origin is not None and args:
        inner = ", ".join(_type_name(a) for a in args if a is not type(None))
        name = getattr(origin, "__name__", str(origin))
        if name in ("Union", "UnionType"):
            return inner + (" or null" if type(None) in args else "")
        return f"{name}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        return f"`{field.default!r}`".replace("'", "")
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "computed"
        return f"`{value!r}`" if value in ([], {}) else "depends on the machine"
    return "required"


def component_reference(registry: Registry) -> str:
    """Markdown: one table of options per registered component, grouped by kind."""
    lines: list[str] = []
    for kind in KINDS:
        lines.append(f"### {kind.capitalize()}s\n")
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            cls = entry.cls
            lines.append(f"**`{name}`** (plugin `{entry.plugin}`): {cls.summary()}\n")
            if kind == "evaluator" and getattr(cls, "metrics", None):
                lines.append(_measures(cls) + "\n")
            fields = cls.Options.model_fields
            if not fields:
                lines.append("No options.\n")
                continue
            lines.append("| option | type | default | meaning |")
            lines.append("| --- | --- | --- | --- |")
            for key, field in fields.items():
                lines.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | "
                             f"{field.description or ''} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _measures(cls: Any) -> str:
    """"Metrics: `mae`, `rmse` (headline: mae, rmse; lower is better: mae, rmse). Tasks: regression."."""
    notes = [f"headline: {', '.join(cls.headline)}"] if cls.headline else []
    if cls.lower_is_better:
        notes.append(f"lower is better: {', '.join(cls.lower_is_better)}")
    listed = ", ".join(f"`{m}`" for m in cls.metrics) + (f" ({'; '.join(notes)})" if notes else "")
    return f"Metrics: {listed}. Tasks: {', '.join(cls.tasks) if cls.tasks else 'any'}."


def replace_section(text: str, generated: str) -> str:
    """``text`` with the block between the markers replaced by ``generated``."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{generated}{END}{tail}"


def main(argv: list[str]) -> None:
    from qpipe.plugins import get_plugin_manager

    generated = component_reference(Registry.from_plugins(get_plugin_manager()))
    if argv[:1] == ["--write"]:
        path = Path(argv[1] if len(argv) > 1 else "README.md")
        path.write_text(replace_section(path.read_text(), generated))
    else:
        sys.stdout.write(generated)


if __name__ == "__main__":
    main(sys.argv[1:])
