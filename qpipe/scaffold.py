"""``qpipe new-plugin NAME --kind KIND``: write a plugin package that installs, registers and tests green.

The package has the layout ``docs/plugins.md`` describes: a ``pyproject.toml`` with an entry
point in the ``qpipe`` group, a module registering one component of ``KIND`` (evaluator,
quantizer, calibrator or backend), and tests written with ``qpipe.testing``. The templates
live in ``qpipe.scaffold_templates``. Nothing is imported from TensorFlow here.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from string import Template

from qpipe import __version__
from qpipe.errors import QpipeError
from qpipe.plugins import ENTRY_POINT_GROUP
from qpipe.scaffold_templates import COMPONENT, KIND_SUMMARY, MODULE, PYPROJECT, README, TEST, USAGE

KINDS = tuple(MODULE)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def new_plugin(name: str, parent: Path, kind: str = "evaluator") -> Path:
    """Write the package for plugin ``name`` into ``parent/qpipe-<name>``; return that folder."""
    if not NAME_RE.match(name):
        raise QpipeError(f"plugin name '{name}' is not valid: use lower-case letters, digits and '_', "
                         "starting with a letter (e.g. 'my_metrics')")
    if kind not in KINDS:
        raise QpipeError(f"--kind '{kind}' is not valid; choose one of: {', '.join(KINDS)}")
    installed = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name in installed:
        raise QpipeError(f"a plugin named '{name}' is already installed; choose another name")
    dist = f"qpipe-{name.replace('_', '-')}"
    module = f"qpipe_{name}"
    root = Path(parent) / dist
    if root.exists() and any(root.iterdir()):
        raise QpipeError(f"{root} already exists and is not empty; choose another --dir or name")
    values = {"name": name, "dist": dist, "module": module, "qpipe_version": __version__, "kind": kind}
    values["summary"] = Template(KIND_SUMMARY[kind]).substitute(values)
    values["component"] = Template(COMPONENT[kind]).substitute(values)
    values["usage"] = Template(USAGE[kind]).substitute(values)
    files = {
        "pyproject.toml": PYPROJECT,
        f"src/{module}/__init__.py": MODULE[kind],
        f"tests/test_{module}.py": TEST[kind],
        "README.md": README,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.substitute(values), encoding="utf-8")
    return root
