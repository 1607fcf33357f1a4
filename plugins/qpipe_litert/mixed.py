"""``litert.mixed``: per-layer weight widths (int2/int4/int8/float) searched under a size budget
or the pipeline's constraints, written by ai-edge-quantizer so the file stores each layer at its width.

1. measure every (layer, width) alone on calibration samples (``qpipe_litert.widths``);
2. order the narrowing steps by error per byte saved (``qpipe_litert.search``);
3. take the prefix a size budget allows and spend the bytes left on widening the costliest
   steps back, or, under constraints, start narrowest and widen one layer at a time until
   ``ctx.evaluate`` says the constraints hold;
4. check the file: every layer stored at its assigned width, bits per weight as assigned.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

import qpipe
from qpipe import Artifact, QpipeError, QuantizeContext, Quantizer, unmet
from qpipe.conversion import float_tflite

from qpipe_litert.search import CostTable, assignment_after, bits_per_weight, greedy_steps, steps_for_size
from qpipe_litert.widths import (ACTIVATION_WIDTHS, FLOAT, Cost, Layer, Probe, apply, layers_of, measure,
                                 stored_bits, width_bits, write_report)


#: an output's MSE against float over its variance (1 - R²) above which the search warns
DRIFT = 0.05


class Budget(qpipe.Options):
    size_bytes: int | None = Field(None, gt=0, description="largest file in bytes")
    size_ratio: float | None = Field(None, gt=0, description="smallest float32-file / mixed-file size ratio")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.size_bytes is None) == (self.size_ratio is None):
            raise ValueError("budget takes exactly one of size_bytes or size_ratio")
        return self


class MixedOptions(qpipe.Options):
    budget: Budget | None = Field(None, description="{size_bytes: N} or {size_ratio: R} (float32 file / mixed "
                                                    "file); without it the pipeline's constraints decide")
    widths: list[Literal["int2", "int4", "int8", "float"]] = Field(
        ["int2", "int4", "int8", "float"], description="candidate weight widths (each offered per op only where "
                                                       "ai-edge-quantizer stores it and LiteRT runs it); int8 "
                                                       "is always one: the width for ops the others miss; "
                                                       "float lets the search keep the most sensitive "
                                                       "layers unquantized where the budget has room")
    samples: int = Field(200, ge=10, description="calibration samples used to measure sensitivity")
    max_trials: int = Field(40, ge=1, description="end-to-end checks the search may run")
    report: bool = Field(True, description="write the per-layer, per-width sensitivity CSV and charts")


class Mixed(Quantizer):
    """Per-layer int2/int4/int8/float weights (ai-edge-quantizer) chosen under a size budget or constraints."""

    name = "litert.mixed"
    Options = MixedOptions
    needs_calibration = True

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        started = time.perf_counter()
        source = float_tflite(ctx.model, ctx.report)
        layers = layers_of(source)
        if not layers:
            raise QpipeError("litert.mixed: the model has no conv, depthwise conv, dense or embedding weights")
        if self.options.budget is None and (not ctx.constraints or ctx.evaluate is None):
            raise QpipeError("litert.mixed needs options.budget ({size_bytes: N} or {size_ratio: R}) or "
                             "constraints in the pipeline, e.g. constraints: ['accuracy_delta >= -0.01'] "
                             "(a regression model: ['mae_delta <= 0.05'])")
        probe, costs = self.measure_costs(ctx, source, layers)
        if self.options.report:
            files = write_report(costs, ctx.work_dir, f"{ctx.variant}.widths")
            ctx.record("files", sorted(p.name for p in files))  # logged to MLflow with the run
        table = CostTable(layers, costs, allow_float=FLOAT in self.options.widths)
        start, steps = greedy_steps(table)
        search = Search(self, ctx, source, layers, table, start, steps, probe)
        content, assignment, record = search.run()
        path = ctx.artifact_path(".tflite")
        path.write_bytes(content)
        check_file(content, layers, assignment)
        record["seconds"] = round(time.perf_counter() - started, 3)
        bits = bits_per_weight(layers, assignment)
        return Artifact(path=path, format="tflite", metadata={
            "engine": "ai-edge-quantizer", "recipe": "mixed dynamic-range weights (per-layer widths)",
            "layers": layer_records(layers, table, assignment), "bits_per_weight_assigned": round(bits, 4),
            "search": record, "metrics": probe_metrics(record)})

    def measure_costs(self, ctx: QuantizeContext, source: bytes, layers: list[Layer],
                      extra: tuple[str, ...] = ()) -> tuple[Probe, list[Cost]]:
        """The probe (float outputs on the calibration samples) and every (layer, width) cost."""
        samples = ctx.calibration.samples
        probe = Probe(source, samples.take(range(min(len(samples), self.options.samples))),
                      names=[t.name for t in ctx.model.outputs or []])
        quantized = set(self.options.widths) - {FLOAT}  # float costs nothing and is not measured
        widths = sorted(quantized | {"int8"}, key=width_bits) + list(extra)
        return probe, measure(source, layers, probe, widths, ctx.report)

    def sensitivity_by_width(self, ctx: QuantizeContext) -> tuple[list[dict[str, Any]], list[Path]]:
        """For ``qpipe analyze``: every (layer, width) cost as rows — weight widths and static int8
        weights with int8/int16 activations — and the CSV and charts written."""
        source = float_tflite(ctx.model, ctx.report)
        _, costs = self.measure_costs(ctx, source, layers_of(source), tuple(ACTIVATION_WIDTHS))
        return [asdict(c) for c in costs], write_report(costs, ctx.work_dir, f"{ctx.variant}.widths")


class Search:
    """Walks the greedy step list: by budget (narrow more while the file is too big) or by
    constraints (widen one layer at a time while they fail)."""

    def __init__(self, quantizer: Mixed, ctx: QuantizeContext, source: bytes, layers: list[Layer],
                 table: CostTable, start: dict[int, str], steps: list, probe: Probe):
        self.options, self.ctx, self.source, self.layers = quantizer.options, ctx, source, layers
        self.table, self.start, self.steps, self.probe = table, start, steps, probe
        self.trials: list[dict[str, Any]] = []

    def build(self, count: int) -> tuple[bytes, dict[int, str]]:
        assignment = assignment_after(self.start, self.steps, count)
        return apply(self.source, self.layers, assignment), assignment

    def room(self) -> bool:
        """Whether the search may run another trial (``max_trials``)."""
        return len(self.trials) < self.options.max_trials

    def sized(self, count: int) -> tuple[bytes, dict[int, str]]:
        """Build the first ``count`` steps and record the trial's size."""
        content, assignment = self.build(count)
        self.trials.append({"steps": count, "size_bytes": len(content)})
        return content, assignment

    def run(self) -> tuple[bytes, dict[int, str], dict[str, Any]]:
        budget = self.options.budget
        if budget is not None:
            target = budget.size_bytes or len(self.source) / budget.size_ratio
            count, content, assignment, misses = self.by_size(target)
        else:
            target = None
            count, content, assignment, misses = self.by_constraints()
        predicted = self.table.predict(assignment, len(self.source))
        if self.probe.float_accuracy is None:  # no class labels: nothing to predict accuracy from
            predicted.pop("accuracy_delta")
        _, measured_error, measured_delta, by_output = self.probe.score_outputs(content)
        measured: dict[str, Any] = {"size_bytes": len(content), "error": float(f"{measured_error:.6g}"), "accuracy_delta":
                                    None if measured_delta is None else round(measured_delta, 6)}
        if len(by_output) > 1:
            measured["output_errors"] = {k: round(v, 8) for k, v in by_output.items()}
        record = {"steps_available": len(self.steps), "steps_taken": count, "target_bytes": target,
                  "trials": self.trials, "meets": not misses, "unmet": misses,
                  "predicted": {k: float(f"{v:.6g}") if k == "error" else round(v, 6) for k, v in predicted.items()},
                  "measured": measured}
        if misses:
            self.ctx.warn("litert.mixed: " + "; ".join(misses), code="mixed_unmet")
        self.warn_drift(by_output)
        return content, assignment, record

    def warn_drift(self, by_output: dict[str, float]) -> None:
        """Warn about outputs of a several-output model that the chosen file moves far from float
        on the probe samples: the constraints (or the budget) may not watch them."""
        drifted = {name: error for name, error in by_output.items() if error > DRIFT}
        if len(by_output) > 1 and drifted:
            moved = ", ".join(f"{name} (output MSE {error:.3g} of its variance)" for name, error in drifted.items())
            self.ctx.warn(f"litert.mixed: the chosen widths move output(s) {moved} far from the float model's on "
                          f"the calibration samples; add a constraint on every output (e.g. fidelity's) if they "
                          f"matter", code="mixed_output_drift")

    def by_size(self, target: float) -> tuple[int, bytes, dict[int, str], list[str]]:
        """The fewest steps whose real file fits ``target`` (start at the predicted count, take more
        steps while the real file is too big, else undo steps while it still fits), then ``fill``."""
        predicted = count = steps_for_size(self.table, self.start, self.steps, len(self.source), target)
        content, assignment = self.sized(count)
        while len(content) > target and count < len(self.steps) and self.room():
            count += 1
            content, assignment = self.sized(count)
        while count == predicted and len(content) <= target and count > 0 and self.room():
            wider, wider_assignment = self.sized(count - 1)
            if len(wider) > target:
                break
            count, content, assignment = count - 1, wider, wider_assignment
            predicted = count
        if len(content) <= target:
            content, assignment = self.fill(count, content, assignment, target)
        misses = [] if len(content) <= target else [
            f"size budget {int(target)} bytes not reachable: smallest file {len(content)} bytes"]
        if not misses and self.ctx.constraints and self.ctx.evaluate is not None:
            missed = unmet(self.ctx.constraints, self.ctx.evaluate(self._artifact(content)))
            misses = [f"within the size budget, constraints fail: {m}" for m in missed]
        return count, content, assignment, misses

    def fill(self, count: int, content: bytes, assignment: dict[int, str], target: float
             ) -> tuple[bytes, dict[int, str]]:
        """Spend the bytes the prefix leaves under ``target``: undo taken steps, costliest error per
        byte first (the prefix's end), one layer one width up, wherever the real file still fits."""
        for step in reversed(self.steps[:count]):
            spare = target - len(content)
            if assignment[step.layer] != step.after or step.bytes_saved > spare:
                continue
            if not self.room():
                break
            trial = {**assignment, step.layer: step.before}
            wider = apply(self.source, self.layers, trial)
            name = self.layers[step.layer].short
            self.trials.append({"steps": count, "also": f"{name}: {step.after} -> {step.before}",
                                "size_bytes": len(wider)})
            if len(wider) <= target:
                content, assignment = wider, trial
        return content, assignment

    def by_constraints(self) -> tuple[int, bytes, dict[int, str], list[str]]:
        """Start with every step taken; undo one (one layer up a width) while constraints fail,
        then try each later step on its own on top of the passing mix (``refine``)."""
        count = len(self.steps)
        while True:
            assignment = assignment_after(self.start, self.steps, count)
            self.ctx.report(f"mixed: checking {count}/{len(self.steps)} narrowing steps")
            content, misses = self.check(assignment, {"steps": count})
            if not misses or count == 0 or len(self.trials) >= self.options.max_trials:
                break
            count -= 1
        if not misses:
            content, assignment = self.refine(count, content, assignment)
        return count, content, assignment, misses

    def refine(self, count: int, content: bytes, assignment: dict[int, str]) -> tuple[bytes, dict[int, str]]:
        """Past the first failing step, take any later step (one layer down a width) that keeps
        the constraints (the greedy order is a guess; the prefix is not the only passing mix)."""
        for step in self.steps[count + 1:]:
            if assignment[step.layer] != step.before or len(self.trials) >= self.options.max_trials:
                continue
            trial = {**assignment, step.layer: step.after}
            name = self.layers[step.layer].short
            self.ctx.report(f"mixed: trying {name} at {step.after}")
            narrower, misses = self.check(trial, {"steps": count, "also": f"{name}: {step.before} -> {step.after}"})
            if not misses:
                content, assignment = narrower, trial
        return content, assignment

    def check(self, assignment: dict[int, str], trial: dict[str, Any]) -> tuple[bytes, list[str]]:
        """Build ``assignment``, evaluate it end to end, record the trial; (file, unmet constraints)."""
        content = apply(self.source, self.layers, assignment)
        metrics = self.ctx.evaluate(self._artifact(content))
        misses = unmet(self.ctx.constraints, metrics)
        self.trials.append({**trial, "size_bytes": len(content), "unmet": misses,
                            "metrics": {k: v for c in self.ctx.constraints for k, v in c.measured(metrics).items()}})
        return content, misses

    def _artifact(self, content: bytes) -> Artifact:
        path = self.ctx.artifact_path(".tflite")
        path.write_bytes(content)
        return Artifact(path=path, format="tflite")


def probe_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Predicted and measured output error on the calibration samples (every task: relative
    output MSE, mean over the outputs), and the accuracy delta when they have class labels."""
    pairs = (("mixed_predicted_probe_error", record["predicted"].get("error")),
             ("mixed_measured_probe_error", record["measured"]["error"]),
             ("mixed_predicted_probe_accuracy_delta", record["predicted"].get("accuracy_delta")),
             ("mixed_measured_probe_accuracy_delta", record["measured"]["accuracy_delta"]))
    return {key: float(value) for key, value in pairs if value is not None}


def check_file(content: bytes, layers: list[Layer], assignment: dict[int, str]) -> None:
    """Refuse a file whose stored widths differ from the assignment (a wrong number is worse)."""
    stored = stored_bits(content, layers)
    wrong = [f"{layer.short}: stored {stored[layer.index]}-bit, assigned {assignment[layer.index]}"
             for layer in layers if stored[layer.index] != width_bits(assignment[layer.index])]
    if wrong:
        raise QpipeError("litert.mixed: the file does not store the chosen widths: " + "; ".join(wrong[:3]))


def layer_records(layers: list[Layer], table: CostTable, assignment: dict[int, str]) -> list[dict[str, Any]]:
    """``metadata.layers``: each layer's op, output tensor, weights, width, bits and measured cost."""
    records = []
    for layer in layers:
        width = assignment[layer.index]
        error, saved, delta = table.cost(layer.index, width)
        record = {"op": layer.op, "tensor": layer.output, "weights": layer.weights, "width": width,
                  "bits": width_bits(width), "offered": table.offered[layer.index],
                  "error": error, "bytes_saved": saved, "accuracy_delta": delta}
        measured = table.costs.get((layer.index, width))
        if measured is not None and measured.output_errors:  # several outputs: each one's share
            record["output_errors"] = measured.output_errors
        if width == FLOAT:
            record["reason"] = table.reasons.get(layer.index, "kept in float: among the most sensitive per "
                                                              "byte, and the budget or constraints left room")
        records.append(record)
    return records


__all__ = ["Mixed"]
