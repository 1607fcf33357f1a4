"""What a run produced: per-variant results and ``results.json``, written as each variant ends."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qpipe.errors import is_disk_full

RESULTS_FILE = "results.json"


@dataclass
class VariantResult:
    """One variant's outcome. ``artifact`` is relative to the output folder."""

    name: str
    quantizer: str
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    calibrator: dict[str, Any] | None = None
    backend: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    #: sanity-check and plugin warnings, each ``{"code": ..., "message": ...}`` (``qpipe.sanity``)
    warnings: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VariantResult":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class PipelineResults:
    """Everything ``results.json`` holds."""

    pipeline: str
    baseline: str
    variants: list[VariantResult] = field(default_factory=list)
    started: str | None = None
    #: the run's unique timestamp, as in its default folder name and its MLflow parent run's name
    timestamp: str | None = None
    finished: str | None = None
    status: str = "running"  # running | finished | interrupted | crashed
    qpipe_version: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    #: the variant to ship and why (when the pipeline declares constraints or an objective)
    selected: dict[str, Any] | None = None
    #: the CI gate's verdict (when gating): passed, reason, failures
    gate: dict[str, Any] | None = None
    #: what the model does: {"name": classification|binary|regression|None, "source", "reason"}
    task: dict[str, Any] | None = None
    #: a model with several outputs: each output's task (like ``task``), by output name
    tasks: dict[str, Any] = field(default_factory=dict)
    #: the metrics the summary shows, in order: {"metric", "better": higher|lower, "role": quality|cost}
    #: (and "output" for one output's metric of a model with several)
    headline: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return _finite(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineResults":
        variants = [VariantResult.from_dict(v) for v in data.get("variants", [])]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "variants"}
        return cls(variants=variants, **known)

    def write(self, output_dir: Path, last: bool = False) -> Path:
        """Atomically (re)write ``results.json`` in ``output_dir``.

        On a full disk (``last``: the record of how the run ended), the space the output
        folder's marker set aside is given back and the write retried; failing that, the
        record is written compactly over the old file's own bytes (no new space when it is
        not longer). If even that fails, the OSError is raised and the old file is kept.
        """
        from qpipe.outputs import free_reserve

        path = Path(output_dir) / RESULTS_FILE
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        try:
            _replace(path, text)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            if last and free_reserve(output_dir):  # the space the output folder's marker set aside
                try:
                    _replace(path, text)
                    return path
                except OSError:
                    pass
            if not last or not _overwrite_in_place(path, json.dumps(self.to_dict()).encode() + b"\n"):
                raise
        return path


def _replace(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it into place (no half-written file left)."""
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _overwrite_in_place(path: Path, data: bytes) -> bool:
    """Write ``data`` over ``path``'s existing bytes; False when it is longer than the file."""
    try:
        if not path.is_file() or path.stat().st_size < len(data):
            return False
        with open(path, "r+b") as handle:
            handle.write(data)
            handle.truncate()
            handle.flush()
            os.fsync(handle.fileno())
        return True
    except OSError:
        return False


#: the types ``results.json`` must hold where these keys are present (None allowed where listed)
_NONE = type(None)
RESULT_TYPES = {"pipeline": str, "baseline": str, "status": str, "variants": list, "model": dict,
                "data": dict, "extra": dict, "started": (str, _NONE), "finished": (str, _NONE),
                "timestamp": (str, _NONE), "qpipe_version": (str, _NONE), "selected": (dict, _NONE),
                "gate": (dict, _NONE), "task": (dict, _NONE), "headline": list}
VARIANT_TYPES = {"name": str, "quantizer": str, "status": str, "metrics": dict, "metadata": dict,
                 "artifact": (str, _NONE), "error": (str, _NONE), "options": dict, "calibrator": (dict, _NONE),
                 "backend": (dict, _NONE), "seconds": (int, float, _NONE), "warnings": list}


def read_results(output_dir: Path) -> PipelineResults:
    """Read ``results.json`` from an output folder; a truncated or garbled one is a QpipeError."""
    from qpipe.errors import QpipeError

    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        raise QpipeError(f"no {RESULTS_FILE} in {output_dir}: pass the output folder of a 'qpipe run'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        problem = _shape_problem(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        problem = f"not valid JSON ({exc})"
    except OSError as exc:
        problem = f"unreadable ({exc.strerror or exc})"
    if not problem:
        try:
            return PipelineResults.from_dict(data)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            problem = " ".join(str(exc).split())[:200]
    raise QpipeError(f"{path}: {problem}; the file is truncated or was not written by qpipe")


def _shape_problem(data: Any) -> str | None:
    """What is wrong with the structure of a parsed results.json, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for key in ("pipeline", "baseline"):
        if key not in data:
            return f"'{key}' is missing"
    for where, item, types in [("", data, RESULT_TYPES)] + [
            (f"variants[{i}].", v, VARIANT_TYPES) for i, v in enumerate(data.get("variants") or [])]:
        if not isinstance(item, dict):
            return f"{where.rstrip('.')} is not an object"
        if where and "name" not in item:
            return f"{where}name is missing"
        for key, kind in types.items():
            if key in item and not isinstance(item[key], kind):
                return f"'{where}{key}' has the wrong type ({type(item[key]).__name__})"
        for name, value in (item.get("metrics") or {}).items() if where else ():
            if isinstance(value, bool) or not isinstance(value, (int, float, _NONE)):  # None: a NaN, written as null
                return f"'{where}metrics.{name}' is not a number ({type(value).__name__})"
    return None


def contained(output_dir: Path, relative: Any) -> Path | None:
    """``output_dir / relative`` resolved (symlinks followed) when it lies inside ``output_dir``;
    None for anything else (an absolute path, ``..``, a symlink leading out, not a string)."""
    if not isinstance(relative, str) or not relative.strip():
        return None
    root = Path(output_dir).resolve()
    path = (root / relative).resolve()
    return path if path != root and path.is_relative_to(root) else None


def copy_without_links(source: Path, target: Path) -> list[str]:
    """Copy the file or folder ``source`` to ``target`` without following a symlink: a link
    inside a folder (to a file or folder anywhere) is left out, never copied as what it points
    to. Returns the links left out (paths relative to ``source``), for one line each; a
    ``source`` that is itself a link is refused with ``ValueError``."""
    source, target = Path(source), Path(target)
    if source.is_symlink():
        raise ValueError(f"{source} is a symbolic link; qpipe does not follow it")
    if not source.is_dir():
        shutil.copyfile(source, target, follow_symlinks=False)
        return []
    skipped: list[str] = []

    def ignore(folder: str, names: list[str]) -> list[str]:
        links = [n for n in names if os.path.islink(os.path.join(folder, n))]
        skipped.extend(os.path.relpath(os.path.join(folder, n), source) for n in links)
        return links

    shutil.copytree(source, target, ignore=ignore, dirs_exist_ok=True)
    return skipped


def _finite(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class PipelineRun:
    """The run in progress, passed to every lifecycle hook.

    ``settings`` carries command-line choices for plugins (e.g. ``tracking_uri``,
    ``no_tracking``); ``state`` is scratch space a plugin may keep per run, under its name.
    """

    name: str
    config: Any  # qpipe.schema.PipelineConfig
    config_path: Path
    config_text: str
    output_dir: Path
    results: PipelineResults
    model: Any = None  # qpipe.components.LoadedModel once loaded
    data_files: dict[str, Path] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    replay: bool = False

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent
