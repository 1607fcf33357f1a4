"""Worker process: allocate a .tflite in TFLite Micro at the arena sizes read from stdin.

    python probe.py MODEL.tflite    # then one arena size (bytes) per line on stdin

For each size it creates the interpreter, invokes it once on zeros, and prints one JSON line:
``{"arena": N, "ok": bool, "error": str, "log": str}`` (``log`` is what TFLM printed: its
error messages, or the allocation report). It runs apart from qpipe because TFLM can crash
the process (SIGSEGV) when an arena is too small; the parent notices and starts a new one.
Imports only numpy and tflite_micro, so it starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def captured_fds() -> Iterator[list[str]]:
    """What native code writes to fds 1 and 2 inside the block, as text once it ends."""
    text: list[str] = []
    sys.stdout.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", "replace"))


def attempt(runtime, model: bytes, inputs: int, arena: int) -> dict:
    """Allocate and invoke once at ``arena`` bytes; what happened, as a JSON-friendly dict."""
    ok, error = False, ""
    with captured_fds() as log:
        try:
            interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena)
            for i in range(inputs):
                detail = interpreter.get_input_details(i)
                interpreter.set_input(np.zeros(detail["shape"], dtype=detail["dtype"]), i)
            interpreter.invoke()
            interpreter.print_allocations()
            ok = True
        except Exception as exc:  # noqa: BLE001 - TFLM raises RuntimeError/ValueError; report either
            error = f"{type(exc).__name__}: {exc}"
    return {"arena": arena, "ok": ok, "error": error, "log": log[0]}


def main(path: str) -> None:
    from tflite_micro.python.tflite_micro import runtime

    with open(path, "rb") as fh:
        model = fh.read()
    inputs = len(runtime.convert_bytearray_to_object(bytearray(model)).subgraphs[0].inputs)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(attempt(runtime, model, inputs, int(line))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
