"""Read a .tflite flatbuffer: the stored width of each weight tensor and the ops computing in float.

Works on the flatbuffer itself (``ai_edge_litert.tools.flatbuffer_utils``), so it sees what
the file stores (INT4 and INT2 tensors packed two or four to a byte), not what the
interpreter unpacks them to. No TensorFlow import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import qpipe

#: ops whose constant input at this position is a weight tensor
WEIGHT_INPUTS = {
    "CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "CONV_3D": 1,
    "TRANSPOSE_CONV": 1, "BATCH_MATMUL": 1, "EMBEDDING_LOOKUP": 1,
}
#: ops that only move values between float and integer (not computation)
BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}
#: ops that compute nothing (shape handling), never reported as float compute
SHAPE_OPS = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE"}

BITS = {"FLOAT32": 32, "FLOAT16": 16, "BFLOAT16": 16, "FLOAT64": 64, "INT32": 32, "INT64": 64,
        "INT16": 16, "UINT16": 16, "INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "INT2": 2}
INTEGER_ACTIVATIONS = {"INT8", "UINT8", "INT16"}


@dataclass
class Weight:
    """One weight tensor as stored: the op using it, its name, type, bit width and size."""

    op: str
    tensor: str
    dtype: str
    bits: int
    count: int
    shape: tuple[int, ...]
    scale: np.ndarray | None = None
    #: the name of the op's first output tensor (ties the weight to its op)
    output: str = ""


@dataclass
class Op:
    """One operator: its name, index and the name of its first output tensor."""

    name: str
    index: int
    output: str


class TFLiteModel:
    """A parsed .tflite (first subgraph): weights, ops, and unpacked weight values."""

    def __init__(self, content: bytes | bytearray | Path | str):
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        if isinstance(content, (str, Path)):
            content = Path(content).read_bytes()
        self.model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
        self.graph = self.model.subgraphs[0]
        self._type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self._op_names = [flatbuffer_utils.opcode_to_name(self.model, i) or "CUSTOM"
                          for i in range(len(self.model.operatorCodes))]
        self._producer = {t: op for op in self.graph.operators for t in (op.outputs if op.outputs is not None else [])}

    # ------------------------------------------------------------------ tensors
    def type_name(self, index: int) -> str:
        return self._type_names.get(self.graph.tensors[index].type, "UNKNOWN")

    def tensor_name(self, index: int) -> str:
        name = self.graph.tensors[index].name
        return name.decode() if isinstance(name, bytes) else str(name)

    def op_name(self, op: Any) -> str:
        return self._op_names[op.opcodeIndex]

    def is_constant(self, index: int) -> bool:
        tensor = self.graph.tensors[index]
        buffer = self.model.buffers[tensor.buffer] if tensor.buffer else None
        has_data = buffer is not None and (buffer.data is not None and len(buffer.data) > 0 or bool(buffer.size))
        return has_data and index not in self._producer

    def _source(self, index: int) -> int:
        """Follow a DEQUANTIZE back to the constant it reads (float16 and weight-only models)."""
        producer = self._producer.get(index)
        if producer is not None and self.op_name(producer) == "DEQUANTIZE":
            source = int(producer.inputs[0])
            if self.is_constant(source):
                return source
        return index

    # ------------------------------------------------------------------ weights
    def weights(self) -> list[Weight]:
        """Every weight tensor of a conv / dense / embedding op, as stored in the file."""
        out, seen = [], set()
        for op in self.graph.operators:
            name = self.op_name(op)
            position = WEIGHT_INPUTS.get(name)
            if position is None or op.inputs is None or len(op.inputs) <= position or op.inputs[position] < 0:
                continue
            index = self._source(int(op.inputs[position]))
            if index in seen or not self.is_constant(index):
                continue
            seen.add(index)
            tensor = self.graph.tensors[index]
            dtype = self.type_name(index)
            shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else []))
            q = tensor.quantization
            scale = None if q is None or q.scale is None or len(q.scale) == 0 else np.asarray(q.scale)
            out.append(Weight(op=name, tensor=self.tensor_name(index), dtype=dtype, bits=BITS.get(dtype, 32),
                              count=int(np.prod(shape)) if shape else 1, shape=shape, scale=scale,
                              output=self.tensor_name(int(op.outputs[0])) if op.outputs is not None else ""))
        return out

    def weight_values(self, tensor_name: str) -> np.ndarray:
        """The stored values of a weight tensor (integers unpacked from INT4/INT2), in its shape."""
        for index in range(len(self.graph.tensors)):
            if self.tensor_name(index) == tensor_name:
                break
        else:
            raise KeyError(tensor_name)
        tensor = self.graph.tensors[index]
        raw = np.asarray(self.model.buffers[tensor.buffer].data, dtype=np.uint8)
        shape = tuple(int(d) for d in tensor.shape)
        dtype = self.type_name(index)
        if dtype in ("INT4", "INT2"):
            return unpack(raw, BITS[dtype], int(np.prod(shape))).reshape(shape)
        numpy_type = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8, "UINT8": np.uint8,
                      "INT16": np.int16, "INT32": np.int32}[dtype]
        return raw.view(numpy_type).reshape(shape)

    # ------------------------------------------------------------------ ops
    def ops(self) -> list[Op]:
        out = []
        for i, op in enumerate(self.graph.operators):
            first = int(op.outputs[0]) if op.outputs is not None and len(op.outputs) else -1
            out.append(Op(self.op_name(op), i, self.tensor_name(first) if first >= 0 else ""))
        return out

    def links(self, index: int) -> tuple[list[int], list[str]]:
        """For op ``index``: the ops producing its activation inputs, and its constants' names."""
        op = self.graph.operators[index]
        position = {id(o): i for i, o in enumerate(self.graph.operators)}
        inputs = [int(t) for t in (op.inputs if op.inputs is not None else []) if t >= 0]
        producers = [position[id(self._producer[t])] for t in inputs if t in self._producer]
        return producers, [self.tensor_name(t) for t in inputs if self.is_constant(t)]

    def _activation_types(self, op: Any) -> set[str]:
        tensors = [int(t) for t in list(op.inputs if op.inputs is not None else []) +
                   list(op.outputs if op.outputs is not None else []) if t >= 0]
        return {self.type_name(t) for t in tensors if not self.is_constant(t)}

    def is_integer(self) -> bool:
        """Whether some op computes on integer activations (a full- or partly-integer model)."""
        return any(self.op_name(op) not in BOUNDARY_OPS and self._activation_types(op) & INTEGER_ACTIVATIONS
                   for op in self.graph.operators)

    def float_ops(self) -> list[Op]:
        """Ops that read or write float activations (boundary and shape ops aside)."""
        ops = self.ops()
        return [ops[i] for i, op in enumerate(self.graph.operators)
                if self.op_name(op) not in BOUNDARY_OPS | SHAPE_OPS
                and self._activation_types(op) & {"FLOAT32", "FLOAT16"}]


def unpack(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Signed ``bits``-bit integers packed low bits first (LiteRT's INT4/INT2 layout)."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = np.stack([(raw >> (k * bits)) & mask for k in range(per_byte)], axis=1).reshape(-1)[:count]
    values = parts.astype(np.int8)
    values[values >= 1 << (bits - 1)] -= 1 << bits
    return values


@dataclass
class Report:
    """What ``inspect_tflite`` found: weight widths and, for integer models, float ops."""

    weights: list[Weight]
    integer: bool
    float_ops: list[Op]

    @property
    def bits_per_weight(self) -> float | None:
        """Stored bits per weight element, averaged over every weight tensor."""
        total = sum(w.count for w in self.weights)
        return sum(w.bits * w.count for w in self.weights) / total if total else None

    def wider(self) -> list[Weight]:
        """Weight tensors stored wider than the narrowest one (the layers that stayed wider)."""
        if not self.weights:
            return []
        narrowest = min(w.bits for w in self.weights)
        return [w for w in self.weights if w.bits > narrowest]


def inspect_tflite(content: bytes | bytearray | Path | str) -> Report:
    """Read a .tflite and report its weight widths and the ops left computing in float."""
    model = TFLiteModel(content)
    integer = model.is_integer()
    return Report(weights=model.weights(), integer=integer, float_ops=model.float_ops() if integer else [])


# --------------------------------------------------------------------------- evaluator


class Storage(qpipe.Evaluator):
    """Stored weight width (bits_per_weight) and, for integer models, ops left in float (float_ops)."""

    name = "storage"
    default_order = 50  # runs when a pipeline lists no evaluators (after size)
    metrics = ("bits_per_weight", "float_ops")
    lower_is_better = metrics
    role = "cost"

    def evaluate(self, ctx: qpipe.EvalContext) -> dict[str, float]:
        artifact = ctx.artifact
        if artifact is None or artifact.format != "tflite" or not artifact.path.is_file():
            return {}
        report = inspect_tflite(artifact.path)
        metrics: dict[str, float] = {}
        if report.bits_per_weight is not None:
            metrics["bits_per_weight"] = round(report.bits_per_weight, 4)
        wider = report.wider()
        if wider:
            ctx.record("wider_weights", [{"op": w.op, "tensor": w.tensor, "dtype": w.dtype, "count": w.count}
                                         for w in wider])
        if report.integer:  # a warning comes from the sanity check (qpipe_litert.checks), when unintended
            metrics["float_ops"] = float(len(report.float_ops))
            if report.float_ops:
                ctx.record("float_ops", [f"{op.name} ({op.output})" for op in report.float_ops])
        return metrics
