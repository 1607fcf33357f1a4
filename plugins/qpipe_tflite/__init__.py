"""Built-in plugin: post-training quantization with the TFLite converter.

``tflite.float32`` (the baseline), ``tflite.dynamic``, ``tflite.float16``, ``tflite.int8``
and ``tflite.int16x8``. Each converts the model's SavedModel (exported once per run) with
``tf.lite.TFLiteConverter``; the full-integer ones take representative samples from the
variant's calibrator. When the calibrator estimated activation ranges (``estimator:``),
int8 and int16x8 quantize with those ranges instead of the converter's min/max
(``qpipe_tflite.ranges``).
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from pydantic import Field

import qpipe
from qpipe import Artifact, Expects, QpipeError, QuantizeContext, Quantizer
from qpipe.tfenv import quiet, tensorflow
from qpipe.tflite import convert as qpipe_convert, representative_dataset, set_per_tensor


class ConverterQuantizer(Quantizer):
    """Base of the converter quantizers: subclasses set up the converter in ``configure``."""

    engine = "tflite-converter"
    uses_converter = True  # the run starts its converter process early
    #: what the artifact should be (checked after evaluation); subclasses claim what they quantize
    expects: ClassVar[Expects] = Expects()

    def configure(self, converter: Any, ctx: QuantizeContext) -> None:
        """Set the converter's optimization flags for this variant."""

    def aeq_supported(self, ctx: QuantizeContext) -> str | None:
        """None when ai-edge-quantizer can produce this variant (``engine`` option), else why not."""
        return None

    def make_converter(self, ctx: QuantizeContext) -> Any:
        """A TFLiteConverter over the model's SavedModel (at a fixed batch when the run's
        conversions needed one), configured for this variant."""
        from qpipe.conversion import FIXED_BATCH, fixed_batch, fixed_batch_saved_model

        tf = tensorflow()
        if "saved_model_dir" not in ctx.model._memo:
            ctx.report("exporting SavedModel")
        with quiet():
            saved_model = (fixed_batch_saved_model(ctx.model, FIXED_BATCH) if fixed_batch(ctx.model)
                           else ctx.model.saved_model_dir())
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        self.configure(converter, ctx)
        return converter

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        from qpipe.conversion import convert_saved_model, earlier_failure, record_fixed_batch

        failed = earlier_failure(ctx.model)
        if failed is not None:  # the same SavedModel, the same converter: it would fail again
            raise QpipeError(failed)
        if "saved_model_dir" not in ctx.model._memo:
            ctx.report("exporting SavedModel")
        ctx.report("converting")
        started = time.perf_counter()
        facts: dict[str, Any] = {}

        def convert(converter: Any) -> bytes:
            self.configure(converter, ctx)
            flatbuffer, found = self.convert(converter, ctx)
            facts.update(found)
            return flatbuffer

        flatbuffer = convert_saved_model(ctx.model, convert, ctx.report)
        path = ctx.artifact_path(".tflite")
        path.write_bytes(flatbuffer)
        metadata = {"engine": self.engine, "convert_seconds": round(time.perf_counter() - started, 3), **facts}
        record_fixed_batch(ctx, metadata)
        return Artifact(path=path, format="tflite", expects=self.expects, metadata=metadata)

    def convert(self, converter: Any, ctx: QuantizeContext) -> tuple[bytes, dict[str, Any]]:
        """The .tflite flatbuffer and facts to record about it (converted in the run's
        converter process: a crash there fails this variant only)."""
        return qpipe_convert(converter), {}


class Float32(ConverterQuantizer):
    """No quantization: the float32 .tflite, the usual baseline."""

    name = "tflite.float32"
    reference = True  # the default baseline

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        from qpipe.conversion import MEMO_KEY, float_tflite, record_fixed_batch

        started = time.perf_counter()
        reused = MEMO_KEY in ctx.model._memo
        path = ctx.artifact_path(".tflite")
        path.write_bytes(float_tflite(ctx.model, ctx.report))  # the run's one float conversion
        metadata = {"engine": self.engine, "convert_seconds": round(time.perf_counter() - started, 3),
                    "conversion": "reused" if reused else "converted"}
        record_fixed_batch(ctx, metadata)
        return Artifact(path=path, format="tflite", metadata=metadata)


Engine = Literal["auto", "converter", "ai-edge-quantizer"]
ENGINE_HELP = ("ai-edge-quantizer quantizes the run's one float .tflite (no second conversion: much "
               "faster on real models); auto: the converter for dynamic, ai-edge-quantizer for float16, "
               "for int8/int16x8 both and the one closer to float on the calibration samples (docs/engines.md)")


class EngineChoice:
    """Mixin: pick the converter or ai-edge-quantizer per the ``engine`` option.

    ``auto`` follows benchmarks/engines.py (docs/engines.md): where one engine was never less
    accurate on any architecture, that one (``auto_engine``); where neither was (``"measure"``),
    both quantize and the one whose outputs are closer to the float model's on the calibration
    samples is kept. ``metadata.engine_reason`` says which and why.
    """

    aeq_kind: ClassVar[str] = ""
    #: what ``auto`` does: "converter", "ai-edge-quantizer" or "measure" (both, keep the closer)
    auto_engine: ClassVar[str] = "measure"
    #: why, from the benchmark (docs/engines.md)
    auto_why: ClassVar[str] = ""

    def choose_engine(self, ctx: QuantizeContext) -> tuple[str, str]:
        """("converter" | "ai-edge-quantizer" | "measure", the reason) for this variant."""
        why_not = self.aeq_supported(ctx)
        asked = self.options.engine
        if asked == "ai-edge-quantizer" and why_not:
            raise QpipeError(f"engine ai-edge-quantizer cannot {why_not}; use engine: converter or auto")
        if asked != "auto":
            return asked, f"engine: {asked} in the pipeline"
        if why_not:
            return "converter", f"auto: ai-edge-quantizer cannot {why_not}"
        if self.auto_engine == "measure" and ctx.calibration is None:
            return "converter", "auto: no calibration samples to compare the engines on"
        return self.auto_engine, f"auto: {self.auto_why}"

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        engine, reason = self.choose_engine(ctx)
        if engine == "converter":
            artifact = super().quantize(ctx)
        elif engine == "ai-edge-quantizer":
            artifact = self.aeq_artifact(ctx)
        else:
            artifact, reason = self.closer_to_float(ctx)
        artifact.metadata["engine_reason"] = reason
        return artifact

    def aeq_artifact(self, ctx: QuantizeContext) -> Artifact:
        """This variant quantized by ai-edge-quantizer from the run's float .tflite."""
        from qpipe_tflite import aeq

        started = time.perf_counter()
        per_channel = getattr(self.options, "per_channel", True)
        flatbuffer = aeq.quantize(ctx, aeq.recipe(self.aeq_kind, per_channel), calibrate=self.needs_calibration)
        path = ctx.artifact_path(".tflite")
        path.write_bytes(flatbuffer)
        from qpipe.conversion import record_fixed_batch

        metadata = {"engine": aeq.ENGINE, "convert_seconds": round(time.perf_counter() - started, 3)}
        record_fixed_batch(ctx, metadata)
        return Artifact(path=path, format="tflite", expects=self.expects, metadata=metadata)

    def closer_to_float(self, ctx: QuantizeContext) -> tuple[Artifact, str]:
        """Quantize with both engines; keep the one whose outputs on the calibration samples are
        closer to the float .tflite's; on a tie the full-integer, then the smaller file
        (``qpipe_tflite.choice``). When one engine fails, the other's file."""
        from qpipe.conversion import float_tflite, output_error
        from qpipe_tflite.choice import pick

        artifacts, files, failed = {}, {}, {}
        makers = {"converter": lambda: super(EngineChoice, self).quantize(ctx),
                  "ai-edge-quantizer": lambda: self.aeq_artifact(ctx)}
        for engine, make in makers.items():
            try:
                artifacts[engine] = make()
            except QpipeError as exc:
                failed[engine] = str(exc)
                continue
            files[engine] = artifacts[engine].path.read_bytes()  # both write the same path
        if len(files) < 2:
            return self._one_engine(ctx, artifacts, files, failed)
        ctx.report("auto: comparing the engines' outputs with the float model's")
        samples = ctx.calibration.samples
        errors = output_error(float_tflite(ctx.model, ctx.report), files, samples)
        keep, reason, facts = pick(errors, files, min(256, len(samples)))
        artifact = artifacts[keep]
        artifact.path.write_bytes(files[keep])
        artifact.metadata["convert_seconds"] = round(sum(a.metadata["convert_seconds"] for a in artifacts.values()), 3)
        artifact.metadata.update(facts)
        return artifact, reason

    def _one_engine(self, ctx: QuantizeContext, artifacts: dict, files: dict, failed: dict) -> tuple[Artifact, str]:
        """The file of the one engine that worked (``auto``, with a warning), or both engines' errors."""
        if not files:
            raise QpipeError(f"both engines failed: the converter: {failed['converter']}; "
                             f"ai-edge-quantizer: {failed['ai-edge-quantizer']}")
        (keep,), (other, error) = list(files), next(iter(failed.items()))
        artifacts[keep].path.write_bytes(files[keep])
        artifacts[keep].metadata["engine_failed"] = {other: error}
        ctx.warn(f"engine auto: {other} failed, {keep}'s file kept: {error}", code="engine-failed")
        return artifacts[keep], f"auto: {other} failed, so {keep}'s file ({error})"


class EngineOptions(qpipe.Options):
    engine: Engine = Field("auto", description=ENGINE_HELP)


class Dynamic(EngineChoice, ConverterQuantizer):
    """Dynamic-range quantization: int8 weights, float activations, no calibration data."""

    name = "tflite.dynamic"
    Options = EngineOptions
    aeq_kind = "dynamic"
    #: the converter leaves weight tensors under 1024 elements in float, by design
    expects = Expects(smaller=True, quantized_weights=True, min_weight_elements=1024)
    auto_engine = "converter"
    auto_why = ("ai-edge-quantizer's dynamic-range error against float was 1.3-3.2x the converter's "
                "on every benchmarked model (docs/engines.md)")

    def configure(self, converter, ctx) -> None:
        converter.optimizations = [tensorflow().lite.Optimize.DEFAULT]


class Float16(EngineChoice, ConverterQuantizer):
    """float16 weights (half the size), float32 compute on CPU."""

    name = "tflite.float16"
    Options = EngineOptions
    aeq_kind = "float16"
    expects = Expects(smaller=True)
    auto_engine = "ai-edge-quantizer"
    auto_why = ("ai-edge-quantizer's float16 error against float was 0.90-0.98x the converter's on every "
                "benchmarked model (docs/engines.md)")

    def configure(self, converter, ctx) -> None:
        tf = tensorflow()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]


class FullInteger(ConverterQuantizer):
    """Base of int8 and int16x8: honours activation ranges estimated by the calibrator."""

    needs_calibration = True
    #: activation bits, for the calibrator's estimator
    bits: ClassVar[int] = 8
    expects = Expects(smaller=True, quantized_weights=True, full_integer=True)

    def requantize(self, calibrated: bytes) -> bytes:
        """Quantize a calibrated float model whose ranges were replaced."""
        raise NotImplementedError

    def aeq_supported(self, ctx: QuantizeContext) -> str | None:
        """ai-edge-quantizer's static recipes give int<bits> I/O, per-channel weights, min/max ranges."""
        io = f"int{self.bits}"
        if self.options.io != io:
            return f"give {self.options.io} input/output (its models take {io})"
        if ctx.calibration is not None and ctx.calibration.ranges_for(self.bits):
            return "use estimated activation ranges"
        return None

    def ops_set(self, tf: Any) -> Any:
        """The converter's target op set for this activation width."""
        if self.bits == 16:
            return tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        return tf.lite.OpsSet.TFLITE_BUILTINS_INT8

    def configure(self, converter: Any, ctx: QuantizeContext) -> None:
        tf = tensorflow()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        from qpipe.conversion import model_batch

        batch = model_batch(ctx.model)  # a fixed-batch model takes its batch of samples at a time
        converter.representative_dataset = lambda: representative_dataset(ctx.calibration, batch=batch)
        converter.target_spec.supported_ops = [self.ops_set(tf)]
        if self.options.io != "float32":
            io_type = getattr(tf, self.options.io)  # int8, uint8 or int16
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
        if not self.options.per_channel:
            set_per_tensor(converter)

    def convert(self, converter: Any, ctx: QuantizeContext) -> tuple[bytes, dict[str, Any]]:
        from qpipe_tflite import ranges as estimated

        wanted = ctx.calibration.ranges_for(self.bits) if ctx.calibration is not None else {}
        if not wanted:
            try:
                return qpipe_convert(converter), {}
            except Exception as exc:
                from qpipe_tflite.choice import integer_input_failure

                failure = integer_input_failure(exc, self.name.rsplit(".", 1)[-1], ctx.model)
                if failure is None:
                    raise
                raise failure from exc
        calibrated = estimated.calibrated_model(converter)
        edited, applied = estimated.set_ranges(calibrated, wanted)
        if not applied:
            raise QpipeError(f"none of the calibrator's {len(wanted)} activation ranges names a tensor of "
                             "the converted model; the calibrator and quantizer disagree on tensor names")
        flatbuffer = self.requantize(edited)
        ranges_file = ctx.artifact_path(".ranges.json")
        ranges_file.write_text(json.dumps({k: list(v) for k, v in applied.items()}, indent=1))
        calibration = {k: v for k, v in ctx.calibration.metadata.items()
                       if isinstance(v, (str, int, float, bool, dict))}
        return flatbuffer, {
            "calibration": calibration,
            "activation_ranges": {"estimator": calibration.get("estimator", {}).get("name", "custom"),
                                  "bits": self.bits, "tensors": len(applied), "file": ranges_file.name},
        }


class Int8Options(qpipe.Options):
    io: Literal["int8", "uint8", "float32"] = Field(
        "int8", description="type of the model's input and output tensors")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    fallback: Literal["off", "auto"] = Field(
        "off", description="auto: keep the layers int8 hurts most in float until the pipeline's "
                           "constraints hold")
    fallback_max_layers: int = Field(5, ge=1, description="most layers fallback may keep in float")
    analyze: bool = Field(False, description="rank layers by int8 error; write <variant>.sensitivity.csv/.png")
    engine: Engine = Field("auto", description=ENGINE_HELP)


class Int8(EngineChoice, FullInteger):
    """Full-integer int8: int8 weights and activations, ranges from calibration samples."""

    name = "tflite.int8"
    Options = Int8Options
    bits = 8
    #: ``qpipe analyze`` and ``fallback: auto`` can rank this quantizer's layers
    supports_sensitivity = True
    aeq_kind = "int8"
    metrics = ("fallback_float_layers", "fallback_size_cost_bytes", "fallback_latency_cost_ms")

    def needs_constraints(self) -> bool:
        return self.options.fallback == "auto"

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        """Plain int8 (the engine as chosen for any int8 variant); then, when asked, rank its
        layers and keep some in float (the converter's QuantizationDebugger)."""
        artifact = super().quantize(ctx)
        if self.options.analyze or self.options.fallback == "auto":
            from qpipe_tflite.fallback import analyze, fall_back

            layers = analyze(self, ctx, write=self.options.analyze)
            if self.options.fallback == "auto":
                artifact = fall_back(self, ctx, artifact, layers)
        return artifact

    def requantize(self, calibrated: bytes) -> bytes:
        from qpipe_tflite.ranges import quantize_int8

        return quantize_int8(calibrated, self.options.io, self.options.per_channel)


class Int16x8Options(qpipe.Options):
    io: Literal["float32", "int16"] = Field("float32", description="type of the input and output tensors")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    engine: Engine = Field("auto", description=ENGINE_HELP)


class Int16x8(EngineChoice, FullInteger):
    """int16 activations with int8 weights: closer to float, reference kernels (slower)."""

    name = "tflite.int16x8"
    Options = Int16x8Options
    bits = 16
    aeq_kind = "int16x8"

    def requantize(self, calibrated: bytes) -> bytes:
        from qpipe_tflite.ranges import quantize_int16x8

        return quantize_int16x8(calibrated, self.options.io, self.options.per_channel)


@qpipe.hookimpl
def qpipe_register_quantizers(register) -> None:
    for quantizer in (Float32, Dynamic, Float16, Int8, Int16x8):
        register(quantizer)


@qpipe.hookimpl
def qpipe_add_commands(app) -> None:
    from qpipe_tflite.analyze import register_command

    register_command(app)
