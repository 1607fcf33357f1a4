"""A variant as an MLflow model: a pyfunc wrapper that predicts through the variant's backend.

MLflow has no tflite flavor (mlflow#5035), so the ``.tflite`` file is a pyfunc artifact and
``TFLiteModel`` runs it with the backend the variant was evaluated with (``litert``, with the
same options), found by name through qpipe's plugin registry: predictions are exactly those
qpipe measured. Loading such a model needs qpipe installed (the requirements say so).

This module imports MLflow at the top (``TFLiteModel`` subclasses ``PythonModel``), so it is
imported only when a variant is registered or loaded, never when the plugin loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from mlflow.pyfunc import PythonModel

import qpipe

ARTIFACT_KEY = "tflite"
MODEL_NAME = "model"


class TFLiteModel(PythonModel):
    """Runs a quantized ``.tflite`` variant with a qpipe backend (LiteRT by default).

    ``predict`` takes an array (one-input models), a dict of arrays by input name, or a
    DataFrame whose columns are inputs (each cell one sample); it returns the model's first
    output as float32, dequantized.
    """

    #: inputs are arrays, not records: no type-hint schema validation (nor MLflow's warning about it)
    _skip_type_hint_validation = True

    def __init__(self, backend: str = "litert", options: dict[str, Any] | None = None, variant: str = ""):
        self.backend = backend
        self.options = dict(options or {})
        self.variant = variant
        self._runner: Any = None
        self._batch_size = 256

    def __getstate__(self) -> dict[str, Any]:
        return {"backend": self.backend, "options": self.options, "variant": self.variant}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def load_context(self, context: Any) -> None:
        from qpipe.plugins import get_plugin_manager
        from qpipe.registry import Registry

        entry = Registry.from_plugins(get_plugin_manager()).get("backend", self.backend)
        component = entry.cls(entry.cls.Options.model_validate(self.options))
        self._runner = component.load(qpipe.Artifact(Path(context.artifacts[ARTIFACT_KEY]), "tflite"), None)
        self._batch_size = component.batch_size

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        if self._runner is None:
            self.load_context(context)
        return np.asarray(self._runner.predict(as_dataset(model_input), self._batch_size))


def as_dataset(model_input: Any) -> qpipe.Dataset:
    """pyfunc input -> a qpipe Dataset (inputs by name)."""
    if isinstance(model_input, dict):
        return qpipe.Dataset(inputs={str(k): np.asarray(v) for k, v in model_input.items()})
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):  # a pandas DataFrame
        return qpipe.Dataset(inputs={str(c): np.stack([np.asarray(x) for x in model_input[c]])
                                     for c in model_input.columns})
    return qpipe.Dataset(inputs={"input": np.asarray(model_input)})


def requirements() -> list[str]:
    """What loading the model needs: qpipe (for the backend) and the stack it was logged with."""
    out = [f"qpipe=={qpipe.__version__}"]
    for dist in ("ai-edge-litert", "mlflow", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{dist}=={metadata.version(dist)}")
    return out


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block, then restore it (and the
    ``MLFLOW_TRACKING_URI`` variable MLflow rewrites): ``Model.log`` reads only the global."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved = getattr(utils, "_tracking_uri", None)
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_and_register(uri: str, run_id: str, tflite: Path, registered_name: str, backend: dict[str, Any] | None,
                     variant: str, tags: dict[str, str]) -> tuple[str, str]:
    """Log ``tflite`` as a pyfunc model of run ``run_id`` and register it as ``registered_name``.

    Returns (model URI ``models:/NAME/VERSION``, version).
    """
    import mlflow
    from mlflow.models import Model

    backend = backend or {"name": "litert", "options": {}}
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)  # its cloudpickle advice: this class is importable qpipe code
    with tracking_uri(uri), contextlib.ExitStack() as stack:
        stack.callback(pyfunc_log.setLevel, level)
        python_model = TFLiteModel(backend=backend.get("name", "litert"), options=backend.get("options") or {},
                                   variant=variant)
        info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                         python_model=python_model, artifacts={ARTIFACT_KEY: str(tflite)}, registered_model_name=registered_name,
                         pip_requirements=requirements(), await_registration_for=60, tags=tags,
                         metadata={"qpipe_variant": variant, "qpipe_backend": python_model.backend})
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(tracking_uri=uri)
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return f"models:/{registered_name}/{version}", version
