"""Each variant as an MLflow 3 logged model, and registering one.

A variant becomes a ``LoggedModel`` (``models:/m-<id>``) whose source run is its child run
and which carries the child's params and its final metrics, so the experiment's **Models**
tab lists every variant side by side. A ``.tflite`` variant is a pyfunc model from code
(``tflite_model.py``, which imports no qpipe) with an input/output signature read from the
file, an input example and the requirements ``ai-edge-litert`` and ``numpy``: it loads and
serves (``mlflow models serve --env-manager local``) without qpipe. Any other artifact is
logged as the model's files. Imported only when tracking is on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ARTIFACT_KEY = "tflite"  # the artifact name tflite_model.py reads
CODE = Path(__file__).with_name("tflite_model.py")
MODEL_TYPE = "tflite"
#: the litert backend options the served model keeps, so it predicts as qpipe measured
CONFIG_KEYS = ("threads", "batch_size", "xnnpack")


def requirements() -> list[str]:
    """What loading a variant's model needs: LiteRT and numpy, at the versions logged with."""
    out = []
    for dist in ("ai-edge-litert", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{dist}=={metadata.version(dist)}")
    return out


def signature_and_example(tflite: Path) -> tuple[Any, Any]:
    """The model's input/output tensor signature (batch dimension free) and a 2-sample example."""
    from ai_edge_litert.interpreter import Interpreter
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    interpreter = Interpreter(model_path=str(tflite))
    signatures = interpreter.get_signature_list()
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures), None)
    details = {d["index"]: d for d in interpreter.get_input_details() + interpreter.get_output_details()}
    if key is None:
        inputs = {d["name"]: d for d in interpreter.get_input_details()}
        outputs = {d["name"]: d for d in interpreter.get_output_details()[:1]}
    else:
        runner = interpreter.get_signature_runner(key)
        inputs = {n: details[d["index"]] for n, d in runner.get_input_details().items()}
        outputs = {n: details[d["index"]] for n, d in list(runner.get_output_details().items())[:1]}

    def shape(detail: dict) -> list[int]:
        dims = [int(s) for s in (detail.get("shape_signature") if len(detail.get("shape_signature", ())) else
                                 detail["shape"])]
        return [-1, *dims[1:]] if dims else dims

    def spec(name: str | None, detail: dict) -> Any:
        return TensorSpec(np.dtype("float32"), shape(detail), name)  # float in, float out (quantized inside)

    one = len(inputs) == 1
    signature = ModelSignature(inputs=Schema([spec(None if one else n, d) for n, d in inputs.items()]),
                               outputs=Schema([spec(None, d) for d in outputs.values()]))
    example = {n: np.zeros([2, *[max(1, s) for s in shape(d)[1:]]], np.float32) for n, d in inputs.items()}
    return signature, (next(iter(example.values())) if one else example)


def model_config(backend: dict[str, Any] | None) -> dict[str, Any]:
    """The interpreter settings the variant was evaluated with (litert backend options)."""
    options = (backend or {}).get("options") or {}
    return {k: options[k] for k in CONFIG_KEYS if k in options}


def log_variant_model(client: Any, experiment_id: str, run_id: str, name: str, artifact: Path | None,
                      backend: dict[str, Any] | None, params: dict[str, str], tags: dict[str, str]) -> str:
    """Create the variant's LoggedModel on run ``run_id``, upload its files, mark it READY; its id."""
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=params,
                                       tags=tags, model_type=MODEL_TYPE)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="qpipe-model-") as tmp:
            local = Path(tmp) / "model"
            if artifact is not None and artifact.is_file() and artifact.suffix == ".tflite":
                save_pyfunc(local, artifact, model_config(backend), model, run_id)
            else:
                local.mkdir()
                if artifact is not None and artifact.is_dir():
                    shutil.copytree(artifact, local / artifact.name)
                elif artifact is not None:
                    shutil.copy(artifact, local / artifact.name)
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def save_pyfunc(local: Path, tflite: Path, config: dict[str, Any], model: Any, run_id: str) -> None:
    """Write the pyfunc model folder (code, .tflite, MLmodel with signature and example)."""
    import logging

    import mlflow.pyfunc
    from mlflow.models import Model

    signature, example = signature_and_example(tflite)
    mlflow_model = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                         model_id=model.model_id, metadata={"qpipe_artifact": tflite.name})
    log = logging.getLogger("mlflow")
    level = log.level
    log.setLevel(logging.ERROR)  # "validating input example..." at INFO on every variant
    try:
        mlflow.pyfunc.save_model(str(local), python_model=str(CODE), artifacts={ARTIFACT_KEY: str(tflite)},
                                 model_config=config or None, signature=signature, input_example=example,
                                 pip_requirements=requirements(), mlflow_model=mlflow_model)
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block, then restore it (and the
    ``MLFLOW_TRACKING_URI`` variable MLflow rewrites): ``register_model`` reads only the global."""
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


def register(uri: str, model_id: str, registered_name: str, tags: dict[str, str]) -> str:
    """Register logged model ``model_id`` as a new version of ``registered_name``; ``models:/NAME/V``."""
    import mlflow

    with tracking_uri(uri):
        version = mlflow.register_model(f"models:/{model_id}", registered_name, await_registration_for=60,
                                        tags=tags)
    return f"models:/{registered_name}/{version.version}"
