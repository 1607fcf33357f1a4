"""The hand-written baseline: what a careful engineer would script without qpipe.

Loads a tf_keras model, exports its SavedModel once (``tf.saved_model.save``, the documented
route; ``--export`` uses ``Model.export`` as qpipe does), converts it with the TFLite converter
once per variant, and evaluates every .tflite with a batched, multi-threaded LiteRT loop:
accuracy, fidelity against float32, size and gzip size, and batch-1 latency. No tracking,
no cache, no checks.

    python benchmarks/handwritten.py MODEL DATA.npz X_EVAL Y_EVAL X_CAL OUT_DIR \
        --variants float32,dynamic,float16,int8,int16x8 --calibration 200 --runs 50
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def convert(tf, saved_model: str, kind: str, calibration: np.ndarray) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)

    def representative():
        for i in range(len(calibration)):
            yield [calibration[i:i + 1]]

    if kind != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if kind in ("int8", "int8pt"):
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    if kind == "int8pt":  # per-tensor weight scales (private converter flags)
        converter._experimental_disable_per_channel = True
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    if kind == "int16x8":
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return converter.convert()


class Model:
    """A LiteRT interpreter that predicts float batches (quantizing int I/O by hand)."""

    def __init__(self, path: str, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        self.shape = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.shape != x.shape:
            self.interpreter.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            self.shape = x.shape
        scale, zero = self.inp["quantization"]
        if np.dtype(self.inp["dtype"]).kind == "i" and scale:
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.inp["dtype"])
        self.interpreter.set_tensor(self.inp["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.out["index"])
        scale, zero = self.out["quantization"]
        if np.dtype(self.out["dtype"]).kind == "i" and scale:
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "data", "x_eval", "y_eval", "x_cal", "out"):
        parser.add_argument(name)
    parser.add_argument("--variants", default="float32,dynamic,float16,int8,int16x8")
    parser.add_argument("--calibration", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--export", action="store_true",
                        help="write the SavedModel with Model.export (as qpipe does) instead of tf.saved_model.save")
    args = parser.parse_args()

    import tensorflow as tf
    import tf_keras

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tf_keras.models.load_model(args.model)
    data = np.load(args.data)
    x, y = data[args.x_eval].astype(np.float32), data[args.y_eval]
    rng = np.random.default_rng(0)
    cal_all = data[args.x_cal].astype(np.float32)
    calibration = cal_all[np.sort(rng.choice(len(cal_all), args.calibration, replace=False))]
    saved_model = str(Path(tempfile.mkdtemp()) / "model")
    if args.export:
        model.export(saved_model)
    else:
        tf.saved_model.save(model, saved_model)

    metrics, baseline = {}, None
    for kind in args.variants.split(","):
        path = out / f"{kind}.tflite"
        path.write_bytes(convert(tf, saved_model, kind, calibration))
        run = Model(str(path), args.threads)
        pred = np.concatenate([run(x[i:i + args.batch]) for i in range(0, len(x), args.batch)])
        m = {"accuracy": float(np.mean(pred.argmax(1) == y)), "size_bytes": path.stat().st_size,
             "size_gzip_bytes": len(gzip.compress(path.read_bytes(), 9, mtime=0))}
        if baseline is None:
            baseline = pred
        m["top1_agreement"] = float(np.mean(pred.argmax(1) == baseline.argmax(1)))
        m["max_abs_error"] = float(np.abs(pred - baseline).max())
        one = x[:1]
        for _ in range(args.warmup):
            run(one)
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            run(one)
            times.append((time.perf_counter() - t) * 1000)
        m["latency_ms_p50"], m["latency_ms_p95"] = (float(v) for v in np.percentile(times, [50, 95]))
        metrics[kind] = m
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
