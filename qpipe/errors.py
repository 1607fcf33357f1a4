"""Errors the host reports to the user as one line, without a traceback."""

from __future__ import annotations


class QpipeError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name.

    The CLI prints it as one line and exits non-zero; ``--debug`` adds the traceback.
    """

    exit_code = 2


class ConfigError(QpipeError):
    """The pipeline file is malformed or names something that does not exist."""


class PluginError(QpipeError):
    """A plugin failed to load or broke the contract; the message names the plugin."""


class DataError(QpipeError):
    """Data that cannot be loaded or does not fit the model."""


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM (``kill``, a CI timeout): handled like Ctrl-C, so every open
    run is closed (MLflow runs end KILLED) and results.json says ``interrupted``."""
