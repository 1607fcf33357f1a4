"""Nothing in a pipeline file is silently ignored: unknown backends under ``backends:``,
duplicate keys, unknown ``{placeholders}`` in ``output.dir``, option errors under their own
key path, and ``function:`` targets that exit or return nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qpipe.config import load_config, resolve
from qpipe.errors import ConfigError, QpipeError
from qpipe.inputs import load_model
from qpipe.registry import Registry

BASE = """\
name: demo
model: {path: model.keras}
data:
  evaluation: {path: data.npz}
variants:
  - name: float32
    quantizer: tflite.float32
tracking: false
"""


def write(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def resolve_text(tmp_path, pm, text):
    return resolve(load_config(write(tmp_path, text)), Registry.from_plugins(pm))


def test_an_unknown_backend_under_backends_is_refused_with_did_you_mean(tmp_path, pm):
    with pytest.raises(ConfigError, match=r"^pipeline.yaml:11: backends.litrt: unknown backend 'litrt' "
                                          r"\(did you mean 'litert'\?\); valid: .*litert"):
        resolve_text(tmp_path, pm, BASE + "backends:\n  litert: {threads: 1}\n  litrt: {threads: 1}\n")


def test_backend_option_errors_name_the_backends_key_path(tmp_path, pm):
    text = BASE + "backends:\n  litert:\n    batch_size: 0\n"
    with pytest.raises(ConfigError, match=r"^pipeline.yaml:11: backends.litert.batch_size: Input should be greater"):
        resolve_text(tmp_path, pm, text)
    with pytest.raises(ConfigError, match=r"^pipeline.yaml:11: backends.litert.thread: unknown key 'thread' "
                                          r"\(did you mean 'threads'\?\)"):
        resolve_text(tmp_path, pm, BASE + "backends:\n  litert:\n    thread: 2\n")


@pytest.mark.parametrize("text, pattern", [
    ("name: demo\n" + BASE, r"^pipeline.yaml:2: malformed YAML: duplicate key 'name' \(first at line 1\)"),
    (BASE.replace("    quantizer: tflite.float32\n", "    quantizer: tflite.float32\n    quantizer: tflite.int8\n"),
     r"^pipeline.yaml:8: malformed YAML: duplicate key 'quantizer' \(first at line 7\)"),
    (BASE.replace("tracking: false\n", "tracking: false\ntracking: true\n"), r"duplicate key 'tracking'"),
])
def test_duplicate_keys_are_refused_with_their_line(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text))


def test_merge_keys_may_be_overridden():
    from qpipe.yamlload import compose_and_load

    _, value = compose_and_load("a: &d {x: 1, y: 2}\nb: {<<: *d, y: 3}\n")
    assert value == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}


def test_an_unknown_output_placeholder_lists_the_valid_ones(tmp_path, pm):
    with pytest.raises(ConfigError, match=r"^pipeline.yaml:9: output.dir: unknown placeholder '\{nmae\}'; "
                                          r"valid: \{name\}, \{timestamp\}"):
        load_config(write(tmp_path, BASE + "output: {dir: 'runs/{nmae}-{timestamp}'}\n"))
    assert load_config(write(tmp_path, BASE + "output: {dir: 'runs/{name}-{timestamp}'}\n"))


def test_function_targets_that_exit_or_return_nothing_are_errors(tmp_path, pm):
    (tmp_path / "builders.py").write_text("def nothing():\n    pass\n")
    for target, pattern in [("sys:exit", r"model: 'sys:exit' called sys.exit\(None\) instead of returning"),
                            ("builders:nothing", r"model: expected a Keras model, got NoneType")]:
        resolved = resolve_text(tmp_path, pm, BASE.replace("{path: model.keras}", f"{{function: '{target}'}}"))
        with pytest.raises(QpipeError, match=pattern):
            load_model(pm, resolved)


def test_sys_exit_as_the_model_function_exits_2_in_one_line(tmp_path):
    path = write(tmp_path, BASE.replace("{path: model.keras}", "{function: 'sys:exit'}"))
    proc = subprocess.run([sys.executable, "-m", "qpipe.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: model: 'sys:exit' called sys.exit(None) instead of returning a value; point 'function:' at a "
        "function that returns one"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
