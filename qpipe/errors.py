"""Errors the host reports to the user as one line, without a traceback."""

from __future__ import annotations

import errno
import re


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


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


#: the longest one-line error the host prints or stores (the full text goes to a log file)
SHORT_ERROR_LIMIT = 300


def short_error(exc: BaseException | str, limit: int = SHORT_ERROR_LIMIT) -> str:
    """One line for any exception: ``Type: first meaningful line``, at most ``limit`` characters.

    Third-party errors (a TFLite converter's MLIR dump, a traceback folded into a message)
    shrink to the line that says what went wrong: the first line mentioning "error", else
    the first non-blank line. MLIR diagnostics (the TFLite converter's ``<unknown>:0: error:
    loc(...): ...``) lose their location and keep what the converter says, with its own hint
    (``converter_hint``). A ``QpipeError`` is already written for the user: it keeps all
    its lines (joined) and no type prefix, and is only cut at ``limit``.
    """
    text = str(exc)
    if isinstance(exc, QpipeError) or not isinstance(exc, BaseException):
        return _cut(" ".join(text.split()) or type(exc).__name__, limit)
    prefix = f"{type(exc).__name__}: "
    hint = converter_hint(text)
    if hint:
        return _cut(f"{prefix}{hint}", limit)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line and not _is_traceback_line(line)]
    errors = [line for line in lines if "error" in line.lower()]
    first, more = (errors or lines or [""])[0], len(lines) > 1
    line = f"{prefix}{first}".strip().rstrip(":")
    return _cut(line + (" ..." if more and not line.endswith("...") else ""), limit)


#: an MLIR diagnostic: ``<unknown>:0: error: ...`` or ``file.py:12:3: error: ...``, or a bare ``error: ...``
_DIAGNOSTIC = re.compile(r"^(?:\S*:\d+(?::\d+)?:\s*)?(error|note|warning):\s*(.*)$")
#: what a converter's own advice starts with
_ADVICE = ("please consider", "consider ", "see instructions", "you can enable", "some ops are not supported")


def _drop_locations(text: str) -> str:
    """``text`` without MLIR ``loc(...)`` locations (nested parentheses and quoted names included)."""
    out, i = [], 0
    while (start := text.find("loc(", i)) >= 0:
        out.append(text[i:start])
        depth, j, quote = 0, start + 3, ""
        for j in range(start + 3, len(text)):
            ch = text[j]
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
        i = j + 1
        i += len(text[i:]) - len(text[i:].lstrip(": "))
    out.append(text[i:])
    return "".join(out)


def converter_hint(text: str) -> str | None:
    """The TFLite converter's message in one line, or None when ``text`` is no MLIR diagnostic.

    Its errors come as MLIR diagnostics with long locations; what helps is the first error
    (which op failed and why) and the converter's own advice (which flag or op set), e.g.
    "Please consider using Select TF ops and disabling `_experimental_lower_tensor_list_ops`".
    """
    errors: list[str] = []
    for raw in text.replace("\\n", "\n").splitlines():
        found = _DIAGNOSTIC.match(raw.strip())
        if found is None or found.group(1) != "error":
            continue
        line = " ".join(_drop_locations(found.group(2)).split()).strip()
        line = re.sub(r"^error:\s*", "", line)
        if line and line not in errors:
            errors.append(line)
    if not errors:
        return None
    advice = next((e for e in errors if any(a in e.lower() for a in _ADVICE)), None)
    first = next((e for e in errors if e != advice), None)
    parts = [p for p in (first, advice) if p]
    return " ".join(p if p.endswith((".", "!", "?")) else p + "." for p in parts).rstrip(".")


def _cut(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def _is_traceback_line(line: str) -> bool:
    return line.startswith(("Traceback (most recent call last)", 'File "', "^")) or set(line) <= set("^~ ")
