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
import datetime
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qpipe.conversion import tensors_by_name
from qpipe.results import copy_without_links
from qpipe_mlflow.store import say

ARTIFACT_KEY = "tflite"  # the artifact name tflite_model.py reads
CODE = Path(__file__).with_name("tflite_model.py")
MODEL_TYPE = "tflite"
TFLITE = "model.tflite"  # the artifact's file name inside every model folder
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
    inputs = tensors_by_name(interpreter, "inputs")  # named as the signature names them, as qpipe runs it
    outputs = dict(list(tensors_by_name(interpreter, "outputs").items())[:1])

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


class ModelFolders:
    """Writes the pyfunc model folders of one run. The first folder for a given signature and
    config goes through ``mlflow.pyfunc.save_model`` (requirements resolved and checked, the
    example predicted), or is copied from a template an earlier run kept in ``keep`` (qpipe's
    cache folder; see templates.py); the others copy it, swap in their own ``.tflite`` and set
    their identity in MLmodel: MLflow's checks cost a second a run. Call ``close`` at the end."""

    def __init__(self, keep: Path | None = None) -> None:
        self._root = tempfile.TemporaryDirectory(prefix="qpipe-models-")
        self._templates: dict[str, Path] = {}
        self._keep = keep
        self.reused = 0  # templates copied from ``keep`` instead of saved by MLflow

    def write(self, local: Path, tflite: Path, config: dict[str, Any], model: Any, run_id: str) -> None:
        """The pyfunc folder of ``tflite`` (logged model ``model`` of run ``run_id``) at ``local``."""
        from mlflow.models import Model

        signature, example = signature_and_example(tflite)
        key = json.dumps([signature.to_dict(), config], sort_keys=True)
        if key not in self._templates:
            self._templates[key] = self._template(len(self._templates), tflite, config, signature, example)
        template = self._templates[key]
        shutil.copytree(template, local,
                        ignore=lambda folder, names: [TFLITE] if Path(folder).name == "artifacts" else [])
        (local / "artifacts").mkdir(exist_ok=True)
        shutil.copy(tflite, local / "artifacts" / TFLITE)
        mlmodel = Model.load(str(local / "MLmodel"))
        mlmodel.run_id, mlmodel.model_uuid, mlmodel.model_id = run_id, model.model_id, model.model_id
        mlmodel.artifact_path = model.artifact_location
        mlmodel.metadata = {"qpipe_artifact": tflite.name}
        mlmodel.utc_time_created = str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
        mlmodel.flavors["python_function"]["artifacts"][ARTIFACT_KEY]["uri"] = str(tflite)
        mlmodel.model_size_bytes = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
        mlmodel.save(str(local / "MLmodel"))

    def _template(self, index: int, tflite: Path, config: dict[str, Any], signature: Any, example: Any) -> Path:
        from qpipe_mlflow import templates

        needs = requirements()
        name = templates.key(CODE, signature.to_dict(), config, needs)
        kept = templates.fetch(self._keep, name, Path(self._root.name) / f"kept-{index}", CODE, needs)
        if kept is not None:
            self.reused += 1
            return kept
        folder = self._save(index, tflite, config, signature, example, needs)
        templates.store(self._keep, name, folder)
        return folder

    def _save(self, index: int, tflite: Path, config: dict[str, Any], signature: Any, example: Any,
              needs: list[str]) -> Path:
        import logging

        import mlflow.pyfunc

        folder = Path(self._root.name) / str(index)
        staged = folder.with_suffix(".in")
        staged.mkdir()
        shutil.copy(tflite, staged / TFLITE)  # the same artifact path in every model
        log = logging.getLogger("mlflow")
        level = log.level
        log.setLevel(logging.ERROR)  # "validating input example..." at INFO
        try:
            mlflow.pyfunc.save_model(str(folder), python_model=str(CODE),
                                     artifacts={ARTIFACT_KEY: str(staged / TFLITE)},
                                     model_config=config or None, signature=signature, input_example=example,
                                     pip_requirements=needs)
        finally:
            log.setLevel(level)
        return folder

    def close(self) -> None:
        self._root.cleanup()


def log_variant_model(client: Any, experiment_id: str, run_id: str, name: str, artifact: Path | None,
                      backend: dict[str, Any] | None, params: dict[str, str], tags: dict[str, str],
                      folders: ModelFolders) -> str:
    """Create the variant's LoggedModel on run ``run_id``, upload its files, mark it READY; its id."""
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=params,
                                       tags=tags, model_type=MODEL_TYPE)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="qpipe-model-") as tmp:
            local = Path(tmp) / "model"
            if artifact is not None and artifact.is_file() and artifact.suffix == ".tflite":
                folders.write(local, artifact, model_config(backend), model, run_id)
            else:
                local.mkdir()
                if artifact is not None and not artifact.is_symlink():
                    for link in copy_without_links(artifact, local / artifact.name):
                        say(f"{artifact.name}/{link} is a symbolic link; it was not logged with the model")
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


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
