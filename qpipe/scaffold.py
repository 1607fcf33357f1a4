"""``qpipe new-plugin NAME``: write a plugin package that installs, registers and tests green.

The package has the layout ``docs/plugins.md`` describes: a ``pyproject.toml`` with an entry
point in the ``qpipe`` group, a module registering one evaluator, and a test written with
``qpipe.testing``. Nothing is imported from TensorFlow here.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from string import Template

from qpipe import __version__
from qpipe.errors import QpipeError
from qpipe.plugins import ENTRY_POINT_GROUP

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=77", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A qpipe plugin: the $name.confidence evaluator."
requires-python = ">=3.10"
dependencies = ["qpipe>=$qpipe_version"]

[project.optional-dependencies]
test = ["pytest>=8"]

# qpipe finds plugins through this entry-point group: plugin name = module
[project.entry-points.qpipe]
$name = "$module"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
filterwarnings = ["ignore::DeprecationWarning", "ignore::UserWarning"]
''')

MODULE = Template('''\
"""qpipe plugin '$name': registers the ``$name.confidence`` evaluator.

Add components the same way: subclass ``qpipe.Quantizer``, ``qpipe.Calibrator``,
``qpipe.Backend`` or ``qpipe.Evaluator``, give it a dotted ``name`` and register it from the
matching ``qpipe_register_*`` hook. Import heavy libraries inside methods, not here.
See qpipe's docs/plugins.md.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

import qpipe


class ConfidenceOptions(qpipe.Options):
    threshold: float = Field(0.5, gt=0, lt=1, description="top-1 probability below which a prediction is unsure")


class Confidence(qpipe.Evaluator):
    """Mean top-1 probability, and the share of predictions below a threshold."""

    name = "$name.confidence"
    Options = ConfidenceOptions
    metrics = ("confidence_mean", "unsure_rate")  # what constraints and the objective may name
    tasks = ("classification",)  # applies to classifiers only

    def evaluate(self, ctx: qpipe.EvalContext) -> dict[str, float]:
        scores = np.asarray(ctx.outputs, dtype=np.float64).reshape(len(ctx.outputs), -1)
        top = scores.max(axis=1)
        return {"confidence_mean": float(top.mean()),
                "unsure_rate": float(np.mean(top < self.options.threshold))}


@qpipe.hookimpl
def qpipe_register_evaluators(register) -> None:
    register(Confidence)
''')

TEST = Template('''\
"""Tests for the '$name' plugin, written with qpipe's test kit."""

from __future__ import annotations

import $module
from qpipe.registry import Registry
from qpipe.testing import plugin_manager, run_variant, tiny_project


def test_the_evaluator_is_registered():
    registry = Registry.from_plugins(plugin_manager($module))
    assert registry.get("evaluator", "$name.confidence").plugin == "$module"


def test_the_entry_point_loads_the_plugin():
    # fails until the package is installed: pip install -e .
    pm = plugin_manager(entry_points=["$name"])
    assert "$name.confidence" in Registry.from_plugins(pm).names("evaluator")


def test_the_evaluator_runs_in_a_pipeline(tmp_path):
    pm = plugin_manager($module)  # the built-in plugins plus this one, nothing else installed
    result = run_variant(tiny_project(tmp_path), "tflite.int8", pm=pm,
                         evaluators=["accuracy", {"name": "$name.confidence", "options": {"threshold": 0.6}}])
    assert result.status == "ok", result.error
    assert 0.25 <= result.metrics["confidence_mean"] <= 1.0
    assert 0.0 <= result.metrics["unsure_rate"] <= 1.0
''')

README = Template('''\
# $dist

A [qpipe](https://pypi.org/project/qpipe/) plugin. It registers the evaluator
`$name.confidence` (mean top-1 probability and the share of predictions below `threshold`).

```bash
pip install -e .          # registers the entry point 'qpipe: $name = $module'
qpipe plugins             # lists '$name' and its components
pytest                    # the plugin's tests (qpipe.testing)
```

Use it in a pipeline:

```yaml
evaluators: [accuracy, size, {name: $name.confidence, options: {threshold: 0.6}}]
```
''')


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package for plugin ``name`` into ``parent/qpipe-<name>``; return that folder."""
    if not NAME_RE.match(name):
        raise QpipeError(f"plugin name '{name}' is not valid: use lower-case letters, digits and '_', "
                         "starting with a letter (e.g. 'my_metrics')")
    installed = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if name in installed:
        raise QpipeError(f"a plugin named '{name}' is already installed; choose another name")
    dist = f"qpipe-{name.replace('_', '-')}"
    module = f"qpipe_{name}"
    root = Path(parent) / dist
    if root.exists() and any(root.iterdir()):
        raise QpipeError(f"{root} already exists and is not empty; choose another --dir or name")
    values = {"name": name, "dist": dist, "module": module, "qpipe_version": __version__}
    files = {
        "pyproject.toml": PYPROJECT,
        f"src/{module}/__init__.py": MODULE,
        f"tests/test_{module}.py": TEST,
        "README.md": README,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.substitute(values), encoding="utf-8")
    return root
