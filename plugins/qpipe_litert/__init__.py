"""Built-in plugin: the ``litert`` backend runs ``.tflite`` files with ``ai_edge_litert``.

Batched (the batch dimension is resized to fit; a model whose batch dimension is fixed, e.g. a
batch-1 export, gets that many samples per invoke, the last group padded), multi-threaded, and transparent about
quantized inputs and outputs: float data is quantized with each input tensor's scale and
zero point, integer outputs are dequantized with the output tensor's. A model with several
outputs gives every one of them, by signature name. It also checks every
.tflite against what its quantizer claimed (``qpipe_check_artifact``, ``qpipe_litert.checks``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from pydantic import Field, field_validator

import qpipe
from qpipe import Artifact, Backend, LoadedModel, QpipeError, Runner, clamp_threads, match_inputs
from qpipe.conversion import dequantize_array, quantize_array, tensors_by_name
from qpipe.tfenv import quiet


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class LiteRTOptions(qpipe.Options):
    threads: int = Field(default_factory=default_threads, ge=1, description="interpreter threads")
    batch_size: int = Field(256, ge=1, description="samples per invoke during evaluation")
    xnnpack: bool = Field(True, description="use the XNNPACK delegate (else the built-in kernels)")

    @field_validator("threads")
    @classmethod
    def _at_most_cpus(cls, value: int) -> int:
        return clamp_threads(value, "backend litert")


class LiteRTRunner(Runner):
    """One interpreter; inputs matched by signature name (or position for one input)."""

    def __init__(self, path: str, threads: int, xnnpack: bool):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.path, self.threads, self.xnnpack = path, threads, xnnpack
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            with quiet():
                self.interpreter = Interpreter(model_path=path, num_threads=threads,
                                               experimental_op_resolver_type=resolver)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise QpipeError(f"LiteRT cannot load {os.path.basename(path)}: {exc}") from exc
        self.inputs = tensors_by_name(self.interpreter, "inputs")
        self.outputs = tensors_by_name(self.interpreter, "outputs")  # every output, by signature name
        self.output = next(iter(self.outputs.values()))
        self._shapes = {d["index"]: tuple(d["shape"]) for d in self.interpreter.get_input_details()}
        self.fixed_batch = fixed_batch(self.inputs)

    def _resize(self, pairs: list[tuple[dict, np.ndarray]]) -> None:
        """Resize every input whose shape changed, then re-allocate once."""
        changed = False
        for detail, values in pairs:
            index = detail["index"]
            if self._shapes.get(index) != values.shape:
                self.interpreter.resize_tensor_input(index, list(values.shape))
                self._shapes[index] = values.shape
                changed = True
        if changed:
            self.interpreter.allocate_tensors()

    def predict_batch(self, inputs: dict[str, np.ndarray]) -> Any:
        """The outputs for a batch of any size; a model with a fixed batch dimension is fed
        exactly that many samples per invoke (the last group padded, its padding dropped)."""
        batch = self.fixed_batch
        if batch is None:
            return self._invoke(inputs)
        arrays = {key: np.asarray(values) for key, values in inputs.items()}
        count = len(next(iter(arrays.values())))
        parts = []
        for start in range(0, count, batch):
            group = {key: values[start:start + batch] for key, values in arrays.items()}
            size = len(next(iter(group.values())))
            if size < batch:  # repeat the last sample: the padding is dropped below
                group = {key: np.concatenate([values, np.repeat(values[-1:], batch - size, axis=0)])
                         for key, values in group.items()}
            parts.append(_rows(self._invoke(group), size))
        return _joined(parts)

    def _invoke(self, inputs: dict[str, np.ndarray]) -> Any:
        """The output's array; ``{signature output name: array}`` for a model with several."""
        feeds = match_inputs(self.inputs, inputs, "the .tflite")
        pairs = [(self.inputs[name], np.asarray(inputs[key])) for name, key in feeds.items()]
        self._resize(pairs)
        for detail, values in pairs:
            self.interpreter.set_tensor(detail["index"], quantize_array(values, detail))
        self.interpreter.invoke()
        if len(self.outputs) == 1:
            return dequantize_array(self.interpreter.get_tensor(self.output["index"]), self.output)
        return {name: dequantize_array(self.interpreter.get_tensor(detail["index"]), detail)
                for name, detail in self.outputs.items()}

    def with_threads(self, threads: int) -> "LiteRTRunner":
        return self if threads == self.threads else LiteRTRunner(self.path, threads, self.xnnpack)

    def close(self) -> None:
        self.interpreter = None


def fixed_batch(inputs: dict[str, dict]) -> int | None:
    """The batch a .tflite's inputs are fixed to (``shape_signature[0]`` not -1), else None."""
    for detail in inputs.values():
        signature = detail.get("shape_signature")
        dims = signature if signature is not None and len(signature) else detail["shape"]
        if len(dims) and int(dims[0]) > 0 and (signature is None or int(signature[0]) != -1):
            return int(dims[0])
    return None


def _rows(outputs: Any, count: int) -> Any:
    """The first ``count`` rows of an output (or of each output of a dict or list of them)."""
    if isinstance(outputs, dict):
        return {name: values[:count] for name, values in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return [values[:count] for values in outputs]
    return outputs[:count]


def _joined(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    if isinstance(parts[0], list):
        return [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]
    return np.concatenate(parts)


class LiteRTBackend(Backend):
    """Runs .tflite models with the LiteRT interpreter (ai_edge_litert)."""

    name = "litert"
    formats = ("tflite",)
    default_for = ("tflite",)  # runs a .tflite variant that names no backend
    Options = LiteRTOptions

    def load(self, artifact: Artifact, model: LoadedModel | None = None) -> Runner:
        return LiteRTRunner(str(artifact.path), self.options.threads, self.options.xnnpack)


@qpipe.hookimpl
def qpipe_register_backends(register: Any) -> None:
    register(LiteRTBackend)


@qpipe.hookimpl
def qpipe_register_quantizers(register: Any) -> None:
    from qpipe_litert.aiq import Int4
    from qpipe_litert.mixed import Mixed

    register(Int4)
    register(Mixed)


@qpipe.hookimpl
def qpipe_register_evaluators(register: Any) -> None:
    from qpipe_litert.inspect import Storage

    register(Storage)


@qpipe.hookimpl
def qpipe_check_artifact(artifact: Artifact, expects: Any) -> Any:
    from qpipe_litert.checks import check_tflite

    return check_tflite(artifact, expects)
