"""The TFLite converter run in a child process: a converter that crashes (segfault, abort, out
of memory) fails that one conversion, never the run.

``convert(converter)`` takes a ``TFLiteConverter`` built ``from_saved_model`` and configured
in this process, sends its settings (flags, op sets, types, the representative samples) to a
worker process, which builds the same converter over the same SavedModel and converts it. One
worker serves the whole run: it is started on first use (``python -m qpipe.convertproc``, no
multiprocessing, so scripts need no ``__main__`` guard) and imports TensorFlow once. A worker
that dies is reported as ``the TFLite converter crashed (SIGSEGV)`` and replaced on the next
call. Converters not built from a SavedModel, and ``QPIPE_CONVERT_IN_PROCESS=1``, convert in
this process.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from qpipe.errors import QpipeError
from qpipe.scratch import at_scope_end

#: converter attributes that describe the SavedModel or hold live objects, not settings
NOT_SETTINGS = {"saved_model_dir", "_saved_model_tags", "_saved_model_version", "_saved_model_exported_names",
                "_tflite_metrics", "_collected_converter_params", "_metadata", "_debug_info", "_trackable_obj",
                "representative_dataset", "target_spec", "_funcs", "_parent_graph", "_graph_def",
                "_keras_model", "_func_graph"}


class ConverterError(Exception):
    """An error the converter raised in the worker, with its message."""


def settings(converter: Any) -> dict[str, Any]:
    """The converter's configuration as plain, picklable values."""
    def plain(items: dict[str, Any], skip: set[str]) -> dict[str, Any]:
        kept = {}
        for key, value in items.items():
            if key in skip or callable(value):
                continue
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - a live object: not a setting
                continue
            kept[key] = value
        return kept

    samples = None
    dataset = converter.representative_dataset
    if dataset is not None:
        generator = getattr(dataset, "input_gen", dataset)
        samples = list(generator())
    return {"converter": plain(vars(converter), NOT_SETTINGS), "target_spec": plain(vars(converter.target_spec), set()),
            "samples": samples, "saved_model": str(converter.saved_model_dir),
            "tags": sorted(getattr(converter, "_saved_model_tags", None) or []) or None,
            "signatures": list(getattr(converter, "_saved_model_exported_names", None) or []) or None}


def rebuild(tf: Any, request: dict[str, Any]) -> Any:
    """A converter over the request's SavedModel with its settings (in the worker)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(request["saved_model"], request["signatures"],
                                                         set(request["tags"]) if request["tags"] else None)
    for key, value in request["converter"].items():
        setattr(converter, key, value)
    for key, value in request["target_spec"].items():
        setattr(converter.target_spec, key, value)
    samples = request["samples"]
    if samples is not None:
        converter.representative_dataset = lambda: iter(samples)
    return converter


# --------------------------------------------------------------------------- the parent side


class _Worker:
    """The run's converter process and its pipes."""

    def __init__(self) -> None:
        import qpipe

        root = str(Path(qpipe.__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "qpipe.convertproc"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, env=env,
                                        start_new_session=True)  # Ctrl-C stops the run, which stops it

    def ask(self, request: dict[str, Any]) -> tuple[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        _send(self.process.stdin, request)
        return _receive(self.process.stdout)

    def stop(self) -> int | None:
        """Stop the process; its exit code (negative: the signal that killed it)."""
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait()
        self.log.close()
        return code


_WORKER: _Worker | None = None


def _worker() -> _Worker:
    global _WORKER
    if _WORKER is None or _WORKER.process.poll() is not None:
        _WORKER = _Worker()
        at_scope_end(shutdown)  # it works in the command's scratch folder: stop it before that goes
    return _WORKER


def start() -> None:
    """Start the worker ahead of its first conversion (it imports TensorFlow meanwhile)."""
    if os.environ.get("QPIPE_CONVERT_IN_PROCESS") != "1":
        _worker()


@atexit.register
def shutdown() -> None:
    """Stop the worker (at exit, or by a test)."""
    global _WORKER
    if _WORKER is not None:
        _WORKER.stop()
        _WORKER = None


def crash_name(code: int | None) -> str:
    """``SIGSEGV`` for an exit by signal 11; ``exit code 3`` otherwise."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def convert(converter: Any) -> bytes:
    """``converter.convert()`` in the worker process; a crash there is one ``QpipeError`` line."""
    if os.environ.get("QPIPE_CONVERT_IN_PROCESS") == "1" or not getattr(converter, "saved_model_dir", None):
        return bytes(converter.convert())
    global _WORKER
    request = settings(converter)
    worker = _worker()
    try:
        kind, payload = worker.ask(request)
    except (EOFError, OSError, struct.error, pickle.UnpicklingError):
        code = worker.stop()
        _WORKER = None
        how = "out of memory?" if code == -signal.SIGKILL else "a bug in the converter's native code"
        raise QpipeError(f"the TFLite converter crashed ({crash_name(code)}, {how}) converting this variant; "
                         "the other variants still run") from None
    except BaseException:  # Ctrl-C mid-answer: the pipe is out of step, the next call needs a new worker
        worker.stop()
        _WORKER = None
        raise
    if kind == "ok":
        return bytes(payload)
    raise ConverterError(payload)


# --------------------------------------------------------------------------- the wire and the worker


def _send(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the converter process closed its pipe")
    size = struct.unpack("<Q", header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the converter process closed its pipe")
    return pickle.loads(data)


def serve() -> None:
    """The worker: answer conversion requests on stdin until it closes."""
    requests, answers = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what TensorFlow prints must not mix with the answers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from qpipe.tfenv import quiet, tensorflow

    tf = tensorflow()
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            return
        try:
            with quiet():
                answer: tuple[str, Any] = ("ok", bytes(rebuild(tf, request).convert()))
        except Exception as exc:  # noqa: BLE001 - sent back, raised in the parent
            answer = ("error", str(exc) or type(exc).__name__)
        _send(answers, answer)


if __name__ == "__main__":
    serve()
