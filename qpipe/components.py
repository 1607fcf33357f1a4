"""The component base classes plugins subclass, and the small values passed between stages.

Every component declares a dotted ``name`` (``tflite.int8``) and an ``Options`` pydantic
model. The host validates a pipeline's options against ``Options`` before any work starts
and hands the component an instance of it. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from qpipe.data import Dataset


class Options(BaseModel):
    """Base for component options: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # built on first use: faster start-up


#: the base Options class, named so annotations inside components (whose ``Options`` is a
#: class attribute) can refer to it
OptionsBase = Options


class Component:
    """Base of the four component kinds. Subclasses set ``name`` and may set ``Options``."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: OptionsBase | None = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring, shown by ``qpipe plugins``."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


# --------------------------------------------------------------------------- values


@dataclass
class TensorInfo:
    """Name, shape (``None`` for free dimensions) and dtype name of a model input or output."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"


@dataclass
class LoadedModel:
    """A model as loaded by a ``qpipe_load_model`` hook.

    ``model`` is the framework object (a Keras 3 or tf_keras model, or a loaded SavedModel);
    ``flavor`` says which (``keras3``, ``tf_keras``, ``saved_model``, or a plugin's own).
    ``path`` is the file or folder it came from (``None`` for ``module:function`` models).
    ``model`` is shared by all variants and must not be changed: use ``copy()`` for a clone.
    """

    model: Any
    flavor: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    path: Path | None = None
    sha256: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: set by the loading plugin: writes the model as a TF SavedModel into the given folder
    exporter: Callable[[Path], None] | None = field(default=None, repr=False)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """Compute a derived value once per pipeline run (e.g. an exported SavedModel)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def copy(self) -> Any:
        """A private clone of ``model`` with copied weights, free to train, prune or change.

        ``model`` itself is shared by every variant of the run: a quantizer must not change it
        (the host checks its weights after each call and fails a variant that did). Works for
        ``keras3`` and ``tf_keras`` models (Sequential, Functional, and subclassed models that
        support ``clone_model``).
        """
        from qpipe.tfenv import keras3, tf_keras

        if self.flavor not in ("keras3", "tf_keras"):
            raise NotImplementedError(f"a {self.flavor} model cannot be copied; only Keras models can")
        keras = keras3() if self.flavor == "keras3" else tf_keras()
        try:  # from the config keeps the layer names (tf_keras' clone_model renames layers)
            clone = type(self.model).from_config(self.model.get_config())
        except Exception:  # e.g. a subclassed model without get_config
            clone = keras.models.clone_model(self.model)
        clone.set_weights(self.model.get_weights())
        return clone

    def saved_model_dir(self) -> Path:
        """The model as a TF SavedModel folder, exported once per run and shared by variants."""
        if self.path is not None and self.flavor == "saved_model":
            return self.path
        if self.exporter is None:
            raise NotImplementedError(f"a {self.flavor} model cannot be exported as a SavedModel")

        def export() -> Path:
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="qpipe-savedmodel-"))
            assert self.exporter is not None  # checked above
            self.exporter(folder / "model")
            return folder / "model"

        return self.memo("saved_model_dir", export)


@dataclass(frozen=True)
class Expects:
    """What a quantizer meant its artifact to be; checked after every variant (``qpipe.sanity``).

    ``smaller``: the file is smaller than the baseline's. ``quantized_weights``: no conv /
    dense / embedding weight stays in float. ``full_integer``: no op computes in float.
    ``keep_float`` names the layers (or tensors) kept in float on purpose; weight tensors with
    fewer than ``min_weight_elements`` elements may stay float (the converter's dynamic-range
    rule). A claim that does not hold is a named warning on the variant.
    """

    smaller: bool = False
    quantized_weights: bool = False
    full_integer: bool = False
    keep_float: tuple[str, ...] = ()
    min_weight_elements: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The claims made, JSON-friendly (kept in the variant's ``metadata.expects``)."""
        claims = [name for name in ("smaller", "quantized_weights", "full_integer") if getattr(self, name)]
        out: dict[str, Any] = {"claims": claims}
        if self.keep_float:
            out["keep_float"] = list(self.keep_float)
        if self.min_weight_elements:
            out["min_weight_elements"] = self.min_weight_elements
        return out


@dataclass
class Artifact:
    """What a quantizer produced: a file (``format`` says which kind), facts about it, and what
    the quantizer meant it to be (``expects``)."""

    path: Path
    format: str = "tflite"
    metadata: dict[str, Any] = field(default_factory=dict)
    expects: Expects = field(default_factory=Expects)

    def size_bytes(self) -> int:
        """Bytes on disk (summed over a folder's files)."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size

    def sha256(self) -> str:
        """Hex digest of the artifact file."""
        return file_sha256(self.path)


@dataclass
class Calibration:
    """What a calibrator produced: representative samples and, optionally, activation ranges.

    ``samples`` is a Dataset (inputs by model input name, labels if known); ``ranges`` maps a
    tensor name to ``(min, max)`` for quantizers that honour estimated ranges (estimated for
    8-bit activations). ``estimate``, if set, gives ranges for another activation width
    (16 for int16x8): quantizers call ``ranges_for(bits)``. ``metadata`` holds JSON-friendly
    facts (the estimator, how the statistics were computed) a quantizer may record.
    """

    samples: "Dataset"
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    estimate: Callable[[int], dict[str, tuple[float, float]]] | None = field(default=None, repr=False)

    def ranges_for(self, bits: int) -> dict[str, tuple[float, float]]:
        """Activation ranges for ``bits``-bit activations (empty: let the quantizer calibrate)."""
        return self.estimate(bits) if self.estimate is not None else self.ranges


# --------------------------------------------------------------------------- contexts


@dataclass
class Context:
    """Shared by every stage of one variant: where to write, how to report progress."""

    variant: str
    work_dir: Path
    report: Callable[[str], None] = lambda message: None
    log_metrics: Callable[[dict[str, float], int | None], None] = lambda metrics, step: None
    #: record a warning for this variant: ``warn(message, code="...")`` (kept in the variant's
    #: ``warnings`` in results.json, shown after the run; fails the variant under ``strict``)
    warn: Callable[..., None] = lambda message, code="plugin": None
    #: record a non-numeric fact about this variant in its results (``metadata[key]``)
    record: Callable[[str, Any], None] = lambda key, value: None

    def artifact_path(self, suffix: str = ".tflite") -> Path:
        """Where this variant's artifact goes: ``<output>/<variant><suffix>``."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir / f"{self.variant}{suffix}"


@dataclass
class CalibrateContext(Context):
    """Input to ``Calibrator.calibrate``."""

    model: LoadedModel | None = None
    data: "Dataset | None" = None


@dataclass
class QuantizeContext(Context):
    """Input to ``Quantizer.quantize``: the model and whatever data the quantizer asked for."""

    model: LoadedModel | None = None
    calibration: Calibration | None = None
    training: "Dataset | None" = None
    validation: "Dataset | None" = None
    #: the pipeline's constraints (``qpipe.selection.Constraint``), for quantizers that search
    constraints: list = field(default_factory=list)
    #: run an artifact through the variant's backend and evaluators: metrics with deltas
    evaluate: Callable[["Artifact"], dict[str, float]] | None = None


@dataclass
class EvalContext(Context):
    """Input to ``Evaluator.evaluate``.

    ``outputs`` are the variant's predictions on ``data``; ``baseline_outputs`` and
    ``baseline_artifact`` are the baseline variant's (the same objects when this variant is
    the baseline). Several outputs: a quality evaluator runs per output (``output``; its
    ``outputs``, ``baseline_outputs``, ``data.labels``; metrics named ``<output>/<metric>``), a
    cost evaluator once (``output`` empty, ``outputs`` as ``{name: array}``).
    """

    data: "Dataset | None" = None
    outputs: Any = None  # np.ndarray, or {output name: np.ndarray} for a cost evaluator
    artifact: Artifact | None = None
    runner: "Runner | None" = None
    baseline_outputs: Any = None
    baseline_artifact: Artifact | None = None
    model: LoadedModel | None = None
    output: str = ""  # the output measured; "" for one output or a cost evaluator


# --------------------------------------------------------------------------- kinds


class Quantizer(Component):
    """Turns the loaded model into an artifact (a ``.tflite`` for the built-ins)."""

    kind: ClassVar[str] = "quantizer"
    #: whether the host must run a calibrator and pass ``ctx.calibration``
    needs_calibration: ClassVar[bool] = False
    #: whether the host must load ``data.training`` and pass ``ctx.training``
    needs_training: ClassVar[bool] = False
    #: backend used when the variant names none; None: the backend that declares itself the
    #: default for ``output_format`` (``Backend.default_for``)
    default_backend: ClassVar[str | None] = None
    #: whether it makes the unquantized reference: the first variant using such a quantizer is
    #: the pipeline's baseline unless ``baseline:`` names one (else the first variant)
    reference: ClassVar[bool] = False
    #: the ``Artifact.format`` this quantizer produces
    output_format: ClassVar[str] = "tflite"
    #: what one variant needs on a Ray node: ``num_cpus``, ``memory`` (bytes), custom resources;
    #: quantizers that train get 1 GiB of memory unless they declare it (``qpipe.remote``)
    resources: ClassVar[dict[str, float]] = {}
    #: metric names it may add through ``Artifact.metadata["metrics"]`` (constraints may name them)
    metrics: ClassVar[tuple[str, ...]] = ()
    #: whether it converts through ``qpipe.tflite.convert``: a run in this process then starts
    #: the converter process while it loads the model (``qpipe.convertproc``)
    uses_converter: ClassVar[bool] = False

    def needs_constraints(self) -> bool:
        """Whether these options make the quantizer search against the pipeline's constraints
        (validation then refuses a pipeline that declares none)."""
        return False

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        raise NotImplementedError


class Calibrator(Component):
    """Chooses representative samples (and optionally activation ranges) for a quantizer."""

    kind: ClassVar[str] = "calibrator"

    def calibrate(self, ctx: CalibrateContext) -> Calibration:
        raise NotImplementedError


class Runner:
    """A loaded artifact that predicts. Returned by ``Backend.load``."""

    def predict_batch(self, inputs: dict[str, np.ndarray]) -> Any:
        """Predict one batch (input name -> array): the output's array, or for a model with
        several outputs every one as ``{output name: array}`` (``qpipe.heads``)."""
        raise NotImplementedError

    def predict(self, data: "Dataset", batch_size: int) -> Any:
        """Predict a whole dataset batch by batch and concatenate the outputs (each output's)."""
        from qpipe.heads import concat

        return concat([self.predict_batch(batch) for batch in data.batches(batch_size)])

    def with_threads(self, threads: int) -> "Runner":
        """A runner like this one using ``threads`` threads (default: this runner)."""
        return self

    def close(self) -> None:
        """Release resources (optional)."""


class Backend(Component):
    """Loads an artifact into a Runner."""

    kind: ClassVar[str] = "backend"
    #: artifact formats this backend can run
    formats: ClassVar[tuple[str, ...]] = ()
    #: formats it runs when a variant names no backend (one backend per format may claim it)
    default_for: ClassVar[tuple[str, ...]] = ()

    def load(self, artifact: Artifact, model: LoadedModel) -> Runner:
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        """Batch size for evaluation; backends with a ``batch_size`` option override it."""
        return int(getattr(self.options, "batch_size", 256))


class Evaluator(Component):
    """Computes named metrics for one variant.

    An evaluator declares what it measures so the host can check a pipeline before running
    it (constraint and objective names) and show the right columns: ``metrics`` (every name it
    can produce), ``headline`` (the ones the summary table, summary.md, charts and the MLflow
    parent show), ``tasks`` (``qpipe.task.TASKS`` it applies to; empty: any),
    ``lower_is_better`` (headline metrics where smaller wins: errors, sizes, times) and
    ``role`` (``quality``: how good the variant is; ``cost``: what it takes, e.g. bytes, ms).
    """

    kind: ClassVar[str] = "evaluator"
    #: set when the evaluator cannot run without labels
    needs_labels: ClassVar[bool] = False
    #: metric names it can produce (``declared_metrics`` may add option-dependent ones)
    metrics: ClassVar[tuple[str, ...]] = ()
    #: the metrics to show in the summary table, summary.md, charts and the MLflow parent
    headline: ClassVar[tuple[str, ...]] = ()
    #: tasks it applies to ("classification", "binary", "regression"); () = any
    tasks: ClassVar[tuple[str, ...]] = ()
    #: metrics where lower is better; every other one: higher is better
    lower_is_better: ClassVar[tuple[str, ...]] = ()
    #: "quality" (how good: charted against size, with deltas in the table) or "cost"
    role: ClassVar[str] = "quality"
    #: set when its metrics measure the machine, not the artifact (latency): a variant restored
    #: from the cache runs it again instead of replaying the stored numbers
    remeasure: ClassVar[bool] = False
    #: set to run in pipelines that list no ``evaluators``; those run in ascending order
    default_order: ClassVar[int | None] = None

    @classmethod
    def declared_metrics(cls, options: Options | None = None) -> tuple[str, ...]:
        """The metric names this evaluator produces with ``options`` (default: ``metrics``)."""
        return cls.metrics

    @classmethod
    def applies_to(cls, task: str | None) -> bool:
        """Whether it means something for ``task`` (an unknown task: assume it does)."""
        return not cls.tasks or task is None or task in cls.tasks

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        raise NotImplementedError


KINDS: dict[str, type[Component]] = {
    "quantizer": Quantizer,
    "calibrator": Calibrator,
    "backend": Backend,
    "evaluator": Evaluator,
}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, or of a folder's files in sorted order."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
