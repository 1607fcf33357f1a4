"""Resource limits: how big a pipeline file, a variant grid and in-memory data may get.

Each limit has a default and an environment variable that raises it (documented in the
README and docs/security.md). Limits are checked *before* the work they bound: the file
size before parsing, the grid's size before expanding it, an array's declared size before
reading it. ``clamp_threads`` and ``clamp_jobs`` cap parallelism at what the machine has.
"""

from __future__ import annotations

import os
import sys

from qpipe.errors import ConfigError

#: environment variable -> default
DEFAULTS = {
    "QPIPE_MAX_YAML_BYTES": 1 << 20,        # a pipeline file
    "QPIPE_MAX_VARIANTS": 256,              # variants after expanding option lists
    "QPIPE_MAX_DATA_BYTES": 2 << 30,        # arrays of one data file read whole into memory
}

_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_warned: set[str] = set()


def limit(name: str) -> int:
    """The limit ``name`` (a key of DEFAULTS): the environment's value, else the default.

    Values are whole numbers, optionally with a K/M/G/T suffix (powers of 1024).
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return DEFAULTS[name]
    factor = _SUFFIXES.get(text[-1].upper(), 1)
    digits = text[:-1] if factor > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise ConfigError(f"{name}={text!r}: expected a positive whole number (optionally with K, M, G or T)")
    return int(digits) * factor


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (powers of 1024, like the limits' K/M/G suffixes)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def warn_once(message: str) -> None:
    """Print ``warning: message`` on stderr once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def clamp_threads(threads: int, what: str) -> int:
    """``threads`` capped at the CPU count, with a warning when it was more."""
    cpus = cpu_count()
    if threads > cpus:
        warn_once(f"{what}: {threads} threads on a machine with {cpus} CPUs; using {cpus}")
        return cpus
    return threads


def clamp_jobs(jobs: int, variants: int) -> tuple[int, str | None]:
    """(``jobs`` capped at the CPU count and the number of variants, a warning or None)."""
    cap = max(1, min(cpu_count(), variants))
    if jobs <= cap:
        return jobs, None
    why = f"{variants} variant{'s' if variants != 1 else ''}" if variants <= cpu_count() else \
        f"{cpu_count()} CPUs"
    return cap, f"--jobs/executor.jobs {jobs} is more than the {why}; running {cap} at once"
