"""Whether TFLite Micro runs a .tflite, and the smallest tensor arena it runs in.

Every allocation is tried in a worker process (``probe.py``): TFLM can crash the process
when an arena is too small, so a crash is read as "does not fit" and a new worker starts.
The smallest arena is found by bisection over sizes that are multiples of ``alignment``;
TFLM's allocation report is only used to pick the first guesses (on our models it was
off by -8 to +824 bytes from the real minimum, so it is never the answer itself).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qpipe_tflm.runtime import require_tflm

PROBE = Path(__file__).with_name("probe.py")
_REPORT_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_NOISE = ("[RecordingMicroAllocator]",)


@dataclass
class Attempt:
    """One allocation: did it allocate and invoke, TFLM's reason if not, its report if so."""

    arena: int
    ok: bool
    reason: str = ""
    reported_total: int | None = None


def _reason(record: dict) -> str:
    """TFLM's own messages, on one line (else the exception text)."""
    lines = [line.strip() for line in record.get("log", "").splitlines()
             if line.strip() and not line.strip().startswith(_NOISE)]
    return " ".join(lines) or record.get("error") or "unknown error"


class Prober:
    """Tries arena sizes for one .tflite in a worker process; use as a context manager."""

    def __init__(self, path: Path):
        require_tflm("measuring a model for TFLite Micro")
        self.path = Path(path)
        self.process: subprocess.Popen | None = None
        self.stderr = None
        self.attempts: list[Attempt] = []

    def __enter__(self) -> "Prober":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        self.stderr = tempfile.TemporaryFile()
        return subprocess.Popen([sys.executable, str(PROBE), str(self.path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def _crashed(self, arena: int) -> Attempt:
        code = self.process.wait()
        self.stderr.seek(0)
        last = (self.stderr.read().decode("utf-8", "replace").strip().splitlines() or [""])[-1]
        self.close()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return Attempt(arena, False, f"TFLite Micro crashed ({how}) with a {arena}-byte arena {last}".strip())

    def attempt(self, arena: int) -> Attempt:
        """Allocate and invoke once (on zeros) with an ``arena``-byte tensor arena."""
        if self.process is None:
            self.process = self._start()
        try:
            self.process.stdin.write(f"{arena}\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            result = self._crashed(arena)
        else:
            record = json.loads(line)
            totals = _REPORT_TOTAL.findall(record.get("log", ""))
            result = Attempt(arena, bool(record["ok"]), "" if record["ok"] else _reason(record),
                             int(totals[-1]) if totals else None)
        self.attempts.append(result)
        return result

    def close(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()  # the worker ends at end of input
            except OSError:  # it crashed: unsent input cannot be flushed
                pass
            self.process.wait()
            self.process.stdout.close()
            self.process = None
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def smallest_arena(attempt: Callable[[int], Attempt], works: Attempt, alignment: int) -> int:
    """The smallest multiple of ``alignment`` at which ``attempt`` succeeds, given ``works``
    (an attempt that succeeded). Assumes a larger arena never fails where a smaller one works."""
    lo, hi = 0, works.arena  # lo does not allocate, hi does
    hint = works.reported_total
    guesses = [align_up(2 * hint, alignment), align_up(hint // 2, alignment)] if hint else []
    for guess in guesses:
        if lo < guess < hi:
            lo, hi = (lo, guess) if attempt(guess).ok else (guess, hi)
    while hi - lo > alignment:
        mid = max(lo + alignment, (lo + hi) // 2 // alignment * alignment)
        lo, hi = (lo, mid) if attempt(mid).ok else (mid, hi)
    return hi
