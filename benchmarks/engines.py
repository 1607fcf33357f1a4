"""The TFLite converter vs ai-edge-quantizer, per architecture and variant kind.

    .venv/bin/python benchmarks/engines.py             # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/engines.py --quick     # without MobileNetV2: about 2-3 minutes
    .venv/bin/python benchmarks/engines.py --work DIR  # keep the models and run folders (reused)

The models are built and trained here (no downloads): a small CNN on scikit-learn's digits
(8x8), a depthwise-separable MobileNet-class CNN (inverted residual blocks, BatchNorm, ReLU6)
on the digits upsampled to 32x32, and a Dense MLP regressing scikit-learn's diabetes target
(25-346); and (unless ``--quick``) keras.applications' MobileNetV2 (alpha 0.35, random
init) trained on the digits at 32x32x3. Each is quantized by qpipe itself (``tflite.dynamic``, ``tflite.int8`` with int8
I/O, ``tflite.int16x8`` with int16 I/O, so that both engines can give every variant) once with
``engine: converter``, once with ``engine: ai-edge-quantizer`` and once with ``engine: auto``,
on the same 200 calibration samples, and evaluated on held-out samples against the float32
.tflite: accuracy (or MAE), and the mean and max absolute difference of the outputs from
float (qpipe's ``fidelity``). The table goes to benchmarks/engines.md (and is printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"dynamic": ("tflite.dynamic", {}), "float16": ("tflite.float16", {}), "int8": ("tflite.int8", {"io": "int8"}),
         "int16x8": ("tflite.int16x8", {"io": "int16"})}
ENGINES = ("converter", "ai-edge-quantizer", "auto")


# --------------------------------------------------------------------------- models and data


def digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits in [0, 1], upsampled (nearest) from 8x8 to ``size`` x ``size``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = (x / 16.0).reshape(-1, 8, 8).astype(np.float32)
    factor = size // 8
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return images[..., None], y.astype(np.int64)


def small_cnn(keras):
    layers = keras.layers
    return keras.Sequential([
        layers.Input((8, 8, 1), name="image"),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])


def mobilenet_like(keras):
    """A MobileNetV2-style network: stem, inverted residual blocks with depthwise convs."""
    layers = keras.layers

    def conv_bn(x, filters, kernel=1, strides=1, depthwise=False, relu=True):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False)(x)
        else:
            x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x) if relu else x

    def block(x, filters, strides, expand=4):
        inp = x
        x = conv_bn(x, inp.shape[-1] * expand)
        x = conv_bn(x, None, 3, strides, depthwise=True)
        x = conv_bn(x, filters, relu=False)
        return layers.Add()([inp, x]) if strides == 1 and inp.shape[-1] == filters else x

    image = layers.Input((32, 32, 1), name="image")
    x = conv_bn(image, 16, 3, 2)
    for filters, strides in ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (64, 2)):
        x = block(x, filters, strides)
    x = conv_bn(x, 128)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(image, layers.Dense(10, activation="softmax")(x))


def mobilenet_v2(keras):
    """keras.applications' MobileNetV2 (alpha 0.35, 32x32x3, random init), trained here.

    Its BatchNorm momentum (0.999) would leave the moving statistics far from the data after a
    few hundred steps (chance accuracy in inference mode): 0.9 lets them converge.
    """
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=10)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def mlp(keras):
    layers = keras.layers
    return keras.Sequential([layers.Input((10,), name="features"), layers.Dense(64, activation="relu"),
                             layers.Dense(32, activation="relu"), layers.Dense(1)])


def make_models(work: Path, mobilenetv2: bool = False) -> dict[str, dict]:
    """Train the models; write each as model.keras + data.npz in its own folder."""
    from sklearn.datasets import load_diabetes

    from qpipe.tfenv import tf_keras

    keras = tf_keras()
    made = {}
    x8, y = digits(8)
    x32, _ = digits(32)
    xd, yd = load_diabetes(return_X_y=True)
    xd = ((xd - xd.mean(0)) / xd.std(0)).astype(np.float32)
    split = np.random.default_rng(0).permutation(len(y))
    dsplit = np.random.default_rng(0).permutation(len(yd))
    specs = {
        "small CNN (digits 8x8)": (small_cnn, x8, y, split, 1300, "classification", 15),
        "MobileNet-like, depthwise (digits 32x32)": (mobilenet_like, x32, y, split, 1300, "classification", 15),
        "Dense MLP regression (diabetes)": (mlp, xd, yd.astype(np.float32), dsplit, 340, "regression", 300),
    }
    if mobilenetv2:
        specs["MobileNetV2 0.35 (digits 32x32x3)"] = (mobilenet_v2, np.repeat(x32, 3, axis=-1), y, split, 1300,
                                                       "classification", 15)
    for label, (build, x, labels, order, n_train, task, epochs) in specs.items():
        folder = work / label.split(" (")[0].replace(" ", "_").replace(",", "")
        folder.mkdir(parents=True, exist_ok=True)
        made[label] = {"folder": folder, "task": task}
        if (folder / "model.keras").is_file():  # --work DIR of an earlier run: reuse its models
            continue
        train, test = order[:n_train], order[n_train:]
        keras.utils.set_random_seed(0)
        model = build(keras)
        loss = "sparse_categorical_crossentropy" if task == "classification" else "mae"
        model.compile(optimizer=keras.optimizers.Adam(0.003 if task == "classification" else 0.01), loss=loss)
        started = time.perf_counter()
        model.fit(x[train], labels[train], epochs=epochs, batch_size=32, verbose=0)
        model.save(folder / "model.keras")
        np.savez(folder / "data.npz", x_train=x[train], y_train=labels[train], x_test=x[test], y_test=labels[test])
        print(f"trained {label} in {time.perf_counter() - started:.0f} s", flush=True)
    return made


# --------------------------------------------------------------------------- quantizing with qpipe


def pipeline(folder: Path, task: str) -> Path:
    """A pipeline with every kind x engine, run by qpipe itself."""
    variants = [{"name": "float32", "quantizer": "tflite.float32"}]
    for kind, (quantizer, options) in KINDS.items():
        for engine in ENGINES:
            variants.append({"name": f"{kind}.{engine}", "quantizer": quantizer,
                             "options": {**options, "engine": engine}})
    config = {
        "name": "engines",
        "model": {"path": "model.keras"},
        "data": {"evaluation": {"path": "data.npz", "inputs": "x_test", "labels": "y_test"},
                 "calibration": {"path": "data.npz", "inputs": "x_train", "labels": "y_train"}},
        "calibrator": {"name": "sample", "options": {"count": 200, "seed": 0}},
        "variants": variants,
        "evaluators": ["accuracy" if task == "classification" else "regression", "fidelity", "size"],
        "cache": False,
        "tracking": False,
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure(made: dict[str, dict]) -> list[dict]:
    """Run each model's pipeline; one row per model x kind x engine."""
    from qpipe.testing import run_pipeline_file

    rows = []
    for label, info in made.items():
        started = time.perf_counter()
        out = info["folder"] / "out"
        shutil.rmtree(out, ignore_errors=True)
        results = run_pipeline_file(pipeline(info["folder"], info["task"]), output=out)
        print(f"quantized {label} in {time.perf_counter() - started:.0f} s", flush=True)
        quality = "accuracy" if info["task"] == "classification" else "mae"
        base = results.variant("float32").metrics[quality]
        for v in results.variants[1:]:
            kind, engine = v.name.split(".", 1)
            if v.status != "ok":
                rows.append({"model": label, "kind": kind, "engine": engine, "error": v.error})
                continue
            m = v.metrics
            rows.append({"model": label, "kind": kind, "engine": engine, "used": v.metadata.get("engine"),
                         "reason": v.metadata.get("engine_reason", ""), "quality": quality,
                         "float": base, "value": m[quality], "mean_err": m["mean_abs_error"],
                         "max_err": m["max_abs_error"], "size": m["size_bytes"],
                         "seconds": m["quantize_seconds"]})
    return rows


# --------------------------------------------------------------------------- the table


def _quality(row: dict) -> str:
    if row["quality"] == "accuracy":
        return f"{100 * row['value']:.2f}% ({100 * (row['value'] - row['float']):+.2f} pt)"
    return f"{row['value']:.2f} ({row['value'] - row['float']:+.2f})"


def table(rows: list[dict]) -> str:
    """Markdown: per model and kind, the converter, ai-edge-quantizer and auto side by side."""
    lines = ["| model | kind | engine | accuracy / MAE (vs float) | mean abs err vs float | "
             "max abs err vs float | error ratio vs converter | size | quantize s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['kind']} | {row['engine']} | failed: {row['error']} | | | | | |")
            continue
        conv = next(r for r in rows if r["model"] == row["model"] and r["kind"] == row["kind"]
                    and r["engine"] == "converter" and "error" not in r)
        ratio = row["mean_err"] / conv["mean_err"] if conv["mean_err"] else float("nan")
        engine = row["engine"] if row["engine"] != "auto" else f"auto → {row['used']}"
        lines.append(f"| {row['model']} | {row['kind']} | {engine} | {_quality(row)} | {row['mean_err']:.3g} | "
                     f"{row['max_err']:.3g} | {ratio:.3f}× | {row['size'] / 1024:.1f} KB | {row['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep the models and run folders here")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "engines.md")
    parser.add_argument("--quick", action="store_true",
                        help="skip keras.applications' MobileNetV2 (alpha 0.35): about half the time")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qpipe-engines-"))
    started = time.perf_counter()
    rows = measure(make_models(work, mobilenetv2=not args.quick))
    text = table(rows)
    reasons = sorted({f"- {r['model']}, {r['kind']}: {r['reason']}" for r in rows
                      if r.get("engine") == "auto" and r.get("reason")})
    import ai_edge_quantizer  # noqa: F401  (for its version)
    from importlib.metadata import version

    header = (f"# Engines: the TFLite converter vs ai-edge-quantizer\n\nMeasured by `benchmarks/engines.py` "
              f"on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, "
              f"TensorFlow {version('tensorflow')}, ai-edge-quantizer {version('ai-edge-quantizer')}, "
              f"{time.perf_counter() - started:.0f} s in all). Same float model, same 200 calibration "
              "samples, errors on the held-out samples; the error ratio is the mean abs error divided "
              "by the converter's.\n\n")
    body = header + text + "\n" + ("\nWhy `auto` chose as it did:\n\n" + "\n".join(reasons) + "\n" if reasons else "")
    args.out.write_text(body, encoding="utf-8")
    print(body)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
