"""pipeline.yaml -> validated pydantic models, with errors that name the key path and line.

Two steps: ``load_config`` checks the file's own structure; ``resolve`` checks every
component name against the registry and every ``options`` block against the component's
``Options`` model. Both run before any work starts.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qpipe.components import Backend, Calibrator, Component, Evaluator, Quantizer
from qpipe.errors import ConfigError, QpipeError
from qpipe.limits import human_bytes, limit
from qpipe.registry import Registry, unknown_name_message
from qpipe.selection import Constraint
from qpipe.yamlload import compose_and_load

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
    labels: str | None = Field(None, description="array key of the labels")

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
    num_cpus: float = Field(1.0, gt=0, description="CPUs each Ray task reserves (ray only)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ray_only(self) -> "ExecutorConfig":
        if self.name != "ray" and (self.address is not None or "num_cpus" in self.model_fields_set):
            raise ValueError("'address' and 'num_cpus' are for the ray executor; set name: ray or remove them")
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


DEFAULT_EVALUATORS = ["accuracy", "regression", "fidelity", "size", "storage", "latency"]


class SelectConfig(Strict):
    """How ``selected`` and the gate choose among the variants."""

    allow_baseline: bool = Field(False, description="let the baseline be selected (by default it is "
                                                    "the reference, and only quantized variants can ship)")


def _check_task(value: str | None) -> str | None:
    from qpipe.task import TASKS

    if value is not None and value not in TASKS:
        raise ValueError(unknown_name_message("task", value, list(TASKS)))
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
        default_factory=lambda: [ComponentRef(name=n) for n in DEFAULT_EVALUATORS]
    )
    baseline: str | None = None
    task: Annotated[str | None, AfterValidator(_check_task)] = Field(
        None, description="classification, binary or regression; default: inferred from the model and labels")
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



# --------------------------------------------------------------------------- loading


@dataclass
class LoadedConfig:
    """A validated pipeline file: the model, its path and the YAML it came from."""

    config: PipelineConfig
    path: Path
    text: str
    root: yaml.Node | None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def error(self, loc: tuple, message: str) -> ConfigError:
        """A ConfigError prefixed with file:line and the dotted key path."""
        return ConfigError(f"{self.path.name}:{_line_of(self.root, loc)}: {format_loc(loc)}: {message}")


def load_config(path: str | Path) -> LoadedConfig:
    """Read and validate a pipeline file; raise ConfigError naming the key and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    size, most = path.stat().st_size, limit("QPIPE_MAX_YAML_BYTES")
    if size > most:
        raise ConfigError(f"{path.name}: the file is {human_bytes(size)}; pipeline files are limited to "
                          f"{human_bytes(most)} (set QPIPE_MAX_YAML_BYTES to raise the limit)")
    text = _read_text(path)
    try:
        root, raw = compose_and_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path.name}{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: expected a mapping of sections (name, model, data, variants, ...)")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(path, root, exc, PipelineConfig) from None
    loaded = LoadedConfig(config=config, path=path.resolve(), text=text, root=root)
    names = [v.name for v in config.variants]
    if config.baseline is not None and config.baseline not in names:
        raise loaded.error(("baseline",), unknown_name_message("baseline variant", config.baseline, names))
    return loaded


def _read_text(path: Path) -> str:
    """The pipeline file's text; a file that is not UTF-8 or cannot be read is a ConfigError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the pipeline file {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the pipeline file is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                          "save it as UTF-8") from None


def _config_error(path: Path, root: yaml.Node | None, exc: ValidationError, model: type[BaseModel],
                  prefix: tuple = ()) -> ConfigError:
    errors = exc.errors()
    first = errors[0]
    loc = prefix + tuple(part for part in first["loc"] if not _is_union_tag(part))
    message = _describe(first, model, tuple(p for p in first["loc"] if not _is_union_tag(p)))
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return ConfigError(f"{path.name}:{_line_of(root, loc)}: {format_loc(loc)}: {message}{more}")


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member's name ('str', 'dict[str,str]', 'function-before[...]') to loc
    return isinstance(part, str) and (part in {"str", "bool", "int", "float"} or "[" in part)


def _describe(error: Any, model: type[BaseModel], loc: tuple) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{key}'{hint}; valid keys: {', '.join(valid)}"
    if kind == "missing":
        return "required key is missing"
    msg = error["msg"]
    return msg.removeprefix("Value error, ")


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names of the pydantic model found by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _unwrap(current, want_container=isinstance(part, int))
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        else:  # list[...] / dict[str, ...]
            args = typing.get_args(current)
            current = args[-1] if args else None
    current = _unwrap(current, want_container=False)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any, want_container: bool) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        for member in members:
            is_model = isinstance(member, type) and issubclass(member, BaseModel)
            is_container = typing.get_origin(member) in (list, dict)
            if (want_container and is_container) or (not want_container and is_model):
                return member
        return members[0] if members else annotation
    return annotation


def format_loc(loc: tuple) -> str:
    """('variants', 1, 'options', 'x') -> 'variants[1].options.x'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line_of(root: yaml.Node | None, loc: tuple) -> int:
    """1-based line of the YAML node at ``loc``; the deepest existing parent if it is missing."""
    node = root
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# --------------------------------------------------------------------------- resolving


C = TypeVar("C", bound=Component)


@dataclass
class Bound(Generic[C]):
    """A component instance with its validated options and where it was declared."""

    component: C
    plugin: str
    loc: tuple


@dataclass
class ResolvedVariant:
    config: VariantConfig
    index: int
    quantizer: Bound[Quantizer]
    backend: Bound[Backend]
    calibrator: Bound[Calibrator] | None


@dataclass
class ResolvedPipeline:
    """Every name resolved, every option validated: ready to run."""

    loaded: LoadedConfig
    registry: Registry
    variants: list[ResolvedVariant]
    evaluators: list[Bound[Evaluator]]
    baseline: str

    @property
    def constraints(self) -> list[Constraint]:
        return [Constraint.parse(text) for text in self.loaded.config.constraints]

    @property
    def config(self) -> PipelineConfig:
        return self.loaded.config

    def strict(self, variant: str) -> bool:
        """Whether a warning fails ``variant``: its own ``strict``, else the pipeline's."""
        own = next((rv.config.strict for rv in self.variants if rv.config.name == variant), None)
        return self.config.strict if own is None else own


def _bind(loaded: LoadedConfig, registry: Registry, kind: str, name: str, options: dict,
          name_loc: tuple, options_loc: tuple) -> Bound[Any]:
    try:
        entry = registry.get(kind, name)
    except QpipeError as exc:
        raise loaded.error(name_loc, str(exc)) from None
    cls = entry.cls
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as exc:
        raise _config_error(loaded.path, loaded.root, exc, cls.Options, options_loc) from None
    return Bound(component=cls(opts), plugin=entry.plugin, loc=name_loc)


def resolve(loaded: LoadedConfig, registry: Registry, only: list[str] | None = None) -> ResolvedPipeline:
    """Bind every component of ``loaded`` from ``registry``; ``only`` limits the variants."""
    cfg = loaded.config
    _check_grid_size(loaded, registry)
    for bname, bopts in cfg.backends.items():  # each backends entry names a backend and valid options
        _bind(loaded, registry, "backend", bname, bopts, ("backends", bname), ("backends", bname))
    expanded = [(i, ev) for i, v in enumerate(cfg.variants) for ev in expand_grid(v, registry)]
    names = [v.name for v in cfg.variants] + [ev.name for _, ev in expanded]
    for wanted in only or []:
        if wanted not in names:
            raise ConfigError(unknown_name_message("variant", wanted, names) + " (from --only)")

    baseline = cfg.baseline or _default_baseline(cfg)
    variants: list[ResolvedVariant] = []
    seen: set[str] = set()
    for i, v in expanded:
        if v.name in seen:
            raise loaded.error(("variants", i, "name"), f"variant name '{v.name}' is used twice "
                                                        "(after expanding option lists)")
        seen.add(v.name)
        if only and v.name not in only and v.name != baseline and cfg.variants[i].name not in only:
            continue
        quantizer = _bind(loaded, registry, "quantizer", v.quantizer, v.options,
                          ("variants", i, "quantizer"), ("variants", i, "options"))
        qcls = type(quantizer.component)
        if v.backend is not None:
            bname, bopts, bloc = v.backend.name, v.backend.options, ("variants", i, "backend")
        else:
            bname, bopts, bloc = qcls.default_backend, {}, ("variants", i, "quantizer")
        merged = {**cfg.backends.get(bname, {}), **bopts}
        backend = _bind(loaded, registry, "backend", bname, merged, bloc, bloc + ("options",))
        calibrator = None
        if qcls.needs_calibration:
            ref = v.calibrator or cfg.calibrator
            cloc = ("variants", i, "calibrator") if v.calibrator else ("calibrator",)
            calibrator = _bind(loaded, registry, "calibrator", ref.name, ref.options, cloc, cloc + ("options",))
            if cfg.data.calibration is None:
                raise loaded.error(("data",), f"variant '{v.name}' ({v.quantizer}) needs calibration data: "
                                              "add data.calibration")
        elif v.calibrator is not None:
            raise loaded.error(("variants", i, "calibrator"),
                               f"{v.quantizer} does not use a calibrator; remove this key")
        formats = type(backend.component).formats
        if formats and qcls.output_format not in formats:
            raise loaded.error(bloc, f"backend '{bname}' runs {', '.join(formats)} artifacts, but "
                                     f"{v.quantizer} produces {qcls.output_format}")
        variants.append(ResolvedVariant(v, i, quantizer, backend, calibrator))
    evaluators = [
        _bind(loaded, registry, "evaluator", ref.name, ref.options, ("evaluators", i), ("evaluators", i, "options"))
        for i, ref in enumerate(cfg.evaluators)
    ]
    # the baseline runs first: deltas of every other variant are computed against it
    variants.sort(key=lambda rv: rv.config.name != baseline)
    resolved = ResolvedPipeline(loaded, registry, variants, evaluators, baseline)
    from qpipe.metrics import check_pipeline

    check_pipeline(resolved)  # metric names, and what quantizers need from the pipeline
    return resolved


def _check_grid_size(loaded: LoadedConfig, registry: Registry) -> None:
    """Refuse option lists that expand to more than QPIPE_MAX_VARIANTS variants, before
    expanding them (four lists of 300 values would be 8.1e9 variants)."""
    sizes = [math.prod(len(values) for _, values in _grid_axes(v, registry)) for v in loaded.config.variants]
    most = limit("QPIPE_MAX_VARIANTS")
    if sum(sizes) > most:
        i = max(range(len(sizes)), key=sizes.__getitem__)
        lists = " x ".join(str(len(values)) for _, values in _grid_axes(loaded.config.variants[i], registry))
        raise loaded.error(("variants", i, "options"),
                           f"the option lists expand to {sum(sizes):,} variants ({lists} here); the limit is "
                           f"{most}: shorten the lists or set QPIPE_MAX_VARIANTS to raise it")


def _grid_axes(variant: VariantConfig, registry: Registry) -> list[tuple[str, list]]:
    """(option, values) of each option given as a list where the option takes one value;
    [] when there is no grid (or an empty list, which fails option validation by itself)."""
    entry = registry.entries["quantizer"].get(variant.quantizer)
    if entry is None:
        return []
    fields = entry.cls.Options.model_fields
    axes = [(key, value) for key, value in variant.options.items()
            if isinstance(value, list) and key in fields and not _accepts_list(fields[key].annotation)]
    return [] if any(len(values) == 0 for _, values in axes) else axes


def expand_grid(variant: VariantConfig, registry: Registry) -> list[VariantConfig]:
    """A variant whose options give a list where the option takes one value becomes one
    variant per combination, named ``<name>-<option>-<value>...`` (a small grid search)."""
    axes = _grid_axes(variant, registry)
    if not axes:
        return [variant]
    combos: list[dict[str, Any]] = [{}]
    for key, values in axes:
        combos = [{**combo, key: value} for combo in combos for value in values]
    out = []
    for combo in combos:
        suffix = "-".join(f"{key}-{_slug(value)}" for key, value in combo.items())
        out.append(variant.model_copy(update={"name": f"{variant.name}-{suffix}",
                                              "options": {**variant.options, **combo}}))
    return out


def _accepts_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        return any(_accepts_list(a) for a in typing.get_args(annotation))
    return False


def _slug(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


def _default_baseline(cfg: PipelineConfig) -> str:
    for v in cfg.variants:
        if v.quantizer == "tflite.float32":
            return v.name
    return cfg.variants[0].name


