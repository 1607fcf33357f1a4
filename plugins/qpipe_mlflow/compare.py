"""``qpipe compare``: a tracked run's variants as a table, read back from MLflow.

The store is found like ``qpipe run`` finds it (``--tracking-uri``, ``MLFLOW_TRACKING_URI``,
``--pipeline FILE``'s ``tracking.uri``, else ``mlflow.db`` in the pipeline's folder or the
working directory). Without ``--run`` it shows the latest qpipe run of ``--experiment`` (or
of any experiment). MLflow is imported only when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from qpipe import QpipeError
from qpipe.errors import short_error
from qpipe.results import PipelineResults, VariantResult

from qpipe_mlflow.target import Target, resolve_uri
from qpipe_mlflow.tracker import KIND, PARENT_TAG, probe, quiet_logs


def add_compare_command(app: Any) -> None:
    """Add ``compare`` to the ``qpipe`` typer app."""
    import typer

    @app.command()
    def compare(
        experiment: Optional[str] = typer.Option(None, "--experiment", "-e",
                                                 help="MLflow experiment (default: the latest qpipe run anywhere)."),
        run_id: Optional[str] = typer.Option(None, "--run", help="Parent run id (default: the latest)."),
        pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p",
                                                help="Take tracking.uri and the experiment from this pipeline file."),
        tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    ) -> None:
        """Show a tracked run's variants side by side, read back from MLflow."""
        from qpipe.commands import ErrorGuard

        with ErrorGuard(debug):
            target = find_target(pipeline, experiment, tracking_uri)
            parent, results = read_run(target, run_id, experiment is not None or pipeline is not None)
            if as_json:
                typer.echo(json.dumps({"run_id": parent.info.run_id, "run_name": parent.info.run_name,
                                       "experiment_id": parent.info.experiment_id, "tracking_uri": target.uri,
                                       **results.to_dict()}, indent=2))
                return
            print_comparison(parent, results, target)


def find_target(pipeline: Path | None, experiment: str | None, cli_uri: str | None) -> Target:
    """The store and experiment to read, by the same precedence as ``qpipe run``."""
    yaml_uri, base_dir, default_experiment = None, Path.cwd(), ""
    if pipeline is not None:
        from qpipe.commands import load_config

        loaded = load_config(pipeline)
        yaml_uri, base_dir = loaded.config.tracking.uri, loaded.base_dir
        default_experiment = loaded.config.tracking.experiment or loaded.config.name
    uri, source = resolve_uri(yaml_uri, base_dir, cli_uri)
    target = Target(uri=uri, experiment=experiment or default_experiment, source=source)
    db = target.sqlite_path
    if db is not None and not db.is_file():
        raise QpipeError(f"no MLflow store at {db}: run 'qpipe run PIPELINE' first, or pass --tracking-uri "
                         "or --pipeline")
    if target.is_http:
        probe(target)
    return target


def read_run(target: Target, run_id: str | None, by_experiment: bool) -> tuple[Any, PipelineResults]:
    """The parent run (given, or the latest) and its variants as PipelineResults."""
    from mlflow import MlflowClient

    try:
        with quiet_logs():
            client = MlflowClient(tracking_uri=target.uri)
            parent = _parent(client, target, run_id, by_experiment)
            children = client.search_runs([parent.info.experiment_id],
                                          filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                                          order_by=["attributes.start_time ASC"], max_results=1000)
    except QpipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign store: one line naming it
        raise QpipeError(f"cannot read the MLflow store at {target.uri}: {short_error(exc)}; check that it "
                         "is an MLflow store (--tracking-uri) and not damaged") from None
    tags = parent.data.tags
    selected = None
    if tags.get("qpipe.selected") or tags.get("qpipe.selected_reason"):
        selected = {"variant": tags.get("qpipe.selected"), "reason": tags.get("qpipe.selected_reason", "")}
    variants = [VariantResult(
        name=c.data.tags.get("qpipe.variant", c.info.run_name), quantizer=c.data.tags.get("qpipe.quantizer", ""),
        status=c.data.tags.get("qpipe.status") or c.info.status.lower(), error=c.data.tags.get("qpipe.error"),
        metrics=dict(c.data.metrics)) for c in children]
    results = PipelineResults(pipeline=tags.get("qpipe.pipeline", parent.info.run_name),
                              baseline=tags.get("qpipe.baseline", ""), variants=variants,
                              status=tags.get("qpipe.status", parent.info.status.lower()),
                              qpipe_version=tags.get("qpipe.version"), selected=selected,
                              headline=_headline(parent),
                              task={"name": tags["qpipe.task"]} if tags.get("qpipe.task") else None)
    return parent, results


def _headline(parent: Any) -> list[dict[str, str]]:
    """The parent's ``qpipe.headline_spec`` tag, checked: a list of ``{name: str, ...}`` mappings."""
    text = parent.data.tags.get("qpipe.headline_spec") or "[]"
    try:
        spec = json.loads(text)
    except ValueError:
        spec = None
    if not isinstance(spec, list) or not all(isinstance(item, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in item.items()) for item in spec):
        raise QpipeError(f"run '{parent.info.run_id}': its tag qpipe.headline_spec is damaged (expected a JSON "
                         f"list of {{name: metric}} mappings, got {text[:60]!r}); fix or delete the tag")
    return spec


def _parent(client: Any, target: Target, run_id: str | None, by_experiment: bool) -> Any:
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise QpipeError(f"no MLflow run '{run_id}' at {target.uri}") from None
        if run.data.tags.get(KIND) == "variant" and run.data.tags.get(PARENT_TAG):
            return client.get_run(run.data.tags[PARENT_TAG])  # a variant's run: show its pipeline run
        if run.data.tags.get(KIND) != "pipeline":
            raise QpipeError(f"run '{run_id}' is not a qpipe pipeline run (no tag {KIND}=pipeline)")
        return run
    if by_experiment:
        found = client.get_experiment_by_name(target.experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise QpipeError(f"no MLflow experiment '{target.experiment}' at {target.uri}; "
                             f"experiments: {', '.join(names) or '(none)'}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{KIND}` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not runs:
        where = f"experiment '{target.experiment}'" if by_experiment else "any experiment"
        raise QpipeError(f"no qpipe runs in {where} at {target.uri}")
    return runs[0]


def print_comparison(parent: Any, results: PipelineResults, target: Target) -> None:
    """The header line and the same table ``qpipe run`` prints."""
    import sys

    from rich.console import Console

    from qpipe.commands import summary_table

    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(f"run {parent.info.run_name} ({parent.info.run_id}), {parent.info.status}, "
                  f"experiment {parent.info.experiment_id} at {target.uri}", highlight=False)
    console.print(summary_table(results))
    for v in results.variants:
        if v.status != "ok" and v.error:
            console.print(f"{v.name} failed: {v.error}", highlight=False)
    if results.selected and results.selected.get("variant"):
        console.print(f"selected: {results.selected['variant']} ({results.selected['reason']})", highlight=False)
