"""docs/plugins.md: every hook is documented, and the guide's code works as written."""

from __future__ import annotations

import json
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

from qpipe.hookspecs import hook_names
from qpipe.registry import Registry
from qpipe.testing import fake_distribution, plugin_manager, run_pipeline_file

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(GUIDE.read_text(encoding="utf-8")) if lang == language]


def files() -> dict[str, str]:
    """Blocks whose first line is ``# file: PATH``: the files the guide tells you to write."""
    out = {}
    for _, body in BLOCK.findall(GUIDE.read_text(encoding="utf-8")):
        first, _, rest = body.partition("\n")
        if first.startswith("# file: "):
            out[first.removeprefix("# file: ").strip()] = body
    return out


def test_every_hook_has_a_reference_section():
    text = GUIDE.read_text(encoding="utf-8")
    reference = text.split("## Hook reference", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^### `(qpipe_\w+)`", reference, re.M))
    missing = sorted(set(hook_names()) - documented)
    assert not missing, f"hooks missing from docs/plugins.md's hook reference: {missing}"
    assert not documented - set(hook_names()), "the guide documents hooks that do not exist"


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<docs/plugins.md:{name}>", "exec"), module.__dict__)
    return module


def test_every_python_example_runs_and_registers():
    snippets = [b for b in blocks("python") if not b.startswith("# file: tests/")]
    assert len(snippets) >= 7
    modules = [_module(f"docs_example_{i}", source) for i, source in enumerate(snippets)]
    pm = plugin_manager(*modules)  # a wrong hook name or signature is rejected here
    registry = Registry.from_plugins(pm)
    assert {"confidence.score", "mine.margin"} <= set(registry.names("evaluator"))
    assert "mine.first" in registry.names("calibrator")
    assert "mine.onnxruntime" in registry.names("backend")
    for source in [b for b in blocks("python") if b.startswith("# file: tests/")]:
        compile(source, "<docs test>", "exec")


@pytest.mark.slow
def test_the_walkthrough_package_works_as_written(project, tmp_path, monkeypatch):
    """Write the guide's files, 'install' them through their own entry point, run a pipeline
    with the guide's evaluator, calibrator and tracker."""
    package = tmp_path / "qpipe-confidence"
    for relative, body in files().items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    pyproject = tomllib.loads((package / "pyproject.toml").read_text())
    entry_points = pyproject["project"]["entry-points"]["qpipe"]
    assert entry_points == {"confidence": "qpipe_confidence"}
    fake_distribution(tmp_path / "site", pyproject["project"]["name"], entry_points)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(package / "src"))
    monkeypatch.delitem(sys.modules, "qpipe_confidence", raising=False)

    snippets = {name: _module(name, b) for name, b in
                (("docs_tracker", next(b for b in blocks("python") if "variants.jsonl" in b)),
                 ("docs_calibrator", next(b for b in blocks("python") if "mine.first" in b)),
                 ("docs_margin", next(b for b in blocks("python") if "mine.margin" in b)))}
    pm = plugin_manager(*snippets.values(), entry_points=["confidence"])
    yaml_snippet = next(b for b in blocks("yaml") if "confidence.score" in b)
    import yaml

    evaluators = yaml.safe_load(yaml_snippet)["evaluators"] + ["mine.margin"]
    path = project.write_pipeline(
        [{"name": "int8", "quantizer": "tflite.int8", "calibrator": {"name": "mine.first", "options": {"count": 40}}}],
        evaluators=evaluators, cache=False)
    results = run_pipeline_file(path, pm)
    int8 = results.variant("int8")
    assert int8.status == "ok", int8.error
    assert int8.calibrator == {"name": "mine.first", "options": {"count": 40}}
    assert 0.25 <= int8.metrics["confidence_mean"] <= 1.0
    assert 0.0 <= int8.metrics["unsure_rate"] <= 1.0
    assert "confidence_mean_delta" in int8.metrics and int8.metrics["margin_mean"] > 0
    lines = [json.loads(line) for line in (Path(path).parent / "out" / "variants.jsonl").read_text().splitlines()]
    assert [(line["variant"], line["status"]) for line in lines] == [("float32", "ok"), ("int8", "ok")]
