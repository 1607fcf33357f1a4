"""A ``.tflite`` variant as an MLflow pyfunc model, with no qpipe inside.

MLflow has no tflite flavor (mlflow#5035). qpipe logs every variant as a pyfunc model from
code: this file is copied into the model folder and run by ``mlflow.pyfunc.load_model``
(or ``mlflow models serve``), so a model loads with only its declared requirements
(``ai-edge-litert``, ``numpy``, ``mlflow``). It must therefore import nothing from qpipe:
it reads the ``.tflite`` artifact and the model config (``threads``, ``batch_size``,
``xnnpack``) qpipe evaluated the variant with, and predicts exactly as qpipe's ``litert``
backend does: float inputs quantized with each input tensor's scale and zero point, the
first output dequantized to float32, batch by batch.
"""

from __future__ import annotations

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "tflite"


def _to_tensor(values, detail):
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind == "f" or not scale:
        return values.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    q = np.divide(values, np.float32(scale), dtype=np.float32)
    q += np.float32(zero_point)
    np.rint(q, out=q)
    np.clip(q, info.min, info.max, out=q)
    return q.astype(dtype)


def _from_tensor(values, detail):
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f" or not scale:
        return values.astype(np.float32, copy=False)
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _columns(model_input):
    """An array (one input), a dict of arrays, or a DataFrame (one column per input, a cell per sample)."""
    if isinstance(model_input, dict):
        return {str(k): np.asarray(v) for k, v in model_input.items()}
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):
        return {str(c): np.stack([np.asarray(x) for x in model_input[c]]) for c in model_input.columns}
    return {"": np.asarray(model_input)}


class TFLiteModel(PythonModel):
    """Predicts with the LiteRT interpreter; returns the first output as float32."""

    _skip_type_hint_validation = True  # arrays, not records

    def load_context(self, context):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        config = dict(context.model_config or {})
        resolver = (OpResolverType.AUTO if config.get("xnnpack", True)
                    else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        self.batch_size = int(config.get("batch_size", 256))
        self.interpreter = Interpreter(model_path=context.artifacts[ARTIFACT_KEY],
                                       num_threads=int(config.get("threads", 1)),
                                       experimental_op_resolver_type=resolver)
        self.interpreter.allocate_tensors()
        details = {d["index"]: d for d in self.interpreter.get_input_details()}
        signatures = self.interpreter.get_signature_list()
        key = "serving_default" if "serving_default" in signatures else next(iter(signatures), None)
        if key is None:
            self.inputs = {d["name"]: d for d in details.values()}
            self.output = self.interpreter.get_output_details()[0]
            return
        runner = self.interpreter.get_signature_runner(key)
        self.inputs = {name: details[d["index"]] for name, d in runner.get_input_details().items()}
        outputs = {d["index"]: d for d in self.interpreter.get_output_details()}
        self.output = outputs[next(iter(runner.get_output_details().values()))["index"]]

    def _feeds(self, columns):
        if len(self.inputs) == 1 and len(columns) == 1:
            return {next(iter(self.inputs)): next(iter(columns.values()))}
        missing = sorted(set(self.inputs) - set(columns))
        if missing:
            raise ValueError(f"the model's inputs are {sorted(self.inputs)}; missing {missing}")
        return {name: columns[name] for name in self.inputs}

    def _invoke(self, feeds):
        shapes = {d["index"]: tuple(d["shape"]) for d in self.interpreter.get_input_details()}
        changed = [n for n, v in feeds.items() if shapes[self.inputs[n]["index"]] != v.shape]
        for name in changed:
            self.interpreter.resize_tensor_input(self.inputs[name]["index"], list(feeds[name].shape))
        if changed:
            self.interpreter.allocate_tensors()
        for name, values in feeds.items():
            self.interpreter.set_tensor(self.inputs[name]["index"], _to_tensor(values, self.inputs[name]))
        self.interpreter.invoke()
        return _from_tensor(self.interpreter.get_tensor(self.output["index"]), self.output)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        feeds = self._feeds(_columns(model_input))
        count = len(next(iter(feeds.values())))
        parts = [self._invoke({k: v[start:start + self.batch_size] for k, v in feeds.items()})
                 for start in range(0, count, self.batch_size)]
        return np.concatenate(parts, axis=0)


set_model(TFLiteModel())
