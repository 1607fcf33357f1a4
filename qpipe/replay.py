"""``qpipe log``: send a finished output folder's results to the trackers again.

It replays the lifecycle hooks from ``results.json`` (and the copy of the pipeline file in the
folder), so any tracking plugin can log a run whose server was unreachable at the time.

The folder may come from someone else, so nothing in it is trusted: every file results.json
names (artifacts, component files) must lie inside the folder once symlinks are resolved, or
nothing is logged; data paths recorded in it are not offered to trackers; a run without a
final state (killed, or still running) is logged as interrupted, never as finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpipe.config import load_config
from qpipe.errors import QpipeError
from qpipe.lifecycle import Lifecycle
from qpipe.plugins import QpipePluginManager
from qpipe.results import PipelineResults, PipelineRun, contained, read_results

PIPELINE_COPY = "pipeline.yaml"
#: the states a run that ended records; any other (``running``) means it never got to the end
FINAL_STATES = ("finished", "interrupted", "crashed")


def replay(pm: QpipePluginManager, output_dir: Path, settings: dict[str, Any] | None = None) -> list[str]:
    """Call the lifecycle hooks for every variant recorded in ``output_dir``."""
    output_dir = Path(output_dir)
    results = read_results(output_dir)
    check_named_files(results, output_dir)
    copy = contained(output_dir, PIPELINE_COPY)
    if copy is None or not copy.is_file():
        raise QpipeError(f"{output_dir}: the copy of the pipeline file ({PIPELINE_COPY}) is missing or "
                         "points outside the folder")
    warnings: list[str] = []
    if results.status not in FINAL_STATES:
        warnings.append(f"{output_dir}: results.json has no final state (status '{results.status}': the run "
                        "was killed or is still running); logging it as interrupted")
        results.status = "interrupted"
    loaded = load_config(copy)
    pipeline_file = results.extra.get("pipeline_file")
    if isinstance(pipeline_file, str) and Path(pipeline_file).is_file():
        loaded.path = Path(pipeline_file).resolve()  # where the run's relative paths pointed (not read)
    run = PipelineRun(name=results.pipeline, config=loaded.config, config_path=loaded.path,
                      config_text=loaded.text, output_dir=output_dir, results=results,
                      settings=dict(settings or {}), replay=True)
    lifecycle = Lifecycle(pm, run, warnings)
    lifecycle.fire("qpipe_pipeline_started")
    for result in results.variants:
        lifecycle.fire("qpipe_variant_started", variant=result.name)
        if result.status == "ok":
            lifecycle.fire("qpipe_variant_finished", result=result)
        else:
            lifecycle.fire("qpipe_variant_failed", result=result, error=None)
    lifecycle.fire("qpipe_pipeline_finished", results=results)
    return warnings


def check_named_files(results: PipelineResults, output_dir: Path) -> None:
    """Refuse when results.json names a file outside ``output_dir`` (absolute, ``..``, a symlink
    leading out): a forged or foreign folder must not make a tracker upload other files."""
    for variant in results.variants:
        files = (variant.metadata or {}).get("files", [])
        named = ([variant.artifact] if variant.artifact else []) + (files if isinstance(files, list) else [files])
        for name in named:
            if contained(output_dir, name) is None:
                raise QpipeError(f"{output_dir}/results.json: variant '{variant.name}' names {name!r}, which is "
                                 "not inside the output folder; nothing was logged (a forged or damaged folder?)")
