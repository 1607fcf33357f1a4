"""The README's component reference is generated from the code and must be current."""

from __future__ import annotations

from pathlib import Path

from qpipe.reference import END, START, component_reference, replace_section
from qpipe.registry import Registry

README = Path(__file__).resolve().parent.parent / "README.md"


def test_component_reference_is_current(pm):
    from qpipe.plugins import get_plugin_manager

    text = README.read_text()
    generated = component_reference(Registry.from_plugins(get_plugin_manager()))
    assert replace_section(text, generated) == text, (
        "README component reference is stale: run `python -m qpipe.reference --write README.md`")


def test_every_builtin_component_and_option_is_documented():
    from qpipe.plugins import get_plugin_manager

    registry = Registry.from_plugins(get_plugin_manager())
    section = README.read_text().split(START)[1].split(END)[0]
    for entries in registry.entries.values():
        for name, entry in entries.items():
            assert f"**`{name}`**" in section, name
            for option in entry.cls.Options.model_fields:
                assert f"| `{option}` |" in section, (name, option)


def test_quickstart_has_exactly_two_commands():
    text = README.read_text()
    block = text.split("## Quickstart")[1].split("```sh")[1].split("```")[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert "qpipe run pipeline.yaml" in makefile and "pytest" in makefile
    assert "make test" in (README.parent / ".ci" / "run").read_text()
