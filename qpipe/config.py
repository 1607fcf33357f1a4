"""pipeline.yaml -> validated pydantic models, with errors that name the key path and line.

Two steps: ``load_config`` checks the file's own structure (the models in ``qpipe.schema``);
``resolve`` checks every component name against the registry and every ``options`` block
against the component's ``Options`` model, expanding option lists (``qpipe.grid``). Both run
before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import ValidationError

from qpipe.components import Backend, Calibrator, Component, Evaluator, Quantizer
from qpipe.configerrors import config_error, format_loc, line_of
from qpipe.errors import ConfigError, QpipeError
from qpipe.grid import expand_grid, oversized_grid
from qpipe.limits import human_bytes, limit
from qpipe.registry import Registry, unknown_name_message
from qpipe.schema import ComponentRef, PipelineConfig, VariantConfig
from qpipe.selection import Constraint
from qpipe.yamlload import compose_and_load


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
        return ConfigError(f"{self.path.name}:{line_of(self.root, loc)}: {format_loc(loc)}: {message}")


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
        raise config_error(path, root, exc, PipelineConfig) from None
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
    """One variant (after expanding option lists) with its components bound; ``index`` is
    its position under ``variants`` in the file."""

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
        raise config_error(loaded.path, loaded.root, exc, cls.Options, options_loc) from None
    return Bound(component=cls(opts), plugin=entry.plugin, loc=name_loc)


def resolve(loaded: LoadedConfig, registry: Registry, only: list[str] | None = None) -> ResolvedPipeline:
    """Bind every component of ``loaded`` from ``registry``; ``only`` limits the variants."""
    cfg = loaded.config
    oversized = oversized_grid(cfg.variants, registry)
    if oversized is not None:
        raise loaded.error(("variants", oversized[0], "options"), oversized[1])
    for bname, bopts in cfg.backends.items():  # each backends entry names a backend and valid options
        _bind(loaded, registry, "backend", bname, bopts, ("backends", bname), ("backends", bname))
    expanded = [(i, ev) for i, v in enumerate(cfg.variants) for ev in expand_grid(v, registry)]
    names = [v.name for v in cfg.variants] + [ev.name for _, ev in expanded]
    for wanted in only or []:
        if wanted not in names:
            raise ConfigError(unknown_name_message("variant", wanted, names) + " (from --only)")

    baseline = cfg.baseline or _default_baseline(cfg, registry)
    variants: list[ResolvedVariant] = []
    seen: set[str] = set()
    for i, v in expanded:
        if v.name in seen:
            raise loaded.error(("variants", i, "name"), f"variant name '{v.name}' is used twice "
                                                        "(after expanding option lists)")
        seen.add(v.name)
        if only and v.name not in only and v.name != baseline and cfg.variants[i].name not in only:
            continue
        variants.append(_resolve_variant(loaded, registry, i, v))
    refs = cfg.evaluators if "evaluators" in cfg.model_fields_set else \
        [ComponentRef(name=name) for name in registry.default_evaluators()]
    evaluators = [
        _bind(loaded, registry, "evaluator", ref.name, ref.options, ("evaluators", i), ("evaluators", i, "options"))
        for i, ref in enumerate(refs)
    ]
    # the baseline runs first: deltas of every other variant are computed against it
    variants.sort(key=lambda rv: rv.config.name != baseline)
    resolved = ResolvedPipeline(loaded, registry, variants, evaluators, baseline)
    from qpipe.metrics import check_pipeline

    check_pipeline(resolved)  # metric names, and what quantizers need from the pipeline
    return resolved


def _resolve_variant(loaded: LoadedConfig, registry: Registry, i: int, v: VariantConfig) -> ResolvedVariant:
    """Bind one (expanded) variant declared at ``variants[i]``: quantizer, backend, calibrator."""
    cfg = loaded.config
    quantizer = _bind(loaded, registry, "quantizer", v.quantizer, v.options,
                      ("variants", i, "quantizer"), ("variants", i, "options"))
    qcls = type(quantizer.component)
    if v.backend is not None:
        bname, bopts, bloc = v.backend.name, v.backend.options, ("variants", i, "backend")
    else:
        bname, bopts, bloc = qcls.default_backend, {}, ("variants", i, "quantizer")
        if bname is None:
            try:
                bname = registry.default_backend(qcls.output_format)
            except QpipeError as exc:
                raise loaded.error(bloc, f"{v.quantizer}: {exc}") from None
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
    return ResolvedVariant(v, i, quantizer, backend, calibrator)


def _default_baseline(cfg: PipelineConfig, registry: Registry) -> str:
    """The first variant whose quantizer makes the unquantized reference, else the first."""
    for v in cfg.variants:
        if registry.makes_reference(v.quantizer):
            return v.name
    return cfg.variants[0].name
