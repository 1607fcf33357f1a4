"""The ``ort.*`` quantizers: tf2onnx conversion, then ONNX Runtime's own quantization."""

from __future__ import annotations

import collections
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from pydantic import Field

import qpipe
from qpipe import Artifact, Calibration, QpipeError, QuantizeContext, Quantizer, match_inputs
from qpipe.tfenv import quiet
from qpipe_onnxruntime.convert import onnx_model

FORMAT = "onnx"


class ConvertOptions(qpipe.Options):
    opset: int = Field(17, ge=13, le=21, description="ONNX opset tf2onnx converts to")


class OrtQuantizer(Quantizer):
    """Base of the ``ort.*`` quantizers: converts once per run, subclasses quantize the float model."""

    default_backend = "onnxruntime"
    output_format = FORMAT
    Options = ConvertOptions

    def quantize(self, ctx: QuantizeContext) -> Artifact:
        ctx.report("converting to ONNX (tf2onnx)")
        float_model, facts = onnx_model(ctx.model, self.options.opset)
        path = ctx.artifact_path(".onnx")
        started = time.perf_counter()
        try:
            with quiet():
                self.quantize_onnx(float_model, path, ctx)
        except QpipeError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise QpipeError(f"{self.name}: onnxruntime quantization failed: {type(exc).__name__}: {first}") from exc
        return Artifact(path=path, format=FORMAT, metadata={
            "engine": f"onnxruntime {metadata.version('onnxruntime')}", **facts,
            "ort_quantize_seconds": round(time.perf_counter() - started, 3), "onnx_ops": op_counts(path)})

    def quantize_onnx(self, float_model: Path, output: Path, ctx: QuantizeContext) -> None:
        """Write the quantized model for ``float_model`` to ``output``."""
        shutil.copyfile(float_model, output)


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the ONNX graph holds (shows what was quantized)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(collections.Counter(node.op_type for node in graph.node).items()))


def preprocessed(float_model: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (graph optimization, shape inference)."""
    from onnxruntime.quantization import quant_pre_process

    out = Path(tempfile.mkdtemp(prefix="qpipe-onnx-pre-")) / "model.onnx"
    # symbolic shape inference needs sympy and adds nothing for fixed-rank Keras models
    quant_pre_process(str(float_model), str(out), skip_symbolic_shape=True)
    return out


def graph_inputs(path: Path) -> list[str]:
    """Names of the model's real inputs (initializers excluded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return [i.name for i in graph.input if i.name not in constants]


def calibration_batches(calibration: Calibration, names: list[str], batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """The calibrator's samples as ONNX feeds keyed by the graph's input names."""
    data = calibration.samples
    keys = match_inputs(names, data.inputs, "the ONNX model")
    for batch in data.batches(batch_size):
        yield {onnx_name: np.asarray(batch[key], dtype=np.float32) for onnx_name, key in keys.items()}


class OrtFloat32(OrtQuantizer):
    """No quantization: the model converted to float32 ONNX with tf2onnx."""

    name = "ort.float32"


class Int8Options(ConvertOptions):
    format: Literal["qdq", "qoperator"] = Field(
        "qdq", description="QDQ (Quantize/DequantizeLinear around float ops) or QOperator (QLinear* ops)")
    activations: Literal["int8", "uint8"] = Field("int8", description="activation type")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how onnxruntime calibrates activation ranges")
    preprocess: bool = Field(True, description="run onnxruntime's quant_pre_process first")


class OrtInt8(OrtQuantizer):
    """Static int8 with onnxruntime.quantization, calibrated on the calibrator's samples."""

    name = "ort.int8"
    needs_calibration = True
    Options = Int8Options

    def quantize_onnx(self, float_model: Path, output: Path, ctx: QuantizeContext) -> None:
        from onnxruntime import quantization as q

        opts = self.options
        calibration = ctx.calibration
        if calibration.ranges or calibration.estimate is not None:
            ctx.warn("the calibrator's estimated activation ranges are for TFLite tensors; "
                     f"{self.name} calibrates with onnxruntime's '{opts.method}' method instead")
        source = preprocessed(float_model) if opts.preprocess else float_model

        # the histogram calibrators (entropy, percentile) stack per-batch outputs, so their
        # batches must all be the same size: feed them one sample at a time
        batch_size = 32 if opts.method == "minmax" else 1

        class Reader(q.CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = calibration_batches(calibration, graph_inputs(source), batch_size)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        ctx.report(f"quantizing (onnxruntime static, {len(calibration.samples)} samples)")
        q.quantize_static(
            str(source), str(output), Reader(),
            quant_format=q.QuantFormat.QDQ if opts.format == "qdq" else q.QuantFormat.QOperator,
            activation_type=q.QuantType.QInt8 if opts.activations == "int8" else q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8, per_channel=opts.per_channel,
            calibrate_method={"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                              "percentile": q.CalibrationMethod.Percentile}[opts.method])
        ctx.record("calibration", {"samples": len(calibration.samples), "method": opts.method})


class DynamicOptions(ConvertOptions):
    weights: Literal["int8", "uint8"] = Field("int8", description="weight type")
    per_channel: bool = Field(False, description="one weight scale per output channel (else per tensor)")


class OrtDynamic(OrtQuantizer):
    """Dynamic quantization with onnxruntime: int8 weights, activations quantized at run time."""

    name = "ort.dynamic"
    Options = DynamicOptions

    def quantize_onnx(self, float_model: Path, output: Path, ctx: QuantizeContext) -> None:
        from onnxruntime import quantization as q

        weight_type = q.QuantType.QInt8 if self.options.weights == "int8" else q.QuantType.QUInt8
        q.quantize_dynamic(str(float_model), str(output), weight_type=weight_type,
                           per_channel=self.options.per_channel)
