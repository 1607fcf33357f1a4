"""The per-user key that signs cache entries, so an entry's metrics cannot be forged.

The checksums in ``entry.json`` catch damage; they cannot catch an edit, since whoever edits the
metrics can rewrite the checksums too. So each entry also carries an HMAC-SHA256 over its whole
content, keyed by a secret only this user can read: ``$QPIPE_CACHE_KEY`` names its file, else
``$XDG_CONFIG_HOME/qpipe/cache.key`` (``~/.config/qpipe/cache.key``), created on first use with
owner-only permissions. An entry written by another user or machine, or edited, fails the check
and is computed again (docs/security.md).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from qpipe.errors import QpipeError

KEY_ENV = "QPIPE_CACHE_KEY"
MAC_FIELD = "mac"


def key_path() -> Path:
    """Where this user's cache key is kept."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "qpipe" / "cache.key"


@functools.lru_cache(maxsize=4)
def _key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():  # written aside, then linked into place: a concurrent run never reads half a key
        partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        try:
            os.link(partial, path)
        except FileExistsError:
            pass  # another run made it first: use theirs
        finally:
            os.unlink(partial)
    info = os.lstat(path)
    if path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise QpipeError(f"the cache key {path} must be your own file, readable by you alone: "
                         f"chmod 600 {path} (or remove it, and the cache is signed with a new key)")
    key = path.read_bytes()
    if len(key) < 32:
        raise QpipeError(f"the cache key {path} is too short ({len(key)} bytes); remove it and run again")
    return key


def user_key() -> bytes:
    """This user's secret key for signing cache entries (made on first use)."""
    return _key(key_path())


def _content(entry: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != MAC_FIELD}, sort_keys=True, default=str).encode()


def sign(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with its HMAC under this user's key."""
    return {**entry, MAC_FIELD: hmac.new(user_key(), _content(entry), hashlib.sha256).hexdigest()}


def signed_by_me(entry: dict[str, Any]) -> bool:
    """Whether ``entry`` (as read back from JSON) carries a valid HMAC under this user's key."""
    mac = entry.get(MAC_FIELD)
    expected = hmac.new(user_key(), _content(entry), hashlib.sha256).hexdigest()
    return isinstance(mac, str) and hmac.compare_digest(mac, expected)
