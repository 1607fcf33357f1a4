"""Talking to an MLflow store: the health probe, the experiment, values MLflow accepts, and
quiet logs. Shared by the tracker, ``qpipe log`` and ``qpipe compare``; no MLflow import at
module level.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import qpipe
from qpipe import QpipeError
from qpipe.results import copy_without_links

from qpipe_mlflow.target import Target

KIND = "qpipe.kind"  # "pipeline" on parent runs, "variant" on child runs
PARENT_TAG = "mlflow.parentRunId"
#: the MLflow 3 UI opens an experiment with this tag on its runs table, not the GenAI overview
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def probe(target: Target, timeout: float = 5.0) -> None:
    """GET <server>/health; QpipeError naming the URI and the cure if nothing answers."""
    url = target.uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
            response.read(64)
    except urllib.error.HTTPError:
        return  # it answered: the API calls that follow will tell whether it is MLflow
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise QpipeError(f"MLflow tracking server {target.uri} (from {target.source}) is unreachable: {reason}. "
                         "Start it, point --tracking-uri / MLFLOW_TRACKING_URI / tracking.uri at a running "
                         "one, or run with --no-tracking") from None


def experiment(client: Any, target: Target) -> str:
    """The id of the experiment named by ``target``, created (with its artifact location) if new."""
    found = client.get_experiment_by_name(target.experiment)
    if found is None:
        try:
            return client.create_experiment(target.experiment, artifact_location=target.artifact_location,
                                            tags={"qpipe.created_by": f"qpipe {qpipe.__version__}",
                                                  EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})
        except Exception:
            found = client.get_experiment_by_name(target.experiment)  # created meanwhile by another run
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise QpipeError(f"MLflow experiment '{target.experiment}' at {target.uri} is deleted: restore it "
                         f"(mlflow experiments restore --experiment-id {found.experiment_id}) or set "
                         "tracking.experiment to another name")
    if EXPERIMENT_KIND[0] not in found.tags:  # an experiment from before: mark it too (a nicety)
        with contextlib.suppress(Exception):
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
    return found.experiment_id


def context_tags() -> dict[str, Any]:
    """What MLflow's fluent API adds to a run's tags (user, source, git commit); resolved once
    per run (the git lookup costs about 10 ms a call)."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags({})
    except Exception:  # noqa: BLE001 - context tags are a nicety
        return {}


def say(message: str) -> None:
    """One line on stderr from the MLflow plugin."""
    sys.stderr.write(f"mlflow: {message}\n")


def upload(client: Any, run_id: str, texts: dict[str, str], files: list[Path],
           warn: Callable[[str], Any] | None = None) -> None:
    """``texts`` (name: content) and ``files`` (a folder keeps its name) as the run's artifacts,
    staged in one folder and sent with one call (one artifact-location lookup, not one a file).

    Symlinks are never followed: a linked file, or a link inside a folder, is left out with
    one line through ``warn`` (stderr by default)."""
    warn = warn or say
    with tempfile.TemporaryDirectory(prefix="qpipe-upload-") as tmp:
        for name, content in texts.items():
            Path(tmp, name).write_text(content, encoding="utf-8")
        for path in files:
            if path.is_symlink():
                warn(f"{path} is a symbolic link; it was not uploaded")
                continue
            if path.is_dir():
                for link in copy_without_links(path, Path(tmp, path.name)):  # never what a link points to
                    warn(f"{path.name}/{link} is a symbolic link; it was not uploaded")
                continue
            staged = Path(tmp, path.name)
            staged.unlink(missing_ok=True)
            try:
                os.link(path, staged)
            except OSError:
                shutil.copyfile(path, staged)
        client.log_artifacts(run_id, tmp)


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def metric_key(key: Any) -> str:
    """A name MLflow accepts (letters, digits, _ - . / space and colon)."""
    return re.sub(r"[^\w\-. /:]", "_", str(key))[:250]


def text(value: Any, limit: int) -> str:
    value = value if isinstance(value, str) else json.dumps(value, default=str)
    return value if len(value) <= limit else value[:limit - 3] + "..."


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def parse_time(text_value: str | None) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(text_value) if text_value else None
    except ValueError:
        return None


def ms(moment: _dt.datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Keep MLflow's and alembic's INFO chatter (database migrations) off the console."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=False):
            lg.setLevel(level)
