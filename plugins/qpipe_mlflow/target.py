"""Where a run is tracked: on or off, the tracking URI and the experiment. No MLflow import.

URI precedence, highest first: ``--tracking-uri``, ``MLFLOW_TRACKING_URI``, ``tracking.uri``
in the pipeline file, then ``sqlite:///mlflow.db`` next to the pipeline file. A relative
sqlite path in the pipeline file resolves against the pipeline's folder, like every other
path in it; on the command line or in the environment, against the working directory.
MLflow's deprecated file store (a folder path or ``file:`` URI) is refused unless
``MLFLOW_ALLOW_FILE_STORE`` is set, MLflow's own escape hatch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from qpipe import QpipeError

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
ENV_URI = "MLFLOW_TRACKING_URI"
UI_ADDRESS = "http://127.0.0.1:5000"  # where ``mlflow ui`` listens by default


@dataclass(frozen=True)
class Target:
    """A resolved tracking destination; ``source`` says which setting chose the URI."""

    uri: str
    experiment: str
    source: str

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a local sqlite store, else None."""
        if not self.uri.startswith("sqlite:///"):
            return None
        return Path(self.uri[len("sqlite:///"):].split("?", 1)[0])

    @property
    def is_http(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: ``mlartifacts`` beside a local sqlite
        database (so nothing lands in the working directory); the server decides otherwise."""
        db = self.sqlite_path
        return (db.parent / ARTIFACTS_DIR).as_uri() if db is not None else None

    @contextlib.contextmanager
    def store_lock(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<db>.lock`` beside a local sqlite store while the store is
        opened: MLflow creates and migrates the schema on first use, and two processes doing
        that at once fail ("duplicate column name", "table already exists")."""
        db = self.sqlite_path
        try:
            import fcntl
        except ImportError:  # Windows: no flock; concurrent first use stays unprotected
            fcntl = None  # type: ignore[assignment]
        if db is None or fcntl is None:
            yield
            return
        with open(db.with_name(db.name + ".lock"), "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ui_hint(self, experiment_id: str | None = None) -> str:
        """How to look at this store in the MLflow UI: the command to start it (local stores) and
        the experiment's page. ``workflowType=machine_learning`` opens MLflow 3's "Model training"
        view (its runs table): the UI's GenAI view is the default whatever the experiment's tags."""
        page = f"/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else ""
        if self.is_http:
            return f"open {self.uri.rstrip('/')}{page}" if page else f"open {self.uri}"
        start = f"mlflow ui --backend-store-uri {self.uri}"
        return f"{start}, then open {UI_ADDRESS}{page}" if page else start


def resolve_uri(yaml_uri: str | None, base_dir: Path, cli_uri: str | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(uri, source) by the precedence above."""
    environ = os.environ if environ is None else environ
    if cli_uri:
        return normalize(cli_uri, Path.cwd(), "--tracking-uri", environ), "--tracking-uri"
    if environ.get(ENV_URI):
        return normalize(environ[ENV_URI], Path.cwd(), ENV_URI, environ), ENV_URI
    if yaml_uri:
        return normalize(yaml_uri, base_dir, "tracking.uri", environ), "tracking.uri"
    return sqlite_uri(Path(base_dir) / DEFAULT_DB), "default"


def sqlite_uri(path: Path) -> str:
    """``sqlite:////absolute/path.db``."""
    return "sqlite:///" + str(Path(path).resolve())


def normalize(uri: str, base_dir: Path, where: str, environ: Mapping[str, str] | None = None) -> str:
    """Make a relative sqlite path absolute against ``base_dir``; refuse the file store."""
    uri = uri.strip()
    environ = os.environ if environ is None else environ
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///"):]
        if not rest or rest.startswith("/"):
            return uri
        path, _, query = rest.partition("?")
        absolute = sqlite_uri(Path(base_dir) / path)
        return absolute + (f"?{query}" if query else "")
    schemeless = "://" not in uri and ":" not in uri.split("/", 1)[0]
    file_store = uri.startswith("file:") or (schemeless and uri not in ("databricks", "databricks-uc"))
    if file_store and str(environ.get("MLFLOW_ALLOW_FILE_STORE", "")).lower() not in ("1", "true", "yes"):
        raise QpipeError(f"{where}: '{uri}' is a folder, MLflow's deprecated file store; use a database "
                         f"such as sqlite:///{DEFAULT_DB} or a server such as http://127.0.0.1:5000")
    return uri


def target_for(run: Any) -> Target | None:
    """The run's tracking target, or None when tracking is off (``tracking: false`` or
    ``--no-tracking``). ``qpipe log`` (a replay) always tracks: logging is what it was asked for."""
    tracking = run.config.tracking
    if run.settings.get("no_tracking"):
        return None
    if not tracking.enabled and not run.replay:
        return None
    if run.replay:
        return replay_target(run)
    uri, source = resolve_uri(tracking.uri, run.base_dir, run.settings.get("tracking_uri"))
    return Target(uri=uri, experiment=tracking.experiment or run.name, source=source)


def replay_target(run: Any) -> Target:
    """Where ``qpipe log`` writes: the user's ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``, else the
    default beside the current folder. The folder may be someone else's: the URI its pipeline copy
    records (and a relative one against the folder itself, never a path results.json names) is
    used only with ``--use-recorded-uri``, and otherwise shown in one line."""
    recorded = run.config.tracking.uri
    experiment = run.config.tracking.experiment or run.name
    if run.settings.get("use_recorded_uri") and recorded:
        uri, source = resolve_uri(recorded, Path(run.output_dir), run.settings.get("tracking_uri"))
        return Target(uri=uri, experiment=experiment, source=source)
    uri, source = resolve_uri(None, Path.cwd(), run.settings.get("tracking_uri"))
    if recorded and source == "default":
        sys.stderr.write(f"mlflow: the folder's pipeline records tracking.uri '{recorded}'; logging to {uri} "
                         "instead (pass --use-recorded-uri to log there, or --tracking-uri)\n")
    return Target(uri=uri, experiment=experiment, source=source)
