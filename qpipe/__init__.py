"""qpipe: quantize trained models, evaluate every variant, and track them side by side.

This module is what plugin authors import: the ``hookimpl`` marker, the component base
classes, the values passed between stages and a few helpers. It imports neither TensorFlow
nor MLflow. The other public modules are listed in ``PUBLIC_MODULES`` (docs/plugins.md,
"What a plugin may import"); every other ``qpipe.*`` module is private.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("qpipe")

#: the modules a plugin may import (with their submodules); the rest of qpipe is private
PUBLIC_MODULES = ("qpipe", "qpipe.testing", "qpipe.tfenv", "qpipe.conversion", "qpipe.tflite", "qpipe.keras", "qpipe.errors",
                  "qpipe.hookspecs", "qpipe.results", "qpipe.report", "qpipe.commands")

from qpipe.components import (  # noqa: E402
    Artifact,
    Backend,
    Calibration,
    CalibrateContext,
    Calibrator,
    Component,
    EvalContext,
    Evaluator,
    Expects,
    LoadedModel,
    Options,
    QuantizeContext,
    Quantizer,
    Runner,
    TensorInfo,
    file_sha256,
)
from qpipe.data import Dataset, call_function, match_inputs  # noqa: E402
from qpipe.errors import ConfigError, DataError, PluginError, QpipeError  # noqa: E402
from qpipe.limits import clamp_threads  # noqa: E402
from qpipe.selection import unmet  # noqa: E402
from qpipe.registry import unknown_name_message  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "Artifact", "Backend", "Calibration", "CalibrateContext",
    "Calibrator", "Component", "EvalContext", "Evaluator", "Expects", "LoadedModel", "Options",
    "QuantizeContext", "Quantizer", "Runner", "TensorInfo", "Dataset", "match_inputs", "ConfigError",
    "DataError", "PluginError", "QpipeError", "file_sha256", "call_function", "clamp_threads", "unmet",
    "unknown_name_message",
]
