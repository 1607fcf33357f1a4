"""The values the run core passes around: the baseline a variant is compared with, and a
finished variant's ``Outcome`` (its result, predictions, raw metrics, files and hook calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpipe.components import Artifact
from qpipe.config import ResolvedVariant
from qpipe.errors import QpipeError, short_error
from qpipe.heads import Predictions
from qpipe.results import VariantResult


class WorkerError(QpipeError):
    """A variant could not run in a worker (the worker failed to start or died)."""


@dataclass
class Baseline:
    """The reference every other variant is compared with: its predictions (fidelity), its
    artifact (size ratio, checks) and its raw metrics (``<metric>_delta``)."""

    name: str
    outputs: Predictions | None = None  # one array, or {output name: array}
    artifact: Artifact | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def shipped(self, output_dir: Path) -> ShippedBaseline:
        """This baseline as it travels to a worker: the artifact's files as bytes."""
        files: dict[str, bytes] = {}
        relative = None
        if self.artifact is not None and self.artifact.path.exists():
            path = self.artifact.path.resolve()
            base = output_dir.resolve() if output_dir.resolve() in path.parents else path.parent
            files, relative = collect_files(path, base), str(path.relative_to(base))
        return ShippedBaseline(self.name, self.outputs, dict(self.metrics), relative,
                               self.artifact.format if self.artifact else "tflite", files)


@dataclass
class ShippedBaseline:
    """A ``Baseline`` on its way to a worker (``unpack`` it into a private folder there)."""

    name: str
    outputs: Predictions | None
    metrics: dict[str, float]
    artifact: str | None
    format: str
    files: dict[str, bytes] = field(default_factory=dict)

    def unpack(self, folder: Path) -> Baseline:
        write_files(folder, self.files)
        artifact = Artifact(folder / self.artifact, self.format) if self.artifact else None
        return Baseline(self.name, self.outputs, artifact, dict(self.metrics))


@dataclass
class Outcome:
    """One finished variant, as the variant runner or an executor hands it back."""

    result: VariantResult
    #: its predictions on the evaluation data (fidelity of later variants, the cache)
    outputs: Predictions | None = None  # one array, or {output name: array}
    #: its metrics before deltas (the cache; deltas if it is the baseline)
    raw_metrics: dict[str, float] | None = None
    #: its artifact, when it ran in the output folder
    artifact: Artifact | None = None
    #: files the variant wrote (relative path -> bytes); empty when it ran in the output folder
    files: dict[str, bytes] = field(default_factory=dict)
    #: lifecycle calls made while it ran, to replay; empty when they were made live
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    live: bool = False
    #: restored from the cache rather than computed
    restored: bool = False
    #: the exception that failed it (not sent back from workers: it may not pickle)
    error: BaseException | None = None


def plain_options(options: Any) -> dict[str, Any]:
    """A component's options as JSON-friendly values."""
    return options.model_dump(mode="json") if hasattr(options, "model_dump") else dict(options or {})


def new_result(rv: ResolvedVariant) -> VariantResult:
    """The empty result of a variant: its name and the components it uses."""
    v = rv.config
    return VariantResult(
        name=v.name, quantizer=v.quantizer, options=plain_options(rv.quantizer.component.options),
        backend={"name": rv.backend.component.name, "options": plain_options(rv.backend.component.options)},
        calibrator=None if rv.calibrator is None else {
            "name": rv.calibrator.component.name, "options": plain_options(rv.calibrator.component.options)},
    )


def failed_outcome(rv: ResolvedVariant, message: str, error: BaseException | None = None) -> Outcome:
    """A variant that failed outside its stages (its worker could not start or died)."""
    result = new_result(rv)
    result.status, result.error = "failed", short_error(message)
    return Outcome(result=result, error=error or WorkerError(short_error(message)))


def with_deltas(metrics: dict[str, float], baseline: dict[str, float] | None) -> dict[str, float]:
    """``metrics`` plus ``<metric>_delta`` against the baseline's raw metrics, for each it has."""
    if baseline is None:
        return dict(metrics)
    out = dict(metrics)
    for key, value in metrics.items():
        if not key.endswith("_delta") and key in baseline:
            out[f"{key}_delta"] = round(value - baseline[key], 10)
    return out


def error_log_name(variant: str) -> str:
    """The file in the output folder holding a failed variant's full error and traceback."""
    return f"{variant}.error.txt"


def collect_files(path: Path, base: Path) -> dict[str, bytes]:
    """The file or folder ``path`` as ``{path relative to base: bytes}``."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return {str(f.relative_to(base)): f.read_bytes() for f in files}


def write_files(output_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (from ``collect_files``) under ``output_dir``; never outside it."""
    root = output_dir.resolve()
    for relative, data in files.items():
        target = (output_dir / relative).resolve()
        if root not in target.parents:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
