"""A cache folder's housekeeping: what it holds (``usage``) and emptying it (``prune``), for
``qpipe cache``. Nothing is followed out of the folder: a symlink in it (qpipe writes none) is
removed as a link, never what it points to, and named (docs/security.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from qpipe.cache import FILES, LAYOUT, PLUGINS


@dataclass
class CacheUsage:
    """What ``usage`` or ``prune`` counted: variant entries and bytes on disk."""

    entries: int = 0
    bytes: int = 0
    #: symlinks found in the cache and removed as links ("path -> target"), never followed
    links: list[str] = field(default_factory=list)


def _folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder``; links are neither followed nor counted."""
    total = 0
    for top, _dirs, files in os.walk(folder):  # os.walk does not descend into linked folders
        for name in files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_size
    return total


def _below(folder: Path, depth: int, links: list[Path]) -> list[Path]:
    """What lies ``depth`` levels below ``folder``, reached without passing through a symlink;
    every symlink met on the way is added to ``links`` (a cache folder holds none of its own)."""
    level = [folder] if folder.is_dir() and not folder.is_symlink() else []
    if folder.is_symlink():
        links.append(folder)
    for step in range(depth):
        deeper = []
        for parent in level:
            for child in sorted(parent.iterdir()):
                if child.is_symlink():
                    links.append(child)
                elif child.is_dir() or step == depth - 1:  # files only at the last level
                    deeper.append(child)
        level = deeper
    return level


def _entries(root: Path, links: list[Path]) -> list[Path]:
    """The variant entry folders (``??/<key>/`` holding an ``entry.json``), links left out."""
    found = []
    for folder in _below(Path(root, LAYOUT), 2, links):
        entry = folder / "entry.json"
        if folder.parent.name not in (FILES, PLUGINS, "tmp") and folder.is_dir() and entry.is_file() and not entry.is_symlink():
            found.append(folder)
    return found


def usage(root: Path) -> CacheUsage:
    """How many variant entries the cache at ``root`` holds, and the bytes of all it holds."""
    found = CacheUsage()
    found.entries = len(_entries(root, []))
    layout = Path(root, LAYOUT)
    found.bytes = _folder_bytes(layout) if layout.is_dir() and not layout.is_symlink() else 0
    return found


def _remove(item: Path) -> int:
    """Remove a file, a link (never what it points to) or a real folder; return the bytes freed."""
    if item.is_dir() and not item.is_symlink():
        size = _folder_bytes(item)
        shutil.rmtree(item, ignore_errors=True)  # removes links inside as links
        return 0 if item.exists() else size
    size = 0 if item.is_symlink() else item.lstat().st_size
    item.unlink(missing_ok=True)
    return size


def prune(root: Path, older_than_days: float | None = None) -> CacheUsage:
    """Remove the entries (all, or those stored more than ``older_than_days`` ago) and any
    half-written leftovers; return what was removed.

    Nothing is followed out of the cache: a symlink found in it (which qpipe never writes) is
    removed as a link, never what it points to, and named in ``CacheUsage.links``."""
    removed = CacheUsage()
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    links: list[Path] = []
    layout = Path(root, LAYOUT)
    old = (lambda p: True) if cutoff is None else (lambda p: p.lstat().st_mtime < cutoff)
    for folder in _entries(root, links):
        if old(folder / "entry.json"):
            freed = _remove(folder)
            removed.entries += not folder.exists()
            removed.bytes += freed
    for item in _below(layout / FILES, 2, links) + _below(layout / PLUGINS, 2, links):
        if old(item):
            removed.bytes += _remove(item)
    if older_than_days is None:
        removed.bytes += _remove(layout / "tmp") if (layout / "tmp").exists() else 0
    for link in dict.fromkeys(links):
        with contextlib.suppress(OSError):
            target = os.readlink(link)
            link.unlink()
            removed.links.append(f"{link} -> {target}")
    return removed
