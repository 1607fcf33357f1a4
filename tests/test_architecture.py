"""The public/private line: built-in plugins import only qpipe's public modules and never each
other (the import-linter contracts in pyproject.toml), and every qpipe module is classified."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import qpipe

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]

LINT = """
import sys
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))
"""


def lint(config: Path, *extra_paths: Path) -> subprocess.CompletedProcess:
    """Run import-linter on ``config`` in a subprocess with qpipe, the plugins and ``extra_paths``."""
    paths = [str(ROOT), str(ROOT / "plugins"), *map(str, extra_paths)]
    env = {"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", LINT, str(config)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_built_in_plugins_import_only_the_public_api_and_not_each_other():
    run = lint(ROOT / "pyproject.toml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken" in run.stdout


def test_every_qpipe_module_is_public_or_forbidden_to_plugins():
    forbidden = set(CONFIG["contracts"][0]["forbidden_modules"])
    modules = {f"qpipe.{p.stem}" for p in (ROOT / "qpipe").glob("*.py") if p.stem not in ("__init__", "__main__")}
    modules |= {f"qpipe.{p.parent.name}" for p in (ROOT / "qpipe").glob("*/__init__.py")}
    public = set(qpipe.PUBLIC_MODULES)
    assert not public & forbidden, "a public module is forbidden"
    unclassified = modules - public - forbidden
    assert not unclassified, f"add each to qpipe.PUBLIC_MODULES or to the forbidden list: {sorted(unclassified)}"
    assert set(CONFIG["contracts"][0]["source_modules"]) == set(CONFIG["contracts"][1]["modules"])
    plugins = {p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists()}
    assert set(CONFIG["contracts"][0]["source_modules"]) == plugins


def test_the_contract_catches_a_plugin_importing_a_private_module_or_another_plugin(tmp_path):
    plugins = tmp_path / "plugins"
    (plugins / "qpipe_sneaky").mkdir(parents=True)
    (plugins / "qpipe_sneaky" / "__init__.py").write_text(
        "from qpipe.pipeline import load_inputs\nimport qpipe_keras\n")
    config = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text().replace('source_modules = [', 'source_modules = ["qpipe_sneaky", ')
    text = text.replace('root_packages = [', 'root_packages = ["qpipe_sneaky", ')
    text = text.replace('modules = ["qpipe_calibration"', 'modules = ["qpipe_sneaky", "qpipe_calibration"')
    config.write_text(text)
    run = lint(config, plugins)
    assert run.returncode == 1, run.stdout
    assert "qpipe_sneaky is not allowed to import qpipe.pipeline" in run.stdout
    assert "qpipe_sneaky is not allowed to import qpipe_keras" in run.stdout


def test_the_example_packages_import_only_the_public_api(tmp_path):
    examples = {p.name: p for p in (ROOT / "examples").glob("*/src/*") if (p / "__init__.py").exists()}
    assert {"qpipe_onnxruntime", "qpipe_prune"} <= set(examples)
    config = tmp_path / "importlinter.toml"
    contract = CONFIG["contracts"][0]
    names = ", ".join(f'"{n}"' for n in sorted(examples))
    config.write_text(f"""[tool.importlinter]
root_packages = ["qpipe", {names}]

[[tool.importlinter.contracts]]
name = "Example plugins import only qpipe's public API"
type = "forbidden"
source_modules = [{names}]
forbidden_modules = [{", ".join(f'"{m}"' for m in contract["forbidden_modules"])}]
allow_indirect_imports = true
""")
    run = lint(config, *(p.parent for p in examples.values()))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_no_qpipe_module_imports_one_that_imports_it_back():
    import grimp

    graph = grimp.build_graph("qpipe", exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m.startswith("qpipe.")}
    cycles = {tuple(sorted((a, b))): graph.find_shortest_chain(importer=b, imported=a)
              for a in modules for b in graph.find_modules_directly_imported_by(a)
              if b in modules and b != a and graph.find_shortest_chain(importer=b, imported=a)}
    assert not cycles, "import cycles: " + "; ".join(" -> ".join((a, *chain)) for (a, _), chain in cycles.items())


def test_the_host_keeps_modules_and_functions_short():
    """The house rule behind docs/architecture.md: no qpipe module over ~400 lines, no function over ~60."""
    import ast

    long_files, long_functions = [], []
    for path in sorted((ROOT / "qpipe").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 420:
            long_files.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 65:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long_files, long_files
    assert not long_functions, long_functions


def test_the_run_core_modules_are_each_described_in_docs_architecture():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for module in ("pipeline", "schedule", "variant", "executors", "workers", "remote", "cached", "cache",
                   "inputs", "outcome", "lifecycle"):
        assert f"`qpipe.{module}`" in text, f"docs/architecture.md does not describe qpipe.{module}"
    modules = {p.stem for p in (ROOT / "qpipe").glob("*.py") if p.stem not in ("__init__", "__main__")}
    modules |= {p.parent.name for p in (ROOT / "qpipe").glob("*/__init__.py")}
    missing = sorted(m for m in modules if f"`qpipe.{m}`" not in text)
    assert not missing, f"docs/architecture.md does not mention: {missing}"
