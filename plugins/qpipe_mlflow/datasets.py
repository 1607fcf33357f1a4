"""The run's data files as MLflow dataset inputs: name, digest, source, schema.

Each data section of results.json (``evaluation``, ``calibration``, ``training``, …) becomes
one ``Dataset`` named ``<file stem>-<section>`` with the first 12 hex digits of the file's
sha256 as digest, the file as source and, for ``.npz``/``.npy`` files, the arrays' names,
dtypes and shapes (read from the headers, nothing loaded; not by ``qpipe log``) as schema.
The parent run lists every section; a child run the sections its variant used. Evaluation
metrics point at the evaluation dataset. No MLflow import at module level.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

CONTEXT_TAG = "mlflow.data.context"


def array_header(handle: Any) -> dict[str, Any]:
    """dtype and shape from an open ``.npy`` stream's header (object arrays are refused by qpipe)."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(handle)
    return {"dtype": str(dtype), "shape": list(shape)}


def schema(path: Path, section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The arrays of a .npz/.npy file, marked as inputs or labels per the pipeline's data section."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                arrays = {}
                for member in archive.namelist():
                    if member.endswith(".npy"):
                        with archive.open(member) as handle:
                            arrays[member[:-4]] = array_header(handle)
        elif path.suffix == ".npy":
            with open(path, "rb") as handle:
                arrays = {path.stem: array_header(handle)}
        else:
            return None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    section = section or {}
    inputs = section.get("inputs")
    used = set(inputs.values()) if isinstance(inputs, dict) else {inputs} if inputs else set()
    roles = {**{k: "input" for k in used}, **({section["labels"]: "labels"} if section.get("labels") else {})}
    columns = [{"name": k, **v, **({"role": roles[k]} if k in roles else {})} for k, v in arrays.items()
               if not roles or k in roles]
    return {"mlflow_colspec": columns}


def datasets(results: Any, config: Any, read: bool = True) -> dict[str, Any]:
    """One ``mlflow.entities.Dataset`` per data section recorded in results.json; the schema is
    read from the files only with ``read`` (not for ``qpipe log``: its folder is not trusted to
    name files to open)."""
    from mlflow.entities import Dataset

    out = {}
    for section, info in (results.data or {}).items():
        if not isinstance(info, dict) or not info.get("path"):
            continue
        path = Path(info["path"])
        source_cfg = getattr(getattr(config, "data", None), section, None)
        cfg = source_cfg.model_dump() if hasattr(source_cfg, "model_dump") else None
        found = schema(path, cfg) if read else None
        out[section] = Dataset(name=f"{path.stem}-{section}", digest=str(info.get("sha256") or "")[:12] or "unknown",
                               source_type="local", source=json.dumps({"uri": path.resolve().as_uri()}),
                               schema=json.dumps(found) if found else None)
    return out


def inputs(found: dict[str, Any], sections: list[str]) -> list[Any]:
    """DatasetInputs for ``sections`` (those that exist), each tagged with its context."""
    from mlflow.entities import DatasetInput, InputTag

    return [DatasetInput(found[s], tags=[InputTag(CONTEXT_TAG, s)]) for s in sections if s in found]


def used_sections(result: Any) -> list[str]:
    """The data a variant used: evaluation always, calibration and training when it did."""
    sections = ["evaluation"]
    if result.calibrator:
        sections.append("calibration")
    if result.metadata.get("training"):
        sections += ["training", "validation"]
    return sections
