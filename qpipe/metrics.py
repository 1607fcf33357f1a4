"""What a pipeline's evaluators measure, and the checks that follow from it.

Every evaluator declares its metric names, its headline metrics and the tasks it applies
to (``qpipe.Evaluator``). From those the host checks a pipeline before any work (metric
names in constraints and the objective, evaluators that cannot apply to the task, pipeline
features a quantizer needs) and picks the columns of the summary and the chart.
"""

from __future__ import annotations

import difflib
from typing import Any

from qpipe.heads import prefixed, split
from qpipe.task import Task, decide_task

#: measured by the host for every variant
HOST_METRICS = ("quantize_seconds",)
DELTA = "_delta"


def _evaluator(bound: Any) -> Any:
    return type(bound.component)


def declared(evaluators: list[Any], variants: list[Any]) -> set[str] | None:
    """Every metric name the evaluators and quantizers declare, with ``_delta`` forms; None when
    an evaluator declares nothing (a plugin that predates declarations: nothing can be checked)."""
    names: set[str] = set(HOST_METRICS)
    for bound in evaluators:
        produced = _evaluator(bound).declared_metrics(bound.component.options)
        if not produced:
            return None
        names.update(produced)
    for rv in variants:
        names.update(type(rv.quantizer.component).metrics)
    return names | {name + DELTA for name in names}


def per_output_names(evaluators: list[Any], tasks: dict[str, Task]) -> set[str]:
    """``<output>/<metric>`` (and ``_delta``) for every quality metric an output's evaluators
    declare (a model with several outputs)."""
    names: set[str] = set()
    for output, task in tasks.items():
        for bound in evaluators:
            cls = _evaluator(bound)
            if cls.role != "cost" and cls.applies_to(task.name):
                names.update(prefixed(output, m) for m in cls.declared_metrics(bound.component.options))
    return names | {name + DELTA for name in names}


def check_metric_names(resolved: Any, evaluators: list[Any], why: str = "",
                       tasks: dict[str, Task] | None = None) -> None:
    """Refuse a constraint or objective naming a metric no configured evaluator produces.

    ``quality/mae_delta`` names one output's metric: with ``tasks`` (a loaded multi-output
    model) the output must be one of the model's and measure it; without, only the metric is
    checked (the outputs are known once the model is loaded)."""
    known = declared(evaluators, resolved.variants)
    if known is None:
        return
    if tasks:
        known = known | per_output_names(evaluators, tasks)
    cfg, loaded = resolved.config, resolved.loaded
    wanted = [(("constraints", i), c.metric) for i, c in enumerate(resolved.constraints)]
    if cfg.objective_pair() is not None:
        direction, metric = cfg.objective_pair()
        wanted.append((("objective", direction), metric))
    for loc, metric in wanted:
        output, base = split(metric)
        if metric in known or (not tasks and output is not None and base in known):
            continue
        if tasks and output is not None and output not in tasks:
            raise loaded.error(loc, f"'{metric}' names no output of this model; its outputs are: "
                                    f"{', '.join(tasks)} (write <output>/<metric>, e.g. {prefixed(next(iter(tasks)), base)})")
        hint = suggestion(metric, known)
        named = ", ".join(b.component.name for b in evaluators)
        measured = ", ".join(sorted(n for n in known if not n.endswith(DELTA)))
        raise loaded.error(loc, f"no evaluator measures '{metric}'{hint}{why}; the evaluators ({named}) "
                                f"measure: {measured} (each also as <metric>{DELTA})")


def suggestion(metric: str, known: set[str]) -> str:
    """" (did you mean 'mae_delta'?)" for 'mea_delta': names compared without the ``_delta``."""
    suffix = DELTA if metric.endswith(DELTA) else ""
    bases = sorted({name.removesuffix(DELTA) for name in known})
    close = difflib.get_close_matches(metric.removesuffix(DELTA), bases, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}{suffix}'?)" if close else ""


def check_variants(resolved: Any) -> None:
    """Refuse what would fail at run time: a searching quantizer without constraints, a training
    quantizer without ``data.training``."""
    cfg, loaded = resolved.config, resolved.loaded
    for rv in resolved.variants:
        quantizer, loc = rv.quantizer.component, ("variants", rv.index, "options")
        if quantizer.needs_constraints() and not cfg.constraints:
            raise loaded.error(loc, f"variant '{rv.config.name}' ({rv.config.quantizer}) searches until the "
                                    "pipeline's constraints hold, but none are declared: add e.g. "
                                    "constraints: ['accuracy_delta >= -0.01']")
        if type(quantizer).needs_training and cfg.data.training is None:
            raise loaded.error(("data",), f"variant '{rv.config.name}' ({rv.config.quantizer}) trains the "
                                          "model: add data.training to the pipeline")


def explicit_evaluators(resolved: Any) -> bool:
    """Whether the pipeline lists its evaluators (else the defaults, filtered by the task)."""
    return "evaluators" in resolved.config.model_fields_set


def applicable(resolved: Any, *tasks: Task) -> list[Any]:
    """The evaluators that run for ``tasks`` (one per output: those that fit any of them); an
    explicitly listed one that fits none is an error."""
    out = []
    for i, bound in enumerate(resolved.evaluators):
        if any(_evaluator(bound).applies_to(task.name) for task in tasks):
            out.append(bound)
        elif explicit_evaluators(resolved):
            described = ", ".join(task.describe() for task in tasks)
            raise resolved.loaded.error(("evaluators", i), (
                f"evaluator '{bound.component.name}' measures {' or '.join(_evaluator(bound).tasks)} models, "
                f"but this model's task is {described}; remove it"
                + (" or set 'task:' in the pipeline" if any(t.source == "inferred" for t in tasks) else "")))
    return out


def check_for_task(resolved: Any, task: Task, tasks: dict[str, Task] | None = None) -> list[Any]:
    """The evaluators for ``task`` (or each output's, ``tasks``), after checking the metric names
    against them."""
    evaluators = applicable(resolved, *(tasks or {"": task}).values())
    if tasks:
        why = " for the outputs " + ", ".join(f"{name}: {t.describe()}" for name, t in tasks.items())
    else:
        why = f" for the task {task.describe()}" if task.name else ""
    check_metric_names(resolved, evaluators, why, tasks)
    return evaluators


def check_pipeline(resolved: Any) -> None:
    """Every check that needs no model or data (run by ``qpipe validate`` and before ``run``)."""
    check_variants(resolved)
    task = resolved.config.task
    if isinstance(task, str):
        check_for_task(resolved, decide_task(task, None, None))
    else:
        check_metric_names(resolved, resolved.evaluators)


def headline(evaluators: list[Any], tasks: dict[str, Task] | None = None) -> list[dict[str, str]]:
    """The headline metrics of ``evaluators`` in order: name, which way is better, role. With
    ``tasks`` (several outputs) each quality headline is per output (``<output>/<metric>``, with
    ``output``), for the outputs whose task the evaluator fits; costs once."""
    out: list[dict[str, str]] = []
    for output, task in (tasks or {"": Task(None, "inferred", "")}).items():
        for bound in evaluators:
            cls = _evaluator(bound)
            if tasks and (cls.role == "cost" or not cls.applies_to(task.name)):
                continue
            produced = cls.declared_metrics(bound.component.options)
            for name in cls.headline:
                full = prefixed(output, name)
                if name in produced and all(h["metric"] != full for h in out):
                    out.append({"metric": full, "better": "lower" if name in cls.lower_is_better else "higher",
                                "role": cls.role, **({"output": output} if output else {})})
    if tasks:
        out += [h for h in headline(evaluators) if h["role"] == "cost"]
    return out


def headline_of(results: Any, role: str | None = None) -> list[dict[str, str]]:
    """The results' headline metrics (of ``role``) that at least one variant measured."""
    measured = {key for v in results.variants for key in v.metrics}
    return [h for h in (results.headline or []) if h["metric"] in measured and role in (None, h["role"])]
