"""``qpipe log`` sent twice: find the copies of a run already in the store.

A replayed run is the same run as a parent run of the store with the same output folder and
the same start time (tag ``qpipe.started``) or the run id its results.json recorded. A
complete copy (ended, same status, one ended child per variant) means nothing is sent again;
incomplete copies are retired once the new copy is logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpipe_mlflow.store import KIND, PARENT_TAG


def copies(tracker: Any, run: Any) -> list[Any]:
    """Parent runs in the store for this output folder: any left RUNNING, and earlier copies
    of this very run (same start time, or the run id its results.json recorded)."""
    folder = str(Path(run.output_dir).resolve())
    if "'" in folder:
        return []
    recorded = tracker.recorded if tracker.parent_id else (run.results.extra.get("mlflow") or {}).get("run_id")
    found = tracker.client.search_runs([tracker.experiment_id], filter_string=(
        f"tags.`qpipe.output_dir` = '{folder}' and tags.`{KIND}` = 'pipeline'"), max_results=1000)
    return [r for r in found if r.info.run_id != tracker.parent_id and (
        r.info.status == "RUNNING" or r.info.run_id == recorded
        or r.data.tags.get("qpipe.started", "") == (run.results.started or ""))]


def children_of(tracker: Any, parent_id: str, deleted: bool = False) -> list[Any]:
    """The child runs of ``parent_id`` (with ``deleted``, also those deleted)."""
    from mlflow.entities import ViewType

    return tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                      run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY,
                                      max_results=5000)


def logged_before(tracker: Any, run: Any) -> Any | None:
    """A complete copy of this replayed run already in the store: ended, with the same
    status and one ended child per variant; else None."""
    for old in copies(tracker, run):
        if old.info.status == "RUNNING" or old.data.tags.get("qpipe.status") != run.results.status:
            continue
        kids = children_of(tracker, old.info.run_id)
        if len(kids) == len(run.results.variants) and all(k.info.status != "RUNNING" for k in kids):
            return old
    return None


def supersede(tracker: Any, run: Any) -> None:
    """Retire what earlier attempts left for this output folder: runs left RUNNING end FAILED;
    incomplete copies of this run are tagged ``qpipe.superseded_by`` and deleted (restorable
    with ``mlflow runs restore``), with their children and logged models."""
    for old in copies(tracker, run):
        same = old.data.tags.get("qpipe.started", "") == (run.results.started or "") or \
            old.info.run_id == tracker.recorded
        for child in children_of(tracker, old.info.run_id, deleted=same):
            if child.info.status == "RUNNING":
                tracker.client.set_terminated(child.info.run_id, "FAILED")
            if same:
                for output in getattr(child.outputs, "model_outputs", None) or []:
                    tracker.client.delete_logged_model(output.model_id)
                if child.info.lifecycle_stage != "deleted":
                    tracker.client.delete_run(child.info.run_id)
        tracker.client.set_tag(old.info.run_id, "qpipe.superseded_by", tracker.parent_id)
        if old.info.status == "RUNNING":
            tracker.client.set_terminated(old.info.run_id, "FAILED")
        if same:
            tracker.client.delete_run(old.info.run_id)
