"""One temporary folder per qpipe process, removed when the process ends.

Everything qpipe, TensorFlow, the converter's child process or a local worker writes to the
system temp folder lands in it: ``scratch_scope`` points ``tempfile`` and ``TMPDIR`` (which
child processes inherit) at a fresh ``qpipe-run-*`` folder and removes it when the block
ends, whether the command succeeded, failed or was interrupted, and whatever a child that
crashed left in it. A process outside the CLI (a Ray worker) calls ``ensure_scratch``, which
removes its folder at interpreter exit. A SIGKILL leaves the folder behind; nothing can
clean after that.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_ENV = ("TMPDIR", "TEMP", "TMP")
_current: Path | None = None
_on_end: list[Callable[[], None]] = []


def at_scope_end(callback: Callable[[], None]) -> None:
    """Call ``callback`` before the current scratch folder is removed (e.g. to stop a child
    process that works in it); nothing happens outside a scope."""
    if _current is not None:
        _on_end.append(callback)


@contextlib.contextmanager
def scratch_scope() -> Iterator[Path]:
    """While the block runs, every temporary file goes under one new folder; it is removed after."""
    global _current
    if _current is not None:  # nested (e.g. a command calling another): the outer scope cleans
        yield _current
        return
    system = tempfile.gettempdir()
    folder = Path(tempfile.mkdtemp(prefix="qpipe-run-", dir=system))
    saved_env = {name: os.environ.get(name) for name in (*_ENV, "RAY_TMPDIR")}
    saved_tempdir = tempfile.tempdir
    # Ray keeps its sessions (and their sockets) in the system temp folder, shared between runs
    os.environ.setdefault("RAY_TMPDIR", system)
    for name in _ENV:
        os.environ[name] = str(folder)
    tempfile.tempdir, _current = str(folder), folder
    try:
        yield folder
    finally:
        while _on_end:
            with contextlib.suppress(Exception):
                _on_end.pop()()
        tempfile.tempdir, _current = saved_tempdir, None
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def ensure_scratch() -> Path:
    """This process's scratch folder, made on first call and removed at interpreter exit."""
    if _current is not None:
        return _current
    scope = scratch_scope()
    folder = scope.__enter__()
    atexit.register(scope.__exit__, None, None, None)
    return folder
