"""The variant cache: a finished variant's artifact and metrics, reused when nothing changed.

Content-addressed: a variant's key is a sha256 over everything that decides its artifact and
metrics: the model's bytes, the bytes of the data sections it reads (and which arrays),
the quantizer, calibrator, backend and evaluators with their options, the variant's name,
the pipeline's constraints, the baseline's key (fidelity, size ratio and deltas compare with
the baseline), the versions of qpipe, TensorFlow and LiteRT, and the source code of qpipe and
of the plugins providing the components. Change any of them and the key changes.

The cache lives outside the output folder (``.qpipe-cache`` beside the pipeline by default,
``cache.dir`` in the YAML, or ``$QPIPE_CACHE_DIR``), so a run into a new folder reuses it. An
entry holds the artifact, the result with its raw metrics (deltas are recomputed) and the
variant's predictions (so a cached baseline still feeds fidelity). Entries are written to a
temporary folder and renamed into place, so concurrent runs never see half an entry.

A cache folder may be shared or damaged, so an entry is checked before it is used: its
``entry.json`` lists the sha256 of every file it holds, and an entry whose files differ
(truncated, bit-flipped, added, a symlink) or that names a path outside itself is a miss: the
variant is recomputed, its fresh entry replaces the bad one, and the run warns. The checksums
catch corruption; forgery is caught by an HMAC over the whole ``entry.json`` under this user's
secret key (``qpipe.cachesign``): an edited entry, or one another user or machine wrote, is a miss
(docs/security.md).

Files derived from results (the report's charts) are kept under ``files/`` by a key over the
data they show (``reuse_file``), so an unchanged re-run does not even import matplotlib.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qpipe import __version__
from qpipe.cachesign import sign, signed_by_me
from qpipe.components import file_sha256
from qpipe.errors import QpipeError
from qpipe.results import contained

CACHE_ENV = "QPIPE_CACHE_DIR"
DEFAULT_DIR = ".qpipe-cache"
LAYOUT = "v1"
#: folder (under LAYOUT) of files derived from a run's results, e.g. the report's charts
FILES = "files"
#: folder (under LAYOUT) where a plugin may keep files of its own, in ``PLUGINS/<plugin>/<item>``;
#: ``prune`` removes each item by age like an entry
PLUGINS = "plugins"
#: distributions whose versions are part of every key
STACK = ("numpy", "tensorflow", "tf-keras", "keras", "ai-edge-litert", "ai-edge-quantizer",
         "tensorflow-model-optimization", "tflite-micro")


def cache_dir(config: Any, base_dir: Path, settings: dict[str, Any]) -> Path | None:
    """Where the cache is for this run, or None when it is off (``--no-cache``, ``cache: false``)."""
    if settings.get("no_cache") or not config.cache.enabled:
        return None
    if config.cache.dir:
        return (base_dir / config.cache.dir).resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    return (base_dir / DEFAULT_DIR).resolve()


@functools.lru_cache(maxsize=1)
def stack_versions() -> dict[str, str]:
    """qpipe's version and those of the numerical stack (read from metadata: no imports)."""
    out = {"qpipe": __version__}
    for dist in STACK:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=None)
def code_fingerprint(module_name: str) -> str:
    """sha256 of the .py files of the top-level package holding ``module_name``."""
    top = module_name.split(".")[0]
    module = sys.modules.get(top)
    digest = hashlib.sha256(top.encode())
    paths = getattr(module, "__path__", None)
    files: list[Path] = []
    if paths:
        for folder in paths:
            files += sorted(Path(folder).rglob("*.py"))
    elif module is not None and module.__file__:
        files = [Path(module.__file__)]
    for f in files:
        try:
            digest.update(str(f.name).encode())
            digest.update(f.read_bytes())
        except OSError:
            pass
    return digest.hexdigest()


def array_fingerprint(arrays: dict[str, Any], labels: Any = None) -> str:
    """sha256 of named arrays (names, shapes, dtypes, bytes), read a block at a time."""
    digest = hashlib.sha256()
    if isinstance(labels, dict):  # labels per output
        items = sorted(arrays.items()) + [(f"__labels__/{k}", v) for k, v in sorted(labels.items())]
    else:
        items = sorted(arrays.items()) + ([("__labels__", labels)] if labels is not None else [])
    for name, array in items:
        digest.update(json.dumps([name, list(array.shape), str(array.dtype)]).encode())
        for start in range(0, len(array), 4096):
            digest.update(np.ascontiguousarray(array[start:start + 4096]).tobytes())
    return digest.hexdigest()


def _component(bound: Any) -> dict[str, Any]:
    comp = bound.component
    options = comp.options.model_dump(mode="json") if hasattr(comp.options, "model_dump") else {}
    return {"name": comp.name, "options": options, "class": f"{type(comp).__module__}.{type(comp).__qualname__}",
            "code": code_fingerprint(type(comp).__module__)}


class KeyMaker:
    """Computes cache keys for the variants of one run (the shared parts are hashed once)."""

    def __init__(self, resolved: Any, inputs: Any, data_hashes: dict[str, str]):
        self.resolved = resolved
        model = inputs.model
        self.reason: str | None = None
        if not model.sha256:
            self.reason = "the model has no file to hash (loaded from a function)"
        self.data: dict[str, Any] = {}
        cfg = resolved.config.data
        for section in ("evaluation", "calibration", "training", "validation"):
            source = getattr(cfg, section)
            dataset = getattr(inputs, section)
            if source is None or dataset is None:
                continue
            digest = data_hashes.get(section) or array_fingerprint(dataset.inputs, dataset.labels)
            self.data[section] = {"source": source.model_dump(mode="json"), "sha256": digest}
        self.shared = {
            "layout": LAYOUT,
            "model": model.sha256,
            "versions": stack_versions(),
            "host": code_fingerprint("qpipe"),
            "evaluators": [_component(ev) for ev in resolved.evaluators],
            "constraints": list(resolved.config.constraints),
            "task": resolved.config.task,
        }

    def key(self, rv: Any, baseline_key: str | None) -> str | None:
        """The variant's key, or None when it cannot be cached (see ``reason``)."""
        if self.reason is not None:
            return None
        is_baseline = rv.config.name == self.resolved.baseline
        if not is_baseline and baseline_key is None:
            return None  # the baseline failed or was not cached: fidelity and deltas differ
        qcls = type(rv.quantizer.component)
        sections = ["evaluation"]
        if rv.calibrator is not None:
            sections.append("calibration")
        if qcls.needs_training:
            sections += ["training", "validation"]
        parts = {
            **self.shared,
            "variant": rv.config.name,
            "quantizer": _component(rv.quantizer),
            "backend": _component(rv.backend),
            "calibrator": None if rv.calibrator is None else _component(rv.calibrator),
            "data": {s: self.data.get(s) for s in sections},
            "baseline": None if is_baseline else baseline_key,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_digests(folder: Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` of the files under ``folder``; None if it holds a symlink."""
    digests = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            return None
        if path.is_file():
            digests[path.relative_to(folder).as_posix()] = file_sha256(path)
    return digests


def _safe_relative(relative: Any) -> bool:
    return isinstance(relative, str) and bool(relative) and not Path(relative).is_absolute() \
        and ".." not in Path(relative).parts


@dataclass
class CachedVariant:
    """A cached variant: its recorded result, raw metrics, predictions and artifact."""

    key: str
    folder: Path
    result: dict[str, Any]
    raw_metrics: dict[str, float]
    artifact: str  # relative to an output folder
    created: str
    origin: str  # the output folder of the run that computed it
    files: dict[str, str] = field(default_factory=dict)  # sha256 of every file, by relative path

    def outputs(self) -> Any:
        """The stored predictions: one array, or ``{output name: array}`` (``outputs.npz``)."""
        path, several = self.folder / "outputs.npy", self.folder / "outputs.npz"
        if not several.is_file():
            return np.load(path, allow_pickle=False) if path.is_file() else None
        with np.load(several, allow_pickle=False) as npz:
            return {name: npz[name] for name in self.result.get("model_outputs") or npz.files if name in npz.files}

    def artifact_digests(self) -> dict[str, str]:
        """sha256 of the artifact's files, by path inside the artifact ('' for a single file)."""
        prefix = f"artifact/{self.artifact}"
        return {k[len(prefix):].lstrip("/"): v for k, v in self.files.items()
                if k == prefix or k.startswith(prefix + "/")}

    def restore_artifact(self, output_dir: Path) -> Path:
        """Copy the artifact into ``output_dir`` (at the same relative path); return it.

        Refuses a path outside ``output_dir`` and checks the copy against the entry's checksums."""
        source = self.folder / "artifact" / self.artifact
        target = contained(output_dir, self.artifact) if _safe_relative(self.artifact) else None
        if target is None:
            raise QpipeError(f"cache entry {self.key[:12]} names a path outside the output folder: {self.artifact}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
        copied = file_digests(target) if target.is_dir() else {"": file_sha256(target)}
        if copied != self.artifact_digests():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            raise QpipeError(f"cache entry {self.key[:12]} changed while it was restored; run again or "
                             "use --no-cache")
        return target


class VariantCache:
    """Entries by key under ``root`` (``<root>/v1/<key[:2]>/<key>/``).

    ``warn`` receives one line per damaged entry found (each is then a miss)."""

    def __init__(self, root: Path, warn: Callable[[str], Any] | None = None):
        self.root = Path(root)
        self.warn = warn or (lambda message: None)
        self.checked: dict[str, CachedVariant | None] = {}

    def _folder(self, key: str) -> Path:
        return self.root / LAYOUT / key[:2] / key

    def get(self, key: str) -> CachedVariant | None:
        """The entry for ``key`` if it is intact, else None (a missing or damaged entry is a miss)."""
        if key not in self.checked:
            folder = self._folder(key)
            entry, problem = self._read(key, folder) if folder.is_dir() else (None, None)
            if problem:
                self.warn(f"cache entry {key[:12]} in {self.root} is damaged ({problem}); recomputing it")
            self.checked[key] = entry
        return self.checked[key]

    def _read(self, key: str, folder: Path) -> tuple[CachedVariant | None, str | None]:
        """The entry in ``folder``, or None and what is wrong with it."""
        try:
            info = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
            entry = CachedVariant(key=key, folder=folder, result=info["result"], raw_metrics=info["raw_metrics"],
                          artifact=info["artifact"], created=info.get("created", ""),
                          origin=info.get("origin", ""), files=info.get("files") or {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"unreadable entry.json: {type(exc).__name__}"
        files = (entry.result.get("metadata") or {}).get("files", []) if isinstance(entry.result, dict) else None
        if info.get("key") != key or not _safe_relative(entry.artifact) or not isinstance(files, list) \
                or not all(_safe_relative(f) for f in files):
            return None, f"entry.json names a path outside the entry or another key (artifact: {entry.artifact!r})"
        if not signed_by_me(info):
            return None, ("its signature does not match your cache key: written by another user or machine, "
                          "by an older qpipe, or edited")
        if not entry.files:
            return None, "no checksums (stored by an older qpipe)"
        held = file_digests(folder)
        if held is None:
            return None, "it holds a symlink"
        held.pop("entry.json", None)
        if held != entry.files or not entry.artifact_digests():
            changed = sorted(set(held) ^ set(entry.files) | {k for k in held if held[k] != entry.files.get(k)})
            return None, f"files differ from their checksums: {', '.join(changed[:3]) or entry.artifact}"
        return entry, None

    def put(self, key: str, result: dict[str, Any], raw_metrics: dict[str, float], outputs: Any,
            artifact: Path, relative: str, created: str, origin: str) -> bool:
        """Store a finished variant (replacing a damaged entry); False when it cannot be stored
        (it is then simply not cached)."""
        artifact = Path(artifact)
        if not artifact.exists() or not _safe_relative(relative):
            return False
        folder = self._folder(key)
        if folder.exists() and self._read(key, folder)[0] is not None:
            return True
        tmp = self.root / LAYOUT / "tmp" / uuid.uuid4().hex
        try:
            (tmp / "artifact" / relative).parent.mkdir(parents=True, exist_ok=True)
            if artifact.is_dir():
                shutil.copytree(artifact, tmp / "artifact" / relative)
            else:
                shutil.copyfile(artifact, tmp / "artifact" / relative)
            if isinstance(outputs, dict):  # several outputs, by name
                np.savez(tmp / "outputs.npz", **{k: np.asarray(v) for k, v in outputs.items()})  # type: ignore[arg-type]
            elif outputs is not None:
                np.save(tmp / "outputs.npy", np.asarray(outputs), allow_pickle=False)
            entry = json.loads(json.dumps({  # as it will read back, so the signature covers exactly that
                "key": key, "result": result, "raw_metrics": raw_metrics, "artifact": relative,
                "created": created, "origin": origin, "files": file_digests(tmp)}, default=str))
            (tmp / "entry.json").write_text(json.dumps(sign(entry), indent=1), encoding="utf-8")
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # damaged: move it aside, then put the new one in its place
                os.rename(folder, self.root / LAYOUT / "tmp" / f"{uuid.uuid4().hex}.discarded")
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return folder.exists()  # another run stored the same key first
        finally:
            for discarded in (self.root / LAYOUT / "tmp").glob("*.discarded"):
                shutil.rmtree(discarded, ignore_errors=True)
        self.checked.pop(key, None)
        return True


def reuse_file(root: Path, data: Any, target: Path, make: Callable[[Path], Any]) -> bool:
    """Write ``target``: copied from the cache when the same ``data`` (JSON-able) made a file of
    that name before with the same qpipe code and stack, else made by ``make(target)`` and
    stored. Returns True on a cache hit. A cache that cannot be read or written is skipped."""
    versions = dict(stack_versions())
    with contextlib.suppress(metadata.PackageNotFoundError):
        versions["matplotlib"] = metadata.version("matplotlib")
    blob = json.dumps({"file": Path(target).name, "data": data, "versions": versions,
                       "code": code_fingerprint("qpipe")}, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()
    stored = Path(root, LAYOUT, FILES, key[:2], key + Path(target).suffix)
    linked = any(p.is_symlink() for p in (stored, stored.parent, stored.parent.parent, Path(root, LAYOUT)))
    with contextlib.suppress(OSError):
        if stored.is_file() and not linked:  # a stored file replaced by a link is someone else's file
            shutil.copyfile(stored, target)
            return True
    make(target)
    if linked:  # never written through a link either
        return False
    with contextlib.suppress(OSError):
        stored.parent.mkdir(parents=True, exist_ok=True)
        partial = stored.with_name(f".{uuid.uuid4().hex}.partial")
        shutil.copyfile(target, partial)
        os.replace(partial, stored)
    return False
