"""Source templates ``qpipe new-plugin`` fills in: one module and one test file per kind.

``$name`` is the plugin (entry-point) name, ``$module`` its import name, ``$dist`` its
distribution. Every template uses only the public API (``qpipe``, ``qpipe.testing``).
"""

from __future__ import annotations

from string import Template

KIND_SUMMARY = {
    "evaluator": "the $name.confidence evaluator",
    "quantizer": "the $name.dynamic quantizer",
    "calibrator": "the $name.first calibrator",
    "backend": "the $name.reference backend",
}

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=77", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A qpipe plugin: $summary."
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

README = Template('''\
# $dist

A qpipe plugin. It registers $summary.

Develop it in a virtual environment that reuses the qpipe you already have installed
(nothing is downloaded, your qpipe environment is not changed):

```bash
python -m qpipe plugin-venv .venv      # a venv that sees qpipe and its packages, with a 'qpipe' command
.venv/bin/python -m pip install --no-deps -e .
.venv/bin/qpipe plugins                # lists '$name' and its components
.venv/bin/python -m pytest             # the plugin's tests (qpipe.testing, a real tiny model)
```

Use it in a pipeline:

```yaml
$usage
```
''')

USAGE = {
    "evaluator": "evaluators: [accuracy, size, {name: $name.confidence, options: {threshold: 0.6}}]",
    "quantizer": "variants:\n  - {name: float32, quantizer: tflite.float32}\n"
                 "  - {name: mine, quantizer: $name.dynamic, options: {weights: int8}}",
    "calibrator": "variants:\n  - {name: float32, quantizer: tflite.float32}\n"
                  "  - {name: int8, quantizer: tflite.int8, calibrator: {name: $name.first, options: {count: 100}}}",
    "backend": "variants:\n  - {name: float32, quantizer: tflite.float32}\n"
               "  - {name: int8, quantizer: tflite.int8, backend: $name.reference}",
}

_HEADER = '''\
"""qpipe plugin '$name': registers $summary.

Components subclass ``qpipe.Quantizer``, ``qpipe.Calibrator``, ``qpipe.Backend`` or
``qpipe.Evaluator``, have a dotted ``name`` and are registered from the matching
``qpipe_register_*`` hook. Import heavy libraries inside methods, not here.
See qpipe's docs/plugins.md.
"""

from __future__ import annotations

'''

MODULE = {
    "evaluator": Template(_HEADER + '''\
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
'''),
    "quantizer": Template(_HEADER + '''\
from typing import Literal

from pydantic import Field

import qpipe


class DynamicOptions(qpipe.Options):
    weights: Literal["int8", "float16"] = Field("int8", description="how the weights are stored")


class Dynamic(qpipe.Quantizer):
    """Weight-only quantization with the TFLite converter (int8 or float16 weights)."""

    name = "$name.dynamic"
    Options = DynamicOptions

    def quantize(self, ctx: qpipe.QuantizeContext) -> qpipe.Artifact:
        import tensorflow as tf  # heavy: imported when a variant runs

        ctx.report("converting")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(ctx.model.saved_model_dir()))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if self.options.weights == "float16":
            converter.target_spec.supported_types = [tf.float16]
        path = ctx.artifact_path(".tflite")
        path.write_bytes(converter.convert())
        return qpipe.Artifact(path=path, metadata={"weights": self.options.weights})


@qpipe.hookimpl
def qpipe_register_quantizers(register) -> None:
    register(Dynamic)
'''),
    "calibrator": Template(_HEADER + '''\
from pydantic import Field

import qpipe


class FirstOptions(qpipe.Options):
    count: int = Field(100, ge=1, description="how many rows of data.calibration to use")


class First(qpipe.Calibrator):
    """The first rows of data.calibration as representative samples."""

    name = "$name.first"
    Options = FirstOptions

    def calibrate(self, ctx: qpipe.CalibrateContext) -> qpipe.Calibration:
        n = min(self.options.count, len(ctx.data))
        return qpipe.Calibration(samples=ctx.data.take(range(n)), metadata={"method": "first", "count": n})


@qpipe.hookimpl
def qpipe_register_calibrators(register) -> None:
    register(First)
'''),
    "backend": Template(_HEADER + '''\
import numpy as np
from pydantic import Field

import qpipe
from qpipe.conversion import dequantize_array, quantize_array  # (de)quantize with a tensor's scale/zero point


class ReferenceOptions(qpipe.Options):
    threads: int = Field(1, ge=1, description="interpreter threads")


class ReferenceRunner(qpipe.Runner):
    """A .tflite in the LiteRT interpreter with reference kernels, one sample per invoke."""

    def __init__(self, path: str, threads: int):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.path, self.threads = path, threads
        self.interpreter = Interpreter(model_path=path, num_threads=threads,
                                       experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.output = self.interpreter.get_output_details()[0]

    def predict_batch(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feeds = qpipe.match_inputs([d["name"] for d in self.inputs], inputs, f"the .tflite {self.path}")
        rows = []
        for i in range(len(next(iter(inputs.values())))):
            for detail in self.inputs:
                value = np.asarray(inputs[feeds[detail["name"]]][i:i + 1])  # ids stay integers
                self.interpreter.set_tensor(detail["index"], quantize_array(value, detail))
            self.interpreter.invoke()
            rows.append(dequantize_array(self.interpreter.get_tensor(self.output["index"]), self.output))
        return np.concatenate(rows, axis=0)

    def with_threads(self, threads: int) -> "ReferenceRunner":
        return self if threads == self.threads else ReferenceRunner(self.path, threads)


class Reference(qpipe.Backend):
    """Runs .tflite files with LiteRT's reference kernels (slow, but the kernels' ground truth)."""

    name = "$name.reference"
    formats = ("tflite",)
    Options = ReferenceOptions

    def load(self, artifact: qpipe.Artifact, model: qpipe.LoadedModel) -> qpipe.Runner:
        return ReferenceRunner(str(artifact.path), self.options.threads)


@qpipe.hookimpl
def qpipe_register_backends(register) -> None:
    register(Reference)
'''),
}

_TEST_HEADER = '''\
"""Tests for the '$name' plugin, written with qpipe's test kit (a real tiny model)."""

from __future__ import annotations

import $module
from qpipe.registry import Registry
from qpipe.testing import plugin_manager, run_variant, tiny_project


def test_the_${kind}_is_registered():
    registry = Registry.from_plugins(plugin_manager($module))
    assert "$component" in registry.names("$kind")


def test_the_entry_point_loads_the_plugin():
    # fails until the package is installed: python -m pip install --no-deps -e .
    pm = plugin_manager(entry_points=["$name"])
    assert Registry.from_plugins(pm).get("$kind", "$component").plugin == "$name"


'''

TEST = {
    "evaluator": Template(_TEST_HEADER + '''\
def test_the_evaluator_runs_in_a_pipeline(tmp_path):
    pm = plugin_manager(entry_points=["$name"])  # the built-in plugins plus this one, nothing else
    result = run_variant(tiny_project(tmp_path), "tflite.int8", pm=pm,
                         evaluators=["accuracy", {"name": "$name.confidence", "options": {"threshold": 0.6}}])
    assert result.status == "ok", result.error
    assert 0.25 <= result.metrics["confidence_mean"] <= 1.0
    assert 0.0 <= result.metrics["unsure_rate"] <= 1.0
'''),
    "quantizer": Template(_TEST_HEADER + '''\
def test_int8_weights_shrink_the_model_and_keep_accuracy(tmp_path):
    pm = plugin_manager(entry_points=["$name"])
    result = run_variant(tiny_project(tmp_path), "$name.dynamic", {"weights": "int8"}, pm=pm, baseline=True)
    assert result.status == "ok", result.error
    assert result.metrics["size_ratio"] > 2.0          # against the float32 baseline
    assert result.metrics["accuracy_delta"] >= -0.05
'''),
    "calibrator": Template(_TEST_HEADER + '''\
def test_int8_calibrated_with_the_first_rows(tmp_path):
    pm = plugin_manager(entry_points=["$name"])
    result = run_variant(tiny_project(tmp_path), "tflite.int8", pm=pm, baseline=True,
                         calibrator={"name": "$name.first", "options": {"count": 20}})
    assert result.status == "ok", result.error
    assert result.metrics["accuracy_delta"] >= -0.05
'''),
    "backend": Template(_TEST_HEADER + '''\
def test_reference_kernels_agree_with_the_default_backend(tmp_path):
    pm = plugin_manager(entry_points=["$name"])
    project = tiny_project(tmp_path)
    mine = run_variant(project, "tflite.int8", {"io": "int8"}, pm=pm, backend="$name.reference", name="mine")
    default = run_variant(project, "tflite.int8", {"io": "int8"}, pm=pm, name="default")
    assert mine.status == "ok", mine.error
    assert abs(mine.metrics["accuracy"] - default.metrics["accuracy"]) <= 0.02
'''),
}

COMPONENT = {"evaluator": "$name.confidence", "quantizer": "$name.dynamic",
             "calibrator": "$name.first", "backend": "$name.reference"}
