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


#: the longest one-line error the host prints or stores (the full text goes to a log file)
SHORT_ERROR_LIMIT = 300


def short_error(exc: BaseException | str, limit: int = SHORT_ERROR_LIMIT) -> str:
    """One line for any exception: ``Type: first meaningful line``, at most ``limit`` characters.

    Third-party errors (a TFLite converter's MLIR dump, a traceback folded into a message)
    shrink to the line that says what went wrong: the first line mentioning "error", else
    the first non-blank line. A ``QpipeError`` is already written for the user: it keeps all
    its lines (joined) and no type prefix, and is only cut at ``limit``.
    """
    text = str(exc)
    if isinstance(exc, QpipeError) or not isinstance(exc, BaseException):
        return _cut(" ".join(text.split()) or type(exc).__name__, limit)
    prefix = f"{type(exc).__name__}: "
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line and not _is_traceback_line(line)]
    errors = [line for line in lines if "error" in line.lower()]
    first, more = (errors or lines or [""])[0], len(lines) > 1
    line = f"{prefix}{first}".strip().rstrip(":")
    return _cut(line + (" ..." if more and not line.endswith("...") else ""), limit)


def _cut(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def _is_traceback_line(line: str) -> bool:
    return line.startswith(("Traceback (most recent call last)", 'File "', "^")) or set(line) <= set("^~ ")
