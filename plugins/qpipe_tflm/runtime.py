"""Run a .tflite one sample per invoke, in TFLite Micro or (for comparison) in LiteRT.

Both interpreters are driven the same way: each input is matched to the data by signature
name (``qpipe.match_inputs``), quantized with its tensor's scale and zero point, set by
position, invoked, and the first signature output dequantized. ``tflite_micro`` is imported
at first use only; when it is missing the error says how to install it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qpipe import QpipeError, Runner, match_inputs
from qpipe.conversion import dequantize_array, quantize_array, tensors_by_name
from qpipe.tfenv import quiet

INSTALL_HINT = "pip install qpipe[micro]"


def require_tflm(what: str) -> None:
    """Raise one line naming ``what`` and the install command when tflite-micro is missing."""
    if importlib.util.find_spec("tflite_micro") is None:
        raise QpipeError(f"{what} needs TensorFlow Lite for Microcontrollers (the tflite-micro package): "
                         f"{INSTALL_HINT}")


def tflm_runtime(what: str = "the tflm backend") -> Any:
    """``tflite_micro.python.tflite_micro.runtime``, imported on first use."""
    require_tflm(what)
    from tflite_micro.python.tflite_micro import runtime

    return runtime


@dataclass
class Port:
    """One model input or output: its position in the graph, shape and quantization."""

    position: int
    shape: tuple[int, ...]
    detail: dict[str, Any]  # {"dtype", "quantization": (scale, zero_point)}, as qpipe.conversion wants


def ports(path: Path) -> tuple[dict[str, Port], Port]:
    """The inputs by signature name and the first signature output of the .tflite at ``path``,
    read as LiteRT reads them (so both interpreters see the same names and scales)."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet():
        interpreter = Interpreter(model_path=str(path))
    positions = {"inputs": [d["index"] for d in interpreter.get_input_details()],
                 "outputs": [d["index"] for d in interpreter.get_output_details()]}

    def port(kind: str, detail: dict) -> Port:
        return Port(positions[kind].index(detail["index"]), tuple(int(n) for n in detail["shape"]),
                    {"dtype": detail["dtype"], "quantization": detail["quantization"]})

    inputs = {name: port("inputs", d) for name, d in tensors_by_name(interpreter, "inputs").items()}
    output = next(iter(tensors_by_name(interpreter, "outputs").values()))
    return inputs, port("outputs", output)


class TFLMEngine:
    """The TFLite Micro interpreter (allocate a model only at an arena size known to work:
    TFLM can crash the process when allocation fails)."""

    def __init__(self, path: Path, arena_size: int):
        runtime = tflm_runtime()
        self.interpreter = runtime.Interpreter.from_file(str(path), arena_size=arena_size)

    def run(self, values: dict[int, np.ndarray], output: int) -> np.ndarray:
        for position, array in values.items():
            self.interpreter.set_input(array, position)
        self.interpreter.invoke()
        return self.interpreter.get_output(output)


class LiteRTEngine:
    """LiteRT's interpreter (one thread), for agreement checks: its built-in kernels, or with
    ``xnnpack`` the XNNPACK delegate the ``litert`` backend applies by default."""

    def __init__(self, path: Path, xnnpack: bool = False):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with quiet():
            self.interpreter = Interpreter(model_path=str(path), num_threads=1,
                                           experimental_op_resolver_type=resolver)
            self.interpreter.allocate_tensors()
        self.inputs = [d["index"] for d in self.interpreter.get_input_details()]
        self.outputs = [d["index"] for d in self.interpreter.get_output_details()]

    def run(self, values: dict[int, np.ndarray], output: int) -> np.ndarray:
        for position, array in values.items():
            self.interpreter.set_tensor(self.inputs[position], array)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.outputs[output])


class SampleRunner(Runner):
    """Predicts sample by sample with an engine (TFLM has no resizable batch dimension)."""

    def __init__(self, path: Path, engine: Any):
        self.path, self.engine = Path(path), engine
        self.inputs, self.output = ports(self.path)

    def _sample(self, port: Port, values: np.ndarray, name: str) -> np.ndarray:
        sample = quantize_array(np.ascontiguousarray(values), port.detail)  # ids stay integers
        if int(np.prod(port.shape)) != sample.size:
            raise QpipeError(f"{self.path.name}: input '{name}' holds {int(np.prod(port.shape))} values "
                             f"{list(port.shape)}, one sample of the data has {sample.size} "
                             f"{list(values.shape[1:])}; the model must take one sample per invoke")
        return sample.reshape(port.shape)

    def predict_batch(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feeds = match_inputs(self.inputs, inputs, f"the .tflite {self.path.name}")
        count = len(np.asarray(next(iter(inputs.values()))))
        outputs = []
        for i in range(count):
            values = {port.position: self._sample(port, np.asarray(inputs[key][i:i + 1]), name)
                      for name, key in feeds.items() for port in [self.inputs[name]]}
            outputs.append(np.array(self.engine.run(values, self.output.position), copy=True))
        return dequantize_array(np.concatenate(outputs, axis=0), self.output.detail)

    def close(self) -> None:
        self.engine = None
