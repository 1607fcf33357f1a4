"""The inputs a Ray worker gets (``qpipe.remote``): the driver's model and data, rebuilt without
opening a path of the pipeline. Runs without a cluster; ``test_ray.py`` has the real one."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap

import numpy as np
import pytest

from qpipe.config import load_config, resolve
from qpipe.inputs import load_inputs
from qpipe.registry import Registry
from qpipe.remote import SECTIONS, ship_inputs, unship_inputs
from qpipe.tfenv import tensorflow

_WATCHED: list[str] = []
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCHED and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        _OPENED.extend(path for folder in _WATCHED if path.startswith(folder))


sys.addaudithook(_audit)


def predict(model, x: np.ndarray) -> np.ndarray:
    if model.flavor == "saved_model":
        out = model.model.signatures["serving_default"](**{model.inputs[0].name: tensorflow().constant(x)})
        return np.asarray(next(iter(out.values())))
    return np.asarray(model.model(x, training=False))


@pytest.mark.parametrize("kind", ["keras_file", "saved_model", "function"])
def test_a_worker_rebuilds_the_inputs_without_the_pipelines_files(project, pm, kind):
    model = {"path": "model.keras"}
    if kind == "saved_model":
        path = project.write_pipeline([], name="export.yaml")
        load_inputs(pm, resolve(load_config(path), Registry.from_plugins(pm))).model.exporter(project.root / "sm")
        model = {"path": "sm"}
    elif kind == "function":
        (project.root / "make_model.py").write_text(textwrap.dedent("""
            from qpipe.testing import build_tiny_model
            from qpipe.tfenv import keras3
            def build():
                return build_tiny_model(keras3())
        """))
        model = {"function": "make_model:build"}
    path = project.write_pipeline([{"name": "int8", "quantizer": "tflite.int8"}], model=model)
    resolved = resolve(load_config(path), Registry.from_plugins(pm))
    inputs = load_inputs(pm, resolved)
    shipped = pickle.loads(pickle.dumps(ship_inputs(inputs, safe_mode=True)))  # as the object store does
    root = str(project.root.resolve())
    _WATCHED.append(root)
    try:
        back = unship_inputs(pm, shipped)
    finally:
        _WATCHED.remove(root)
    assert _OPENED == [], "the worker opened a file of the pipeline"
    _WATCHED.append(root)  # the watch itself sees a read of the pipeline's folder
    try:
        project.data_path.read_bytes()
    finally:
        _WATCHED.remove(root)
    assert len(_OPENED) == 1
    _OPENED.clear()
    assert (back.model.flavor, back.model.sha256, back.model.source) == \
        (inputs.model.flavor, inputs.model.sha256, inputs.model.source)
    assert root not in str(back.model.path)
    x = inputs.evaluation.single_input()[:16]
    np.testing.assert_array_equal(predict(back.model, x), predict(inputs.model, x))
    for section in SECTIONS:
        mine, theirs = getattr(back, section), getattr(inputs, section)
        assert (mine is None) == (theirs is None), section
        if mine is not None:
            np.testing.assert_array_equal(mine.single_input(), np.asarray(theirs.single_input()))
            np.testing.assert_array_equal(mine.labels, np.asarray(theirs.labels))
            assert mine.single_input().flags.writeable
