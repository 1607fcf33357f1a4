"""The ``onnxruntime`` backend: runs ``.onnx`` artifacts with an ONNX Runtime CPU session."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
from pydantic import Field

import qpipe
from qpipe import Artifact, Backend, LoadedModel, QpipeError, Runner, match_inputs

#: ONNX tensor types -> numpy dtypes for the inputs we feed
_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
           "tensor(uint8)": np.uint8}


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class OrtOptions(qpipe.Options):
    threads: int = Field(default_factory=default_threads, ge=1, description="intra-op threads")
    batch_size: int = Field(256, ge=1, description="samples per run during evaluation")
    optimization: Literal["disabled", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level")


class OrtRunner(Runner):
    """One ``onnxruntime.InferenceSession`` on the CPU; the first output is returned."""

    def __init__(self, path: str, threads: int, optimization: str):
        import onnxruntime as ort

        self.path, self.threads, self.optimization = path, threads, optimization
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise QpipeError(f"onnxruntime cannot load {os.path.basename(path)}: {exc}") from exc
        self.inputs = {i.name: _DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0].name

    def predict_batch(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: np.asarray(inputs[key], dtype=self.inputs[name])
                 for name, key in match_inputs(self.inputs, inputs, "the .onnx").items()}
        return np.asarray(self.session.run([self.output], feeds)[0], dtype=np.float32)

    def with_threads(self, threads: int) -> "OrtRunner":
        return self if threads == self.threads else OrtRunner(self.path, threads, self.optimization)

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend(Backend):
    """Runs .onnx models with ONNX Runtime (CPU execution provider)."""

    name = "onnxruntime"
    formats = ("onnx",)
    Options = OrtOptions

    def load(self, artifact: Artifact, model: LoadedModel | None = None) -> Runner:
        return OrtRunner(str(artifact.path), self.options.threads, self.options.optimization)
