"""Safe mode: refuse a model file whose config or graph can run code, before any loader reads it.

Keras' own ``safe_mode`` covers only the ``.keras`` format: tf_keras' ``.h5`` loader rebuilds a
``Lambda`` layer's stored bytecode and runs it whatever ``safe_mode`` says, and the file's own
``keras_version`` picks the loader. So under ``model.safe_mode: true`` (the default) qpipe reads
the stored config itself first (``model_config``/``training_config`` of an ``.h5``,
``config.json`` of a ``.keras``) and refuses Lambda layers, Python functions, classes from
outside Keras and unregistered custom objects, at any nesting depth; and it reads a SavedModel's
graph (every function of its library) and refuses ops that touch files, call Python or reach
other machines. Each refusal names the layer or op and how to opt out.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from qpipe import QpipeError
from qpipe.tfenv import keras3, tensorflow, tf_keras

OPT_OUT = "set model.safe_mode: false only if you trust the file (qpipe then runs the code it holds)"

#: class names whose config carries Python code (bytecode or a function to import)
CODE_CLASSES = {
    "Lambda": "a Lambda layer (its Python code is stored in the file and runs on load)",
    "__lambda__": "a Python lambda (its bytecode is stored in the file)",
    "DropoutWrapper": "an RNN cell wrapper holding a stored Python function",
    "ResidualWrapper": "an RNN cell wrapper holding a stored Python function",
}
#: tf_keras layers that call a TensorFlow API function named in the file
TF_OP_LAYERS = ("TFOpLambda", "SlicingOpLambda")
#: modules of the TensorFlow functions a TFOpLambda may call (pure tensor math)
TF_MATH_MODULES = re.compile(
    r"tensorflow\.python\.ops\.(array_ops|array_ops_stack|gen_array_ops|math_ops|gen_math_ops|nn_ops|"
    r"gen_nn_ops|nn_impl|clip_ops|special_math_ops|image_ops_impl|gen_image_ops|tensor_getitem_override|"
    r"tensor_math_operator_overrides|linalg_ops|gen_linalg_ops|sort_ops|check_ops|random_ops|"
    r"stateless_random_ops|embedding_ops|bitwise_ops|gen_bitwise_ops|signal\.\w+|linalg\.\w+)$")
#: Keras sub-namespaces a stored ``function`` may come from
FUNCTION_MODULES = re.compile(r"^(tf_)?keras(\.src)?(\.\w+)*\.(activations|losses|metrics)(\.\w+)?$")
#: the TF-Keras namespaces whose classes a legacy (.h5) config may name without a module
BUILTIN_NAMESPACES = ("layers", "initializers", "regularizers", "constraints", "optimizers", "losses",
                      "metrics", "activations", "models", "mixed_precision", "dtype_policies")

#: SavedModel ops that read or write files, run Python, or talk to other processes; TF's own
#: ``saved_model_cli scan`` denylists ReadFile, WriteFile and PrintV2
DENIED_OPS = {
    "ReadFile", "WriteFile", "PrintV2", "MatchingFiles", "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "ExecuteTFLite", "ImmutableConst", "LoadAndRemapMatrix", "RemoteCall", "Send", "Recv", "_Send",
    "_Recv", "RecordInput", "DecodeProtoV2", "EncodeProto", "WorkerHeartbeat", "DistributedSave",
    "Save", "SaveSlices", "Restore", "RestoreSlice", "SaveV2", "RestoreV2", "MergeV2Checkpoints",
}
DENIED_PATTERN = re.compile(r"File|Reader|Summary|PyFunc|Dataset|Iterator|^Debug|Snapshot|Collective|Nccl|"
                            r"^Infeed|^Outfeed|TPU|^Save|^Restore")
#: ops the SavedModel's own saver functions may use (restore reads the model's variables folder)
SAVER_OPS = {"save": {"SaveV2", "MergeV2Checkpoints", "ShardedFilename"}, "restore": {"RestoreV2"}}


def refuse(path: Path, what: str) -> QpipeError:
    return QpipeError(f"model: {path.name}: refused in safe mode: {what}; {OPT_OUT}")


# --------------------------------------------------------------------------- Keras files


def stored_configs(path: Path) -> tuple[list[Any], str | None]:
    """The JSON configs a loader would deserialize from a .keras or .h5 file, and the Keras
    version recorded in it (None if none is)."""
    import h5py

    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as zf:
                meta = json.loads(zf.read("metadata.json")) if "metadata.json" in zf.namelist() else {}
                configs = [json.loads(zf.read("config.json"))]
            version = meta.get("keras_version")
        else:
            with h5py.File(path, "r") as f:
                texts = [f.attrs.get(name) for name in ("model_config", "training_config")]
                version = f.attrs.get("keras_version")
            configs = [json.loads(t.decode() if isinstance(t, bytes) else t) for t in texts if t is not None]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise QpipeError(f"model: {path.name} is not a readable Keras file: {exc}") from None
    return configs, (version.decode() if isinstance(version, bytes) else None if version is None else str(version))


def check_keras_file(path: Path) -> None:
    """Raise when the stored config of ``path`` (.keras or .h5) names code."""
    configs, version = stored_configs(path)
    flavor = "keras3" if (version or "3").startswith("3") else "tf_keras"
    for config in configs:
        for where, node in _objects(config, ()):
            problem = _unsafe_object(node, flavor)
            if problem:
                raise refuse(path, f"{problem} (in {where or 'the model'})")


def _objects(value: Any, where: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """Every serialized object (a dict with a ``class_name``) inside ``value``, with its path."""
    if isinstance(value, dict):
        cls = value.get("class_name")
        if isinstance(cls, str) or value.get("function_type") == "lambda":
            yield " > ".join(where), value
        if isinstance(cls, str):
            name = _name(value)
            where = where + (f"{cls} '{name}'" if name else cls,)
        for item in value.values():
            yield from _objects(item, where)
    elif isinstance(value, list):
        for item in value:
            yield from _objects(item, where)


def _name(node: dict) -> str | None:
    config = node.get("config")
    return config.get("name") if isinstance(config, dict) else node.get("name")


def _unsafe_object(node: dict, flavor: str) -> str | None:
    """Why the serialized object ``node`` can run code, or None."""
    cls = node.get("class_name")
    label = f"'{_name(node)}' " if _name(node) else ""
    if node.get("function_type") == "lambda":
        return f"layer {label}stores Python bytecode"
    if not isinstance(cls, str):
        return None
    if cls in CODE_CLASSES:
        return f"layer {label}is {CODE_CLASSES[cls]}"
    module = node.get("module")
    if cls == "function":
        if not (isinstance(module, str) and (module == "builtins" or FUNCTION_MODULES.match(module))):
            return f"function '{node.get('config')}' from module '{module}' is not a Keras activation, loss or metric"
        return None
    if module is not None:
        if not isinstance(module, str) or not re.match(r"^(tf_)?keras(\.|$)", module):
            return f"class '{cls}' from module '{module}' is not part of Keras (a custom object)"
        if not _keras_class(module, cls, flavor) and not _registered(node.get("registered_name") or cls, flavor):
            return f"'{cls}' from module '{module}' is not a Keras class"
        return None
    if cls in TF_OP_LAYERS:
        return _unsafe_tf_op(node, label)
    if cls.startswith("__") or cls in builtin_names(flavor) or _registered(node.get("registered_name") or cls, flavor):
        return None
    return f"class '{cls}' is not a Keras built-in nor registered (an unregistered custom object)"


def _unsafe_tf_op(node: dict, label: str) -> str | None:
    tensorflow()
    from tensorflow.python.util import tf_export

    symbol = (node.get("config") or {}).get("function")
    target = tf_export.get_symbol_from_name(symbol) if isinstance(symbol, str) else None
    module = getattr(target, "__module__", "") or ""
    if target is None or not TF_MATH_MODULES.match(module):
        return f"layer {label}calls tf.{symbol}, which is not a tensor-math function"
    return None


@functools.lru_cache(maxsize=2)
def builtin_names(flavor: str) -> frozenset[str]:
    """Class names of the Keras built-ins a legacy config may name."""
    keras = tf_keras() if flavor == "tf_keras" else keras3()
    names = {"Functional", "Sequential", "Model"}
    for space in BUILTIN_NAMESPACES:
        module = getattr(keras, space, None)
        names.update(n for n in dir(module) if isinstance(getattr(module, n, None), type))
    return frozenset(names)


def _keras_class(module: str, cls: str, flavor: str) -> bool:
    """Whether ``module.cls`` is a class of the Keras that will load the file (not a function)."""
    if flavor == "tf_keras" and not module.startswith("tf_"):
        module = "tf_" + module  # tf_keras stores its own modules as keras.*
    try:
        return isinstance(getattr(importlib.import_module(module), cls, None), type)
    except ImportError:
        return False


def _registered(cls: str, flavor: str) -> bool:
    keras = tf_keras() if flavor == "tf_keras" else keras3()
    return keras.saving.get_registered_object(cls) is not None


# --------------------------------------------------------------------------- SavedModels


def check_saved_model(path: Path) -> None:
    """Raise when the graph of the SavedModel folder ``path`` holds an op that can run code."""
    tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise QpipeError(f"model: {path.name}/saved_model.pb is not a readable SavedModel: {exc}") from None
    for meta in proto.meta_graphs:
        if not meta.HasField("object_graph_def"):
            raise refuse(path, "a TF1-format SavedModel (no object graph) runs its init and saver ops on "
                               "load, which cannot be checked; re-save it with tf.saved_model.save")
        saver = _saver_functions(meta)
        for where, op in _graph_ops(meta):
            if _denied(op) and op not in SAVER_OPS.get(saver.get(where, ""), ()):
                raise refuse(path, f"{where} uses op {op} (file access, Python calls or I/O run when "
                                   "the model is loaded or called)")


def _denied(op: str) -> bool:
    return op in DENIED_OPS or bool(DENIED_PATTERN.search(op))


def _graph_ops(meta: Any) -> Iterator[tuple[str, str]]:
    for node in meta.graph_def.node:
        yield "the main graph", node.op
    for function in meta.graph_def.library.function:
        for node in function.node_def:
            yield f"function '{function.signature.name}'", node.op


def _saver_functions(meta: Any) -> dict[str, str]:
    """``{"function 'NAME'": "save" | "restore"}`` for the SavedModel's own saver functions:
    those the saver_def's nodes call and nothing else does."""
    calls: dict[str, list[str]] = {}  # function -> callers
    nodes = {node.name: node for node in meta.graph_def.node}
    for node in meta.graph_def.node:
        for callee in _callees(node):
            calls.setdefault(callee, []).append(node.name)
    for function in meta.graph_def.library.function:
        for node in function.node_def:
            for callee in _callees(node):
                calls.setdefault(callee, []).append(f"{function.signature.name}/{node.name}")
    found = {}
    for kind, tensor in (("save", meta.saver_def.save_tensor_name), ("restore", meta.saver_def.restore_op_name)):
        node = nodes.get(tensor.lstrip("^").split(":")[0])
        for callee in _callees(node) if node is not None else ():
            if calls.get(callee) == [node.name]:
                found[f"function '{callee}'"] = kind
    return found


def _callees(node: Any) -> list[str]:
    names = [value.func.name for value in node.attr.values() if value.HasField("func")]
    names += [f.name for value in node.attr.values() if value.HasField("list") for f in value.list.func]
    return names
