"""Model folder templates kept from one run to the next in qpipe's cache folder.

``mlflow.pyfunc.save_model`` costs over a second on every run: it imports MLflow's pyfunc
machinery, maps every installed module to its distribution to check the requirements, and
loads the model to predict its input example. What it writes depends only on the signature,
the interpreter settings, the model code, the requirements and the versions of MLflow,
Python and pip's build tools, so a run with the same ones copies the folder from
``<cache>/v1/plugins/mlflow/<key>/`` instead (where the host lets a plugin keep files:
``qpipe cache --clear`` removes them). A stored template is used only if it is what qpipe
would write: exactly the expected files, the model code byte for byte, the requirements and
environment files naming exactly the pinned packages, the pyfunc flavor loading that code;
anything else is ignored and replaced. The ``.tflite`` is not stored (each variant puts its
own in).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

#: under the cache folder: where qpipe lets a plugin keep files (qpipe.cache.PLUGINS), this plugin's
FOLDER = "v1/plugins/mlflow"
LAYOUT = 1
#: the model code file's name inside a model folder is the code file's own name
FILES = ("MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
         "serving_input_example.json")
BUILD_TOOLS = ("pip", "setuptools", "wheel")
LOADER = "mlflow.pyfunc.loaders.code_model"


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pins(requirements: list[str]) -> list[str]:
    """The requirements.txt MLflow writes: MLflow pinned first, then ours."""
    import mlflow

    return [f"mlflow=={mlflow.__version__}", *requirements]


def key(code: Path, signature: dict[str, Any], config: dict[str, Any], requirements: list[str]) -> str:
    """What the template depends on, hashed."""
    blob = json.dumps({"layout": LAYOUT, "code": str(code), "code_sha256": hashlib.sha256(code.read_bytes()).hexdigest(),
                       "signature": signature, "config": config, "pins": pins(requirements),
                       "python": platform.python_version(), "tools": {t: _installed(t) for t in BUILD_TOOLS}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fetch(root: Path | None, name: str, into: Path, code: Path, requirements: list[str]) -> Path | None:
    """Copy the stored template ``name`` under ``root`` to ``into`` and return ``into`` if the copy
    is one qpipe would write, else None. Checked after copying, so a concurrent run replacing
    the stored one changes nothing here."""
    if root is None or not Path(root, FOLDER, name).is_dir():
        return None
    try:
        shutil.copytree(Path(root, FOLDER, name), into, symlinks=True)
        if trusted(into, code, requirements):
            return into
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
        pass
    shutil.rmtree(into, ignore_errors=True)
    return None


def store(root: Path | None, name: str, folder: Path) -> None:
    """Keep ``folder`` (without its ``.tflite``) as template ``name``; written aside, then renamed
    into place, so concurrent runs never see half a template. A cache that cannot be written is
    skipped."""
    if root is None:
        return
    target = Path(root, FOLDER, name)
    partial = target.with_name(f".{uuid.uuid4().hex}.partial")
    with contextlib.suppress(OSError):
        shutil.copytree(folder, partial, ignore=lambda where, names: [n for n in names if n.endswith(".tflite")])
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    shutil.rmtree(partial, ignore_errors=True)


def trusted(folder: Path, code: Path, requirements: list[str]) -> bool:
    """Whether ``folder`` holds exactly what ``mlflow.pyfunc.save_model`` wrote for qpipe's model
    code and ``requirements``: nothing that would run other code or install other packages."""
    every = [Path(top, n) for top, dirs, files in os.walk(folder) for n in dirs + files]  # links not followed
    present = sorted(str(p.relative_to(folder)) for p in every if p.is_symlink() or not p.is_dir())
    if present != sorted((*FILES, code.name)) or any(p.is_symlink() for p in every):
        return False
    if (folder / code.name).read_bytes() != code.read_bytes():
        return False
    pinned = pins(requirements)
    if (folder / "requirements.txt").read_text(encoding="utf-8").splitlines() != pinned:
        return False
    python = platform.python_version()
    tools = [f"{t}=={v}" for t in BUILD_TOOLS if (v := _installed(t))]
    env = yaml.safe_load((folder / "python_env.yaml").read_text(encoding="utf-8"))
    if env != {"python": python, "build_dependencies": tools, "dependencies": ["-r requirements.txt"]}:
        return False
    conda = yaml.safe_load((folder / "conda.yaml").read_text(encoding="utf-8"))
    if conda != {"name": "mlflow-env", "channels": ["conda-forge"],
                 "dependencies": [f"python={python}", f"pip<={_installed('pip')}", {"pip": pinned}]}:
        return False
    model = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    flavor = model["flavors"]["python_function"]
    return (set(model["flavors"]) == {"python_function"} and flavor["loader_module"] == LOADER
            and flavor.get("code") is None and flavor["model_code_path"] == str(code)
            and flavor["env"] == {"conda": "conda.yaml", "virtualenv": "python_env.yaml"})
