"""Run the float .tflite on calibration samples and read every intermediate tensor.

The float .tflite is the run's one conversion (``qpipe.conversion.float_tflite``), so tensor
names match the ones the TFLite converter gives the quantized model. The interpreter runs
without delegates and with ``experimental_preserve_all_tensors`` so each op's output can be
read after ``invoke``.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from qpipe import Dataset
from qpipe.conversion import tensors_by_name
from qpipe.tfenv import quiet

from qpipe_calibration.estimators import TensorStats

#: values kept per tensor for percentile/MSE/entropy (a seeded random subset beyond this)
MAX_VALUES = 1 << 18
BATCH = 64


class Probe:
    """A float .tflite interpreter that returns every activation tensor of a batch."""

    def __init__(self, flatbuffer: bytes):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        from tensorflow.lite.tools import flatbuffer_utils

        self.graph = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
        with quiet():
            self.interpreter = Interpreter(
                model_content=flatbuffer, experimental_preserve_all_tensors=True,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            self.interpreter.allocate_tensors()
        self.inputs = tensors_by_name(self.interpreter, "inputs")
        self.activations = self._activation_indices()
        self._shapes: dict[int, tuple] = {}

    def _activation_indices(self) -> dict[int, str]:
        """Float tensors that are graph inputs or op outputs (not weights), by index."""
        subgraph = self.graph.subgraphs[0]
        produced = set(subgraph.inputs.tolist() if subgraph.inputs is not None else [])
        for op in subgraph.operators:
            produced.update(int(i) for i in (op.outputs if op.outputs is not None else []) if i >= 0)
        details = {d["index"]: d for d in self.interpreter.get_tensor_details()}
        names: dict[str, list[int]] = {}
        for index in sorted(produced):
            detail = details.get(index)
            if detail is not None and np.dtype(detail["dtype"]) == np.float32:
                names.setdefault(detail["name"], []).append(index)
        return {indices[0]: name for name, indices in names.items() if len(indices) == 1}

    def run(self, batch: dict[str, np.ndarray], indices: list[int]) -> dict[int, np.ndarray]:
        """Invoke on one batch; return the requested tensors (batch-first arrays)."""
        if len(self.inputs) == 1 and len(batch) == 1:
            pairs = [(next(iter(self.inputs.values())), next(iter(batch.values())))]
        else:
            pairs = [(detail, batch[name]) for name, detail in self.inputs.items()]
        changed = False
        for detail, values in pairs:
            if self._shapes.get(detail["index"], tuple(detail["shape"])) != values.shape:
                self.interpreter.resize_tensor_input(detail["index"], list(values.shape))
                changed = True
            self._shapes[detail["index"]] = values.shape
        if changed:
            self.interpreter.allocate_tensors()
        for detail, values in pairs:
            self.interpreter.set_tensor(detail["index"], values.astype(detail["dtype"], copy=False))
        self.interpreter.invoke()
        return {i: self.interpreter.get_tensor(i) for i in indices}

    def batches(self, data: Dataset, indices: list[int]) -> Iterator[dict[int, np.ndarray]]:
        """``run`` over the whole dataset, batch by batch (one row at a time if resizing fails)."""
        size = BATCH
        start = 0
        while start < len(data):
            batch = {k: v[start:start + size] for k, v in data.inputs.items()}
            try:
                out = self.run(batch, indices)
            except (ValueError, RuntimeError):
                if size == 1:
                    raise
                size = 1
                continue
            yield out
            start += len(next(iter(batch.values())))

    # ------------------------------------------------------------------ features
    def feature_tensor(self) -> int:
        """The input of the last weighted op before the first output (penultimate features)."""
        subgraph = self.graph.subgraphs[0]
        producer = {int(o): op for op in subgraph.operators for o in (op.outputs if op.outputs is not None else [])}
        constant = self._constant_tensors()
        tensor = int(subgraph.outputs[0])
        for _ in range(len(subgraph.operators)):
            op = producer.get(tensor)
            if op is None:
                break
            inputs = [int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0]
            weighted = any(i in constant and len(subgraph.tensors[i].shape) >= 2 for i in inputs)
            dynamic = [i for i in inputs if i not in constant]
            if not dynamic:
                break
            if weighted:
                return dynamic[0]
            tensor = dynamic[0]
        return int(subgraph.outputs[0])

    def _constant_tensors(self) -> set[int]:
        subgraph = self.graph.subgraphs[0]
        buffers = self.graph.buffers
        out = set()
        for i, t in enumerate(subgraph.tensors):
            buffer = buffers[t.buffer] if 0 <= t.buffer < len(buffers) else None
            if buffer is not None and ((buffer.data is not None and len(buffer.data) > 0) or buffer.size):
                out.add(i)
        return out


def collect_statistics(probe: Probe, data: Dataset, seed: int = 0,
                       max_values: int = MAX_VALUES) -> dict[str, TensorStats]:
    """Exact min/max and up to ``max_values`` sampled values of every activation tensor."""
    indices = list(probe.activations)
    rng = np.random.default_rng(seed)
    mins = {i: math.inf for i in indices}
    maxs = {i: -math.inf for i in indices}
    kept: dict[int, list[np.ndarray]] = {i: [] for i in indices}
    counts = {i: 0 for i in indices}
    rows = len(data)
    for out in probe.batches(data, indices):
        for i, array in out.items():
            flat = np.asarray(array, dtype=np.float32).ravel()
            if flat.size == 0:
                continue
            mins[i] = min(mins[i], float(flat.min()))
            maxs[i] = max(maxs[i], float(flat.max()))
            counts[i] += flat.size
            batch_rows = max(1, array.shape[0]) if array.ndim else 1
            expected_total = flat.size / batch_rows * rows
            fraction = min(1.0, max_values / max(expected_total, 1))
            if fraction >= 1.0:
                kept[i].append(flat.copy())
            else:
                k = max(1, int(round(flat.size * fraction)))
                kept[i].append(rng.choice(flat, size=k, replace=False))
    stats = {}
    for i in indices:
        if counts[i] == 0 or not math.isfinite(mins[i]):
            continue
        name = probe.activations[i]
        values = np.concatenate(kept[i]) if kept[i] else np.zeros(0, np.float32)
        stats[name] = TensorStats(name=name, min=mins[i], max=maxs[i], values=values, count=counts[i])
    return stats


def penultimate_features(probe: Probe, data: Dataset) -> np.ndarray:
    """One flattened feature row per sample, from the tensor feeding the model's last layer."""
    index = probe.feature_tensor()
    parts = [np.asarray(out[index], dtype=np.float32).reshape(len(out[index]), -1)
             for out in probe.batches(data, [index])]
    return np.concatenate(parts, axis=0)
