"""qpipe: quantize trained models, evaluate every variant, and track them side by side.

This module is what plugin authors import: the ``hookimpl`` marker, the component base
classes, and the values passed between stages. It imports neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("qpipe")

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
)
from qpipe.data import Dataset, match_inputs  # noqa: E402
from qpipe.errors import ConfigError, DataError, PluginError, QpipeError  # noqa: E402
from qpipe.registry import unknown_name_message  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "Artifact", "Backend", "Calibration", "CalibrateContext",
    "Calibrator", "Component", "EvalContext", "Evaluator", "Expects", "LoadedModel", "Options",
    "QuantizeContext", "Quantizer", "Runner", "TensorInfo", "Dataset", "match_inputs", "ConfigError",
    "DataError", "PluginError", "QpipeError", "unknown_name_message",
]
