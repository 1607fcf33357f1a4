"""The pipeline file's schema: one pydantic model per section of pipeline.yaml.

Unknown keys are errors (``Strict``). ``qpipe.config`` loads a file into ``PipelineConfig``
and resolves it against the installed plugins.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from qpipe.registry import unknown_name_message
from qpipe.selection import Constraint

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class Strict(BaseModel):
    """Base for pipeline sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def _one_of_path_or_function(model: Any, what: str) -> Any:
    if bool(model.path) == bool(model.function):
        raise ValueError(f"{what} needs exactly one of 'path' or 'function'")
    if model.function and not re.match(r"^[\w.]+:[\w.]+$", model.function):
        raise ValueError(f"function must look like 'package.module:function', got {model.function!r}")
    return model


class ModelSource(Strict):
    """Where the model comes from: a Keras file / SavedModel folder, or ``module:function``."""

    path: str | None = Field(None, description="a .keras or .h5 file, or a SavedModel folder")
    function: str | None = Field(None, description="'module:function' returning a model")
    safe_mode: bool = Field(True, description="refuse model files holding code (docs/security.md); false runs it")

    @model_validator(mode="after")
    def _check(self) -> "ModelSource":
        return _one_of_path_or_function(self, "model")


class DataSource(Strict):
    """An .npz file (arrays picked by key) or ``module:function`` returning arrays."""

    path: str | None = Field(None, description=".npz file with named arrays, a .npy file or a folder of .npy files")
    function: str | None = Field(None, description="'module:function' returning arrays or a tf.data.Dataset")
    inputs: str | dict[str, str] | None = Field(
        None, description="array key of the input, or a mapping of model input name to key"
    )
    labels: str | dict[str, str] | None = Field(
        None, description="array key of the labels, or for a model with several outputs a mapping of "
                          "output name to key (outputs left out are compared with the baseline only)")

    @model_validator(mode="after")
    def _check(self) -> "DataSource":
        return _one_of_path_or_function(self, "data source")


class DataConfig(Strict):
    evaluation: DataSource
    calibration: DataSource | None = None
    training: DataSource | None = None
    validation: DataSource | None = None
    allow_nonfinite: bool = Field(False, description="NaN/Inf in the data: a warning instead of an error")


class ComponentRef(Strict):
    """A component by name with its options; a plain string means no options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class VariantConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    quantizer: str
    options: dict[str, Any] = Field(default_factory=dict)
    calibrator: ComponentRef | None = None
    backend: ComponentRef | None = None
    strict: bool | None = Field(None, description="a sanity-check warning fails this variant; "
                                                   "default: the pipeline's strict")


class RegisterConfig(Strict):
    name: str
    variant: str


class TrackingConfig(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///mlflow.db beside the pipeline")
    experiment: str | None = Field(None, description="MLflow experiment; default the pipeline's name")
    register_model: RegisterConfig | None = Field(
        None, alias="register", description="register one variant in the MLflow model registry")
    log_models: bool = Field(True, description="log each variant's artifact file")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


#: the placeholders ``output.dir`` may use
OUTPUT_PLACEHOLDERS = ("name", "timestamp")


class OutputConfig(Strict):
    dir: str | None = Field(None, description="output folder; default runs/<name>-<timestamp>")

    @field_validator("dir")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        for found in re.findall(r"\{([^{}]*)\}", value or ""):
            if found not in OUTPUT_PLACEHOLDERS:
                valid = ", ".join("{" + p + "}" for p in OUTPUT_PLACEHOLDERS)
                raise ValueError(f"unknown placeholder '{{{found}}}'; valid: {valid}")
        return value


class ExecutorConfig(Strict):
    """Where variants run: ``local`` (this machine; worker processes when ``jobs`` > 1) or ``ray``."""

    name: typing.Literal["local", "ray"] = Field("local", description="local or ray")
    jobs: int = Field(1, ge=1, description="variants run at once (local: worker processes when > 1; "
                                           "ray: tasks in flight, default all)")
    address: str | None = Field(None, description="Ray cluster address (ray only); default: start a local Ray")
    num_cpus: float = Field(1.0, gt=0, description="CPUs each Ray task reserves at least (ray only)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources every task "
                                        "requests, to pin variants to nodes that have them (ray only)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ray_only(self) -> "ExecutorConfig":
        if self.name != "ray" and (self.address is not None or {"num_cpus", "resources"} & self.model_fields_set):
            raise ValueError("'address', 'num_cpus' and 'resources' are for the ray executor; "
                             "set name: ray or remove them")
        return self


class CacheConfig(Strict):
    """The variant cache: reuse a variant's artifact and metrics when nothing it depends on changed."""

    enabled: bool = True
    dir: str | None = Field(None, description="cache folder; default .qpipe-cache beside the pipeline "
                                              "(or $QPIPE_CACHE_DIR)")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


def _check_constraint(text: str) -> str:
    Constraint.parse(text)
    return text


ConstraintText = Annotated[str, AfterValidator(_check_constraint)]


class Objective(Strict):
    """What the selection optimizes: exactly one of ``maximize`` or ``minimize`` a metric."""

    maximize: str | None = None
    minimize: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "Objective":
        if bool(self.maximize) == bool(self.minimize):
            raise ValueError("objective needs exactly one of 'maximize' or 'minimize' (a metric name)")
        return self


class SelectConfig(Strict):
    """How ``selected`` and the gate choose among the variants."""

    allow_baseline: bool = Field(False, description="let the baseline be selected (by default it is "
                                                    "the reference, and only quantized variants can ship)")
    output_tolerance: float = Field(0.05, ge=0, description="a model with several outputs: a labelled output "
                                    "no constraint names may lose at most this fraction of the baseline's "
                                    "headline metrics (0.05: 5%) in the selected variant")


def _check_task(value: str | dict[str, str] | None) -> str | dict[str, str] | None:
    from qpipe.task import TASKS

    for task in (value.values() if isinstance(value, dict) else [value]):
        if task is not None and task not in TASKS:
            raise ValueError(unknown_name_message("task", task, list(TASKS)))
    return value


class PipelineConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    model: ModelSource
    data: DataConfig
    calibrator: ComponentRef = Field(default_factory=lambda: ComponentRef(name="sample"))
    backends: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="default options per backend name"
    )
    variants: list[VariantConfig] = Field(min_length=1)
    evaluators: list[ComponentRef] = Field(
        default_factory=list, description="default: the installed evaluators that declare a default_order "
                                          "(with the built-ins: accuracy, regression, fidelity, size, storage, latency)"
    )
    baseline: str | None = None
    task: Annotated[str | dict[str, str] | None, AfterValidator(_check_task)] = Field(
        None, description="classification, binary or regression (or a mapping of output name to task for a "
                          "model with several outputs); default: inferred per output from the model and labels")
    objective: Objective | None = Field(None, description="{maximize: METRIC} or {minimize: METRIC}")
    constraints: list[ConstraintText] = Field(default_factory=list, description="'METRIC OP NUMBER' strings")
    gate: bool = Field(False, description="exit with code 3 when no variant meets the constraints")
    select: SelectConfig = Field(default_factory=SelectConfig)
    strict: bool = Field(False, description="a sanity-check warning fails the variant (every variant)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    def objective_pair(self) -> tuple[str, str] | None:
        """("maximize" | "minimize", metric), or None."""
        if self.objective is None:
            return None
        if self.objective.maximize:
            return "maximize", self.objective.maximize
        return "minimize", str(self.objective.minimize)

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[VariantConfig]) -> list[VariantConfig]:
        seen: set[str] = set()
        for v in variants:
            if v.name in seen:
                raise ValueError(f"variant name '{v.name}' is used twice")
            seen.add(v.name)
        return variants
