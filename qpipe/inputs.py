"""The model and the datasets a run works on, loaded once per run (and once per worker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qpipe.components import LoadedModel
from qpipe.config import ResolvedPipeline
from qpipe.data import Dataset, bind_to_model, load_source
from qpipe.errors import QpipeError, short_error
from qpipe.plugins import QpipePluginManager
from qpipe.task import Task, decide_task, decide_tasks, output_width

#: the data sections of a pipeline, in the order they are loaded
SECTIONS = ("evaluation", "calibration", "training", "validation")


@dataclass
class Inputs:
    """The model and the datasets, loaded once per run."""

    model: LoadedModel
    evaluation: Dataset
    calibration: Dataset | None = None
    training: Dataset | None = None
    validation: Dataset | None = None
    data_files: dict[str, Path] = field(default_factory=dict)
    #: sha256 of data files already hashed while loading, by section (not hashed again)
    data_sha256: dict[str, str] = field(default_factory=dict)
    task: Task = field(default_factory=lambda: Task(None, "inferred", "not judged"))
    #: a model with several outputs: the task of each, by output name (empty for one output;
    #: ``task`` is then the first labelled output's)
    tasks: dict[str, Task] = field(default_factory=dict)
    #: the outputs of a multi-output model that have no evaluation labels
    unlabelled: list[str] = field(default_factory=list)


def load_model(pm: QpipePluginManager, resolved: ResolvedPipeline) -> LoadedModel:
    """Load the model through the ``qpipe_load_model`` hook."""
    source = resolved.config.model
    try:
        model = pm.hook.qpipe_load_model(source=source, base_dir=resolved.loaded.base_dir)
    except QpipeError:
        raise
    except Exception as exc:
        raise QpipeError(f"model: cannot load {source.path or source.function}: {short_error(exc)}") from exc
    if model is None:
        raise QpipeError(f"model: no plugin can load {source.path or source.function}")
    return model


def used_sections(resolved: ResolvedPipeline) -> dict[str, bool]:
    """Which data sections the selected variants need (evaluation always)."""
    trains = any(type(rv.quantizer.component).needs_training for rv in resolved.variants)
    return {"evaluation": True, "calibration": any(rv.calibrator is not None for rv in resolved.variants),
            "training": trains, "validation": trains}


def data_files(resolved: ResolvedPipeline) -> dict[str, Path]:
    """The files behind the pipeline's data sections (function sources have none)."""
    files = {}
    for section in SECTIONS:
        source = getattr(resolved.config.data, section)
        if source is not None and source.path:
            files[section] = (resolved.loaded.base_dir / source.path).resolve()
    return files


def load_inputs(pm: QpipePluginManager, resolved: ResolvedPipeline) -> Inputs:
    """Load the model and every data section the selected variants need; fail early."""
    model = load_model(pm, resolved)
    data_cfg = resolved.config.data

    def load(section: str) -> Dataset | None:
        source = getattr(data_cfg, section)
        if source is None:
            return None
        return bind_to_model(load_source(source, resolved.loaded.base_dir, f"data.{section}"), model.inputs,
                             f"data.{section}", allow_nonfinite=data_cfg.allow_nonfinite, model_outputs=model.outputs)

    loaded = {section: load(section) if used else None for section, used in used_sections(resolved).items()}
    inputs = Inputs(model=model, **loaded, data_files=data_files(resolved))  # type: ignore[arg-type]
    if len(model.outputs) > 1:
        labels = inputs.evaluation.labels if isinstance(inputs.evaluation.labels, dict) else {}
        inputs.tasks = decide_tasks(resolved.config.task, model.outputs, labels)
        inputs.unlabelled = [t.name for t in model.outputs if t.name not in labels]
        inputs.task = next((t for t in inputs.tasks.values() if t.name), next(iter(inputs.tasks.values())))
        return inputs
    width = output_width(model.outputs[0].shape) if model.outputs else None
    declared = resolved.config.task
    if isinstance(declared, dict):  # a mapping for one output: its only value
        declared = next(iter(declared.values()), None)
    inputs.task = decide_task(declared, width, inputs.evaluation.labels)
    return inputs
