"""The output folder of a run: a unique name, claimed atomically, never someone else's folder.

The default folder is ``runs/<name>-<timestamp>`` where the timestamp has millisecond
resolution plus a short random suffix (``20261201-014502-137-9f3a``); the folder is made with
one ``mkdir`` (no check-then-create race) and a new timestamp is drawn if it already exists,
so runs started in the same second never share a folder. The same timestamp is recorded in
``results.json`` (``timestamp``) and names the MLflow parent run.

qpipe recognises its own folders by the marker file ``.qpipe-run`` it writes (exclusively)
when it claims one. A folder given with ``--output`` (or a fixed ``output.dir``) must be new
or empty; one that holds a qpipe run or files qpipe did not write (``output.dir: .`` would
write over the user's ``pipeline.yaml``) is refused unless ``--force``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpipe.errors import QpipeError

#: written when qpipe claims a folder; its presence means "a qpipe run lives here"
MARKER = ".qpipe-run"
#: the marker is padded with this many bytes of spaces while the run lasts: space set aside so
#: that on a disk that fills up, results.json can still be rewritten to say how the run ended
RESERVE_BYTES = 256 * 1024
DEFAULT_DIR = "runs/{name}-{timestamp}"
_ATTEMPTS = 50


def new_timestamp() -> str:
    """``YYYYmmdd-HHMMSS-mmm-xxxx``: local time to the millisecond and 4 random hex digits."""
    now = _dt.datetime.now()
    return f"{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}-{secrets.token_hex(2)}"


@dataclass
class OutputFolder:
    """A claimed output folder; ``created`` when this run made it (not an existing empty one)."""

    path: Path
    timestamp: str
    created: bool

    def release(self) -> None:
        """Undo the claim of a run that stopped before writing anything: drop the marker and
        the folder itself if this run created it and it is empty again."""
        try:
            (self.path / MARKER).unlink(missing_ok=True)
            if self.created and not any(self.path.iterdir()):
                self.path.rmdir()
        except OSError:
            pass


def claim_output(resolved: Any, requested: Path | None = None, force: bool = False) -> OutputFolder:
    """Claim the run's output folder: ``requested`` (``--output``), else ``output.dir``, else
    ``runs/<name>-<timestamp>`` beside the pipeline file. QpipeError (exit 2) naming the folder
    when it is a file, cannot be created or written, or already holds files."""
    cfg = resolved.config
    if requested is not None:
        return _claim(Path(requested), new_timestamp(), force, retry=False)
    template = cfg.output.dir or DEFAULT_DIR
    base = Path(resolved.loaded.base_dir)
    for _ in range(_ATTEMPTS):
        stamp = new_timestamp()
        path = base / template.replace("{name}", cfg.name).replace("{timestamp}", stamp)
        try:
            return _claim(path, stamp, force, retry="{timestamp}" in template)
        except FileExistsError:
            continue  # another run took this name a moment ago: draw another timestamp
    raise QpipeError(f"output folder: could not create a new folder for '{template}' in {base}")


def _claim(path: Path, stamp: str, force: bool, retry: bool) -> OutputFolder:
    if path.exists() and not path.is_dir():
        raise QpipeError(f"output folder {path} is a file, not a folder: choose another --output (or output.dir)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        created = True
    except FileExistsError:
        if not path.is_dir():  # a file where a parent folder should be, or one made meanwhile
            raise QpipeError(f"output folder {path} cannot be created: a file is in the way; "
                             "choose another --output (or output.dir)") from None
        if retry:
            raise
        created = False
    except OSError as exc:
        raise QpipeError(f"output folder {path} cannot be created: {exc.strerror or exc}; "
                         "choose another --output (or output.dir)") from None
    if not created and not force:
        _refuse_if_used(path)
    folder = OutputFolder(path, stamp, created)
    _write_marker(folder, exclusive=not force)
    return folder


def _refuse_if_used(path: Path) -> None:
    """An existing folder may be claimed only when it is empty."""
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise QpipeError(f"output folder {path} cannot be read: {exc.strerror or exc}; choose another --output") from None
    if not names:
        return
    if MARKER in names or "results.json" in names:
        raise QpipeError(f"output folder {path} already holds a run; choose another --output "
                         "(or pass --force to write over it)")
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise QpipeError(f"output folder {path} holds files qpipe did not write ({shown}); choose a new or "
                     "empty folder with --output (or output.dir), or pass --force to write into it")


def _write_marker(folder: OutputFolder, exclusive: bool) -> None:
    """Create the marker; exclusively, so two runs claiming one empty folder cannot both win.
    This is also the write test: a read-only folder is found here, before the model loads."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    info = {"qpipe_run": folder.timestamp, "pid": os.getpid(), "created": _dt.datetime.now().isoformat()}
    try:
        fd = os.open(folder.path / MARKER, flags, 0o644)
    except FileExistsError:
        raise QpipeError(f"output folder {folder.path} was just claimed by another qpipe run; "
                         "choose another --output") from None
    except OSError as exc:
        if folder.created:
            folder.release()
        raise QpipeError(f"output folder {folder.path} is not writable: {exc.strerror or exc}; "
                         "choose another --output (or output.dir)") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(info) + "\n")
            handle.write(" " * RESERVE_BYTES)  # still valid JSON: trailing whitespace
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        folder.release()
        raise QpipeError(f"output folder {folder.path}: cannot write there ({exc.strerror or exc}; qpipe needs "
                         f"at least {RESERVE_BYTES // 1024} KB free to record a run); free some space or choose "
                         "another --output") from None


def free_reserve(output_dir: Path) -> bool:
    """Give back the space the marker set aside (truncate it to its JSON); True if it held any."""
    path = Path(output_dir) / MARKER
    try:
        with open(path, "r+b") as handle:
            first = handle.readline()
            if os.fstat(handle.fileno()).st_size <= len(first):
                return False
            handle.truncate(len(first))
        return True
    except OSError:
        return False
