"""A quantizer that crashes the TFLite converter's process: dynamic range with one extra
converter setting whose unpickling (in the converter process) does ``payload``'s work."""

from __future__ import annotations

import qpipe


class Segfault:
    """Unpickled in the converter process, it reads address 0: a real SIGSEGV there."""

    def __reduce__(self):
        import ctypes

        return (ctypes.string_at, (0,))


class LeaveAndCrash:
    """Unpickled in the converter process: it makes a temp folder, then reads address 0."""

    def __reduce__(self):
        return (exec, ("import ctypes, tempfile; tempfile.mkdtemp(prefix='left-by-crash-'); ctypes.string_at(0)",))


class CrashingPlugin:
    """Registers ``test.crashing``; ``payload`` is the object the converter process unpickles."""

    def __init__(self, payload: object | None = None):
        self.payload = payload if payload is not None else Segfault()

    @qpipe.hookimpl
    def qpipe_register_quantizers(self, register):
        from qpipe_tflite import Dynamic

        payload = self.payload

        class Crashing(Dynamic):
            """Dynamic range, with a setting that crashes the converter's process."""

            name = "test.crashing"

            def configure(self, converter, ctx) -> None:
                super().configure(converter, ctx)
                converter._qpipe_test_crash = payload

        register(Crashing)
