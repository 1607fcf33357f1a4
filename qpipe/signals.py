"""Signals always win, but never in the middle of a plugin's write.

A lifecycle hook (a tracker writing to MLflow's sqlite store, say) must not be cut in half:
a KeyboardInterrupt raised inside a database transaction can be swallowed by the library
(the run goes on and exits 0), leave the store locked, or leave a child run FINISHED with
no metrics. ``held_signals`` therefore holds SIGINT and SIGTERM while a hook implementation
runs and delivers them to the handler that was in place as soon as it returns, so the run
still stops (exit 130/143) and the failure hooks close what is open. A second signal while
one is held is delivered at once: a hung plugin can still be interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

HELD = (signal.SIGINT, signal.SIGTERM)
#: how many signals were held and delivered late in this process (for tests and tracing)
stats = {"held": 0}


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs, then deliver what arrived (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        if pending:  # a second signal: the plugin seems stuck, stop now
            _deliver(signum, previous.get(signum, signal.SIG_DFL), frame)
        pending.append(signum)

    try:
        for sig in HELD:
            if signal.getsignal(sig) is not None:  # None: set outside Python, cannot be restored
                previous[sig] = signal.signal(sig, hold)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            stats["held"] += 1
            _deliver(pending[0], previous.get(pending[0], signal.SIG_DFL), None)


def _deliver(signum: int, handler: Any, frame: Any) -> None:
    """Act on ``signum`` as ``handler`` (the handler that was held back) would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
    # SIG_IGN: ignored, as it would have been
