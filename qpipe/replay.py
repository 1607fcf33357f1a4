"""``qpipe log``: send a finished output folder's results to the trackers again.

It replays the lifecycle hooks from ``results.json`` (and the pipeline file recorded in
it), so any tracking plugin can log a run whose server was unreachable at the time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpipe.config import load_config
from qpipe.errors import QpipeError
from qpipe.pipeline import call_lifecycle
from qpipe.plugins import QpipePluginManager
from qpipe.results import PipelineRun, read_results

PIPELINE_COPY = "pipeline.yaml"


def replay(pm: QpipePluginManager, output_dir: Path, settings: dict[str, Any] | None = None) -> list[str]:
    """Call the lifecycle hooks for every variant recorded in ``output_dir``."""
    output_dir = Path(output_dir)
    results = read_results(output_dir)
    pipeline_file = results.extra.get("pipeline_file")
    copy = output_dir / PIPELINE_COPY
    path = copy if copy.is_file() else Path(pipeline_file) if pipeline_file else None
    if path is None or not path.is_file():
        raise QpipeError(f"{output_dir}: the pipeline file of this run is missing ({PIPELINE_COPY})")
    loaded = load_config(path)
    if pipeline_file and Path(pipeline_file).is_file():
        loaded.path = Path(pipeline_file).resolve()
    run = PipelineRun(name=results.pipeline, config=loaded.config, config_path=loaded.path,
                      config_text=loaded.text, output_dir=output_dir, results=results,
                      settings=dict(settings or {}), replay=True)
    for section, info in results.data.items():
        run.data_files[section] = Path(info["path"])
    call_lifecycle(pm, "qpipe_pipeline_started", strict=True, run=run)
    warnings: list[str] = []
    for result in results.variants:
        call_lifecycle(pm, "qpipe_variant_started", run=run, variant=result.name)
        hook = "qpipe_variant_finished" if result.status == "ok" else "qpipe_variant_failed"
        extra = {"error": None} if result.status != "ok" else {}
        warnings += call_lifecycle(pm, hook, run=run, result=result, **extra)
    warnings += call_lifecycle(pm, "qpipe_pipeline_finished", run=run, results=results)
    return warnings
