"""The model zoo: small real models of the families teams ship, with their data, built in seconds.

Each builder trains a tiny seeded model on CPU, writes it (a ``.keras`` file or a SavedModel
folder) and an ``.npz`` (``x_train``/``y_train``/``x_test``/``y_test``; int32 ids for token
inputs; labels per output for the two-head model) into a folder, and returns a ``ZooModel``
saying what a pipeline needs. ``pipeline_dict`` writes the full variant list for one.

Used by ``tests/test_model_zoo.py`` (every variant checked against a direct LiteRT
evaluation) and ``benchmarks/models.py`` (the table of ``docs/models.md``).

Keras 3 and tf_keras (Keras 2) are both covered, the way users save them: Keras 3 models
as ``.keras``, tf_keras models as ``.keras`` too (tf_keras cannot read Keras 3 files, so
each is loaded by its own Keras), the fixed-batch model as a SavedModel exported with a
``[1, ...]`` input signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qpipe.tfenv import keras3, tensorflow, tf_keras

SEQ, VOCAB, STEPS = 12, 50, 8
#: a dynamic-batch LSTM/GRU converts once re-exported at a fixed batch (issue #22, item 3): the
#: float variants must then work; integer ones may fail for a named reason
RECURRENT = ("float32", "dynamic", "float16")


@dataclass
class ZooModel:
    """One zoo model written into ``root``: what a pipeline needs, and how to check it."""

    family: str                      # short id, e.g. "two-head"
    title: str                       # what it is, for the table
    flavor: str                      # "keras3" | "tf_keras"
    root: Path
    model: str                       # file or folder name inside root
    data: str = "data.npz"
    #: the labels key per split ("y_test"), or per output name ({"species": "y_test_species"})
    labels: dict[str, str] | str = "y_test"
    train_labels: dict[str, str] | str = "y_train"
    #: task per output name (a single-output model: key None)
    tasks: dict[str | None, str] = field(default_factory=dict)
    batch: int | None = None         # the model's fixed batch, if it has one
    #: variants that must be ok on this family (what issue #22 asks qpipe to deliver); the
    #: others may fail, for a reason that names the cause
    must_work: tuple[str, ...] = ("float32", "dynamic", "float16", "int8", "int16x8", "int4", "mixed")

    @property
    def multi_output(self) -> bool:
        return isinstance(self.labels, dict)

    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.root / self.data) as npz:
            return {k: npz[k] for k in npz.files}


def _digits(flat: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's real 8x8 digits in [0, 1]: 1000 training, 300 test images."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x = x.reshape(-1, 64) if flat else x.reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype(np.int64)
    return x[:1000], y[:1000], x[1000:1300], y[1000:1300]


def _fit(model: Any, x: Any, y: Any, loss: Any, epochs: int, metrics: Any = None, batch_size: int = 32) -> Any:
    model.compile(optimizer="adam", loss=loss, metrics=metrics)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def _save(model: Any, root: Path, name: str = "model.keras") -> str:
    model.save(root / name)
    return name


# (a) two heads: a species classifier and a regressor of a held-out standardized feature
def two_head(root: Path) -> ZooModel:
    from sklearn.datasets import load_wine

    keras = keras3()
    keras.utils.set_random_seed(0)
    x, species = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    quality = x[:, 0].astype(np.float32)       # alcohol, standardized: predicted from the others
    x = x[:, 1:].astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, species, quality = x[order], species[order].astype(np.int64), quality[order]
    inp = keras.Input((12,), name="features")
    h = keras.layers.Dense(64, activation="relu")(inp)
    h = keras.layers.Dense(32, activation="relu")(h)
    out_cls = keras.layers.Dense(3, activation="softmax", name="species")(h)
    out_reg = keras.layers.Dense(1, name="quality")(h)
    model = keras.Model(inp, [out_cls, out_reg])
    model.compile(optimizer="adam", loss={"species": "sparse_categorical_crossentropy", "quality": "mse"})
    model.fit(x[:128], {"species": species[:128], "quality": quality[:128]}, epochs=60, batch_size=16, verbose=0)
    np.savez(root / "data.npz", x_train=x[:128], x_test=x[128:],
             y_train_species=species[:128], y_test_species=species[128:],
             y_train_quality=quality[:128], y_test_quality=quality[128:])
    return ZooModel("two-head", "wine: species softmax + alcohol regression heads (Keras 3)", "keras3", root,
                    _save(model, root), labels={"species": "y_test_species", "quality": "y_test_quality"},
                    train_labels={"species": "y_train_species", "quality": "y_train_quality"},
                    tasks={"species": "classification", "quality": "regression"})


def _tokens(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of ``SEQ`` ids in [3, VOCAB) with 0-3 copies each of the marker ids 1 and 2
    put in: class 0 when 1 is more frequent, 1 on a tie, 2 when 2 is."""
    rng = np.random.default_rng(seed)
    x = rng.integers(3, VOCAB, size=(n, SEQ)).astype(np.int32)
    counts = rng.integers(0, 4, size=(n, 2))
    for i in range(n):
        slots = rng.permutation(SEQ)[: counts[i].sum()]
        x[i, slots[: counts[i, 0]]] = 1
        x[i, slots[counts[i, 0]:]] = 2
    y = np.sign(counts[:, 1] - counts[:, 0]) + 1
    return x, y.astype(np.int64)


def _token_data(root: Path) -> None:
    x_train, y_train = _tokens(600, 0)
    x_test, y_test = _tokens(200, 1)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


# (b) Embedding + MultiHeadAttention over int32 token ids
def token_attention(root: Path) -> ZooModel:
    keras = keras3()
    keras.utils.set_random_seed(0)
    inp = keras.Input((SEQ,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCAB, 32)(inp)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=32)(h, h)
    h = keras.layers.Dense(32, activation="relu")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h))
    _token_data(root)
    with np.load(root / "data.npz") as d:
        _fit(model, d["x_train"], d["y_train"], "sparse_categorical_crossentropy", 10)
    return ZooModel("token-attention", "Embedding + MultiHeadAttention token classifier, int32 ids (Keras 3)",
                    "keras3", root, _save(model, root), tasks={None: "classification"})


# (c) Embedding + LSTM text classifier (dynamic batch)
def text_lstm(root: Path) -> ZooModel:
    keras = tf_keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((SEQ,), dtype="int32", name="tokens"),
                              keras.layers.Embedding(VOCAB, 16), keras.layers.LSTM(16),
                              keras.layers.Dense(3, activation="softmax")])
    _token_data(root)
    with np.load(root / "data.npz") as d:
        _fit(model, d["x_train"], d["y_train"], "sparse_categorical_crossentropy", 12)
    return ZooModel("text-lstm", "Embedding + LSTM text classifier, int32 ids (tf_keras)", "tf_keras", root,
                    _save(model, root), tasks={None: "classification"}, must_work=RECURRENT)


def _sine_windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``STEPS`` noisy sine values (random phase and frequency) and the next value."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS + 1)[None, :]
    series = np.sin(rng.uniform(0.2, 0.8, (n, 1)) * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    series += rng.normal(0, 0.05, series.shape)
    return series[:, :STEPS, None].astype(np.float32), series[:, STEPS].astype(np.float32)


# (d) GRU forecaster: the next value of a sine series (regression)
def gru_forecaster(root: Path) -> ZooModel:
    keras = keras3()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((STEPS, 1), name="series"), keras.layers.GRU(32), keras.layers.Dense(1)])
    x_train, y_train = _sine_windows(600, 0)
    x_test, y_test = _sine_windows(200, 1)
    _fit(model, x_train, y_train, "mse", 15)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return ZooModel("gru-forecaster", "GRU forecaster, next value of a sine series, T=8 (Keras 3)", "keras3",
                    root, _save(model, root), tasks={None: "regression"}, must_work=RECURRENT)


def _small_cnn(keras: Any) -> Any:
    layers = keras.layers
    return keras.Sequential([keras.Input((8, 8, 1), name="image"), layers.Conv2D(8, 3, activation="relu"),
                             layers.Flatten(), layers.Dense(10, activation="softmax")])


# (e) a SavedModel exported with a fixed batch of 1
def batch1_savedmodel(root: Path) -> ZooModel:
    tf, keras = tensorflow(), keras3()
    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = _digits()
    model = _fit(_small_cnn(keras), x_train, y_train, "sparse_categorical_crossentropy", 8)
    model.export(str(root / "saved_model"), format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec([1, 8, 8, 1], tf.float32, name="image")])
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return ZooModel("batch1-savedmodel", "digits CNN as a SavedModel with a fixed [1, 8, 8, 1] signature "
                    "(Keras 3 export)", "keras3", root, "saved_model", tasks={None: "classification"}, batch=1)


# (f) conv autoencoder: 8x8 digits in, 8x8 reconstruction out (image-to-image regression)
def conv_autoencoder(root: Path) -> ZooModel:
    keras = tf_keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 1), name="image"),
                              layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
                              layers.Conv2D(16, 3, padding="same", activation="relu"), layers.UpSampling2D(),
                              layers.Conv2D(1, 3, padding="same", activation="sigmoid")])
    x_train, _, x_test, _ = _digits()
    _fit(model, x_train, x_train, "mse", 15)
    np.savez(root / "data.npz", x_train=x_train, y_train=x_train, x_test=x_test, y_test=x_test)
    return ZooModel("conv-autoencoder", "conv autoencoder, 8x8 digits -> 8x8 (tf_keras)", "tf_keras", root,
                    _save(model, root), tasks={None: "regression"})


# (g) a ResNet block: Conv-BN-ReLU-Conv-BN added to its input, on digits
def resnet_block(root: Path) -> ZooModel:
    keras = keras3()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input((8, 8, 1), name="image")
    stem = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    h = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(layers.Conv2D(16, 3, padding="same", use_bias=False)(stem)))
    h = layers.BatchNormalization(momentum=0.9)(layers.Conv2D(16, 3, padding="same", use_bias=False)(h))
    h = layers.ReLU()(layers.Add()([stem, h]))
    out = layers.Dense(10, activation="softmax")(layers.Flatten()(layers.MaxPooling2D()(h)))
    model = keras.Model(inp, out)
    x_train, y_train, x_test, y_test = _digits()
    _fit(model, x_train, y_train, "sparse_categorical_crossentropy", 8)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return ZooModel("resnet-block", "ResNet block with an Add skip, digits classifier (Keras 3)", "keras3", root,
                    _save(model, root), tasks={None: "classification"})


# (h) Dense + BatchNorm regression MLP on scikit-learn's diabetes data
def bn_mlp(root: Path) -> ZooModel:
    from sklearn.datasets import load_diabetes

    keras = tf_keras()
    keras.utils.set_random_seed(0)
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    layers = keras.layers
    model = keras.Sequential([keras.Input((10,), name="features"), layers.Dense(64), layers.BatchNormalization(momentum=0.9),
                              layers.ReLU(), layers.Dense(32, activation="relu"), layers.Dense(1)])
    _fit(model, x[:340], y[:340], "mse", 30)
    np.savez(root / "data.npz", x_train=x[:340], y_train=y[:340], x_test=x[340:], y_test=y[340:])
    return ZooModel("bn-mlp", "Dense + BatchNorm regression MLP, diabetes (tf_keras)", "tf_keras", root,
                    _save(model, root), tasks={None: "regression"})


# (i) a depthwise-separable CNN (DepthwiseConv2D + pointwise Conv2D + BN + ReLU)
def separable_cnn(root: Path) -> ZooModel:
    keras = tf_keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        layers.Conv2D(32, 3, padding="same", use_bias=False), layers.BatchNormalization(momentum=0.9), layers.ReLU(),
        layers.DepthwiseConv2D(3, padding="same", use_bias=False), layers.BatchNormalization(momentum=0.9), layers.ReLU(),
        layers.Conv2D(64, 1, use_bias=False), layers.BatchNormalization(momentum=0.9), layers.ReLU(),
        layers.MaxPooling2D(), layers.Flatten(), layers.Dense(10, activation="softmax")])
    x_train, y_train, x_test, y_test = _digits()
    _fit(model, x_train, y_train, "sparse_categorical_crossentropy", 10)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return ZooModel("separable-cnn", "depthwise-separable CNN, digits (tf_keras)", "tf_keras", root,
                    _save(model, root), tasks={None: "classification"})


BUILDERS: dict[str, Callable[[Path], ZooModel]] = {
    "two-head": two_head, "token-attention": token_attention, "text-lstm": text_lstm,
    "gru-forecaster": gru_forecaster, "batch1-savedmodel": batch1_savedmodel,
    "conv-autoencoder": conv_autoencoder, "resnet-block": resnet_block, "bn-mlp": bn_mlp,
    "separable-cnn": separable_cnn,
}


FIT_ROWS = 256


def build(family: str, root: Path) -> ZooModel:
    """Build, train and write one zoo model into ``root`` (created). The ``.npz`` also gets
    ``x_fit``/``y_fit*``: the first ``FIT_ROWS`` training rows, the training split of the
    quantizers that train (QAT, ternary, binary), to keep their epoch short."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    zm = BUILDERS[family](root)
    arrays = zm.arrays()
    arrays.update({key.replace("_train", "_fit"): arrays[key][:FIT_ROWS] for key in list(arrays) if "_train" in key})
    np.savez(root / zm.data, **arrays)  # type: ignore[arg-type]
    return zm


#: the full variant list: every built-in quantizer, with small training and search settings
VARIANTS: list[dict[str, Any]] = [
    {"name": "float32", "quantizer": "tflite.float32"},
    {"name": "dynamic", "quantizer": "tflite.dynamic"},
    {"name": "float16", "quantizer": "tflite.float16"},
    {"name": "int8", "quantizer": "tflite.int8", "options": {"io": "int8"}},
    # int16 I/O: on Keras 3 token models only ai-edge-quantizer can (the converter's int16x8
    # quantizer cannot leave Embedding's integer index ops unquantized), and it gives int16 I/O
    {"name": "int16x8", "quantizer": "tflite.int16x8", "options": {"io": "int16"}},
    {"name": "int4", "quantizer": "litert.int4"},
    {"name": "mixed", "quantizer": "litert.mixed",
     "options": {"budget": {"size_ratio": 4.0}, "samples": 64, "max_trials": 8, "report": False}},
    {"name": "qat", "quantizer": "tfmot.qat", "options": {"epochs": 1, "io": "int8"}},
    {"name": "ternary", "quantizer": "tfmot.ternary", "options": {"epochs": 1}},
    {"name": "binary", "quantizer": "tfmot.binary", "options": {"epochs": 1}},
]


def _fit_keys(labels: dict[str, str] | str) -> dict[str, str] | str:
    if isinstance(labels, dict):
        return {k: v.replace("_train", "_fit") for k, v in labels.items()}
    return labels.replace("_train", "_fit")


def _section(inputs: str, labels: dict[str, str] | str) -> dict[str, Any]:
    return {"path": "data.npz", "inputs": inputs, "labels": labels}


def pipeline_dict(zm: ZooModel, variants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The pipeline for ``zm``: the full variant list (or ``variants``), labels per output for
    a multi-output model (``labels: {output: key}``), evaluators that fit its task(s)."""
    tasks = set(zm.tasks.values())
    evaluators: list[Any] = (["accuracy"] if "classification" in tasks else []) + \
        (["regression"] if "regression" in tasks else []) + ["fidelity", "size"]
    return {
        "name": zm.family,
        "model": {"path": zm.model},
        "data": {"evaluation": _section("x_test", zm.labels),
                 "calibration": _section("x_train", zm.train_labels),
                 "training": _section("x_fit", _fit_keys(zm.train_labels))},
        "calibrator": {"name": "sample", "options": {"count": 64, "method": "random", "seed": 0}},
        "backends": {"litert": {"threads": 2}},
        "variants": variants if variants is not None else VARIANTS,
        "evaluators": evaluators,
        "baseline": "float32",
        "tracking": False,
        "cache": False,
    }


# A direct LiteRT evaluation, independent of qpipe's backend: what an ok variant must match.

def litert_outputs(path: Path, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Every output of the .tflite on ``x``, dequantized to float; at the input's fixed batch if
    its signature has one (the last chunk padded), else in chunks of ``batch_size``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=2)
    inp = interpreter.get_input_details()[0]
    fixed = int(inp["shape_signature"][0]) != -1
    batch = int(inp["shape"][0]) if fixed else min(batch_size, len(x))
    chunks: list[list[np.ndarray]] = [[] for _ in interpreter.get_output_details()]
    allocated = None
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if fixed and n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        if not fixed and allocated != len(chunk):
            interpreter.resize_tensor_input(inp["index"], [len(chunk), *x.shape[1:]])
            interpreter.allocate_tensors()
            allocated = len(chunk)
        elif allocated is None:
            interpreter.allocate_tensors()
            allocated = batch
        interpreter.set_tensor(inp["index"], quantize(chunk, inp))
        interpreter.invoke()
        for i, detail in enumerate(interpreter.get_output_details()):
            chunks[i].append(dequantize(interpreter.get_tensor(detail["index"]), detail)[:n])
    return [np.concatenate(c).reshape(len(x), -1) for c in chunks]


def quantize(values: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind == "f" or not scale:  # float input, or integer ids (no scale)
        return values.astype(dtype)
    q = np.rint(values.astype(np.float32) / np.float32(scale) + np.float32(zero_point))
    return np.clip(q, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


def dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f" or not scale:
        return values.astype(np.float32)
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def direct_metrics(zm: ZooModel, outputs: list[np.ndarray], data: dict) -> dict[str, float]:
    """The headline metrics computed here: accuracy per classification output, MAE and RMSE per
    regression output; ``<output>/<metric>`` for a multi-output model."""
    metrics: dict[str, float] = {}
    widths = [o.shape[1] for o in outputs]
    for output, task in zm.tasks.items():
        labels = data[zm.labels[output] if isinstance(zm.labels, dict) and output else str(zm.labels)]
        if output is None:
            predicted = outputs[0]
        else:  # the two-head model: the class head is the wide one, the regression head has one value
            width = 1 if task == "regression" else int(labels.max()) + 1
            assert widths.count(width) == 1, f"cannot tell the outputs apart by width: {widths}"
            predicted = outputs[widths.index(width)]
        prefix = f"{output}/" if output else ""
        if task == "regression":
            error = predicted.astype(np.float64) - labels.reshape(predicted.shape)
            metrics[f"{prefix}mae"] = float(np.mean(np.abs(error)))
            metrics[f"{prefix}rmse"] = float(np.sqrt(np.mean(error ** 2)))
        else:
            metrics[f"{prefix}accuracy"] = float(np.mean(predicted.argmax(axis=1) == labels))
    return metrics
