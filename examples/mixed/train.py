"""Train the mixed-precision example: a MobileNet-class network on digits upsampled to 32x32.

Depthwise-separable blocks (depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN + ReLU6) as in
MobileNet, on scikit-learn's bundled digits (no download). Writes ``model.keras`` (Keras 3)
and ``data.npz`` (x_train, y_train, x_cal, y_cal, x_test, y_test) beside this file;
``--narrow`` trains a narrower copy (stem 16, blocks 24-96) as ``model_narrow.keras``: fewer
weights per layer, and one where uniform int4 costs accuracy; ``--mobilenetv2`` trains Keras'
own MobileNetV2 (alpha 0.35) as ``model_mobilenetv2.keras``.

    python examples/mixed/train.py [--epochs N] [--narrow | --mobilenetv2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits scaled to [0, 1], upsampled 4x to (N, 32, 32, 1); 60/10/30 train/cal/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).repeat(4, axis=1).repeat(4, axis=2)[..., None]
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    x_train, x_cal, y_train, y_cal = train_test_split(x_rest, y_rest, test_size=0.15, random_state=seed,
                                                      stratify=y_rest)
    return {"x_train": x_train, "y_train": y_train, "x_cal": x_cal, "y_cal": y_cal,
            "x_test": x_test, "y_test": y_test}


def build_model(keras, widths=(64, 128, 128, 256, 256), stem: int = 32):
    """Stem conv, depthwise-separable blocks (stride 2 where the width grows), GAP, dense."""
    layers = keras.layers
    x = inputs = keras.Input((32, 32, 1), name="image")
    x = layers.Conv2D(stem, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(x))
    previous = stem
    for width in widths:
        stride = 2 if width > previous else 1
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(x))
        x = layers.Conv2D(width, 1, use_bias=False)(x)
        x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(x))
        previous = width
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(128, activation="relu")(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="mobilenet_digits")


def train(data: dict[str, np.ndarray], epochs: int, seed: int = 0, **kwargs):
    """Compile and fit ``build_model`` (Keras 3) on ``data``; returns the trained model."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_model(keras, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0)
    return model


def train_mobilenetv2(data: dict[str, np.ndarray], epochs: int = 45, seed: int = 0):
    """Keras' own MobileNetV2 (alpha 0.35, 32x32x1, no pretrained weights), BN momentum 0.9 so
    its moving statistics settle on ~1,000 samples, Adam with a cosine-decayed rate."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 1), alpha=0.35, weights=None, classes=10)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    schedule = keras.optimizers.schedules.CosineDecay(2e-3, epochs * 30)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0)
    return model


def without_optimizer(model):
    """An uncompiled copy (the saved file then holds no optimizer state)."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def save_deflated(model, path: Path) -> None:
    """``model.save`` (optimizer state dropped), then the archive re-written deflated: the
    weights file is mostly HDF5 padding, about a third of the size once compressed."""
    import zipfile

    without_optimizer(model).save(path)
    with zipfile.ZipFile(path) as zin:
        members = [(item.filename, zin.read(item.filename)) for item in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, content in members:
            zout.writestr(name, content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--narrow", action="store_true", help="the narrow model (model_narrow.keras)")
    parser.add_argument("--mobilenetv2", action="store_true",
                        help="Keras' MobileNetV2, alpha 0.35, 45 epochs (model_mobilenetv2.keras)")
    args = parser.parse_args()
    data = load_split()
    if args.mobilenetv2:
        model, name = train_mobilenetv2(data), "model_mobilenetv2.keras"
    else:
        shape = {"widths": (24, 48, 48, 96, 96), "stem": 16} if args.narrow else {}
        model, name = train(data, args.epochs, **shape), "model_narrow.keras" if args.narrow else "model.keras"
    _, accuracy = model.evaluate(data["x_test"], data["y_test"], verbose=0)
    print(f"test accuracy {accuracy:.4f}, {model.count_params()} parameters")
    save_deflated(model, HERE / name)
    np.savez_compressed(HERE / "data.npz", **data)


if __name__ == "__main__":
    main()
