"""Import TensorFlow the same way everywhere, at first use, never at module level.

TF-MOT needs Keras 2 (``tf_keras``): ``TF_USE_LEGACY_KERAS=1`` must be set before the
first TensorFlow import so ``tf.keras`` is ``tf_keras`` whatever the import order, while
``import keras`` stays Keras 3. TensorFlow's C++ log chatter is silenced unless asked for.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from types import ModuleType
from typing import Iterator


def prepare_environment() -> None:
    """Set the environment TensorFlow reads at import time (idempotent)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def tensorflow() -> ModuleType:
    """The ``tensorflow`` module, imported with qpipe's environment (and quietly)."""
    prepare_environment()
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with quiet():
        import tensorflow as tf
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") != "0":
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
        tf.get_logger().setLevel("ERROR")
    return tf


@contextlib.contextmanager
def quiet() -> Iterator[list[str]]:
    """Send what native code prints to fds 1 and 2 into a buffer (unless TF logs are wanted).

    Yields a list that holds the captured text once the block ends, so an error message
    can include it.
    """
    captured: list[str] = []
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield captured
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def tf_keras() -> ModuleType:
    """Keras 2 (``tf_keras``), the Keras TF-MOT works with."""
    tensorflow()
    import tf_keras as keras2

    return keras2


def keras3() -> ModuleType:
    """Keras 3 (``keras``)."""
    tensorflow()
    import keras

    return keras


def versions() -> dict[str, str]:
    """Versions of the stack, for tags and reports (imports TensorFlow)."""
    from importlib import metadata

    out = {}
    for dist in ("tensorflow", "tf-keras", "keras", "ai-edge-litert", "tensorflow-model-optimization", "mlflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
