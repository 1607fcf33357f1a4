"""Train the digits example: a small CNN (tf_keras) on scikit-learn's bundled 8x8 digits.

Writes ``model.keras`` and ``data.npz`` (x_train, y_train, x_test, y_test) beside this file.
Real data with no download: the 1,797 handwritten digits ship inside scikit-learn.
``--keras3`` trains the same network with Keras 3 and writes ``model_keras3.keras``.

    python examples/digits/train.py [--keras3]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits scaled to [0, 1] as (N, 8, 8, 1) float32, split 70/30 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def build_model(keras):
    """Conv-BN-ReLU twice, pooling, two dense layers: a layout TF-MOT can quantize."""
    layers = keras.layers
    return keras.Sequential([
        layers.Input((8, 8, 1), name="image"),
        layers.Conv2D(16, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.Conv2D(32, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ], name="digits_cnn")


def train(keras, data: dict[str, np.ndarray], epochs: int = 30, seed: int = 0):
    """Compile and fit ``build_model`` on ``data``; returns the trained model."""
    keras.utils.set_random_seed(seed)
    model = build_model(keras)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data["x_train"], data["y_train"], epochs=epochs, batch_size=32, verbose=0,
              validation_split=0.1)
    return model


def main(out_dir: Path = HERE, keras3: bool = False) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if keras3:
        import keras
    else:
        import tf_keras as keras

    data = load_split()
    model = train(keras, data)
    _, accuracy = model.evaluate(data["x_test"], data["y_test"], verbose=0)
    # a fresh optimizer keeps the compile config (loss, metrics) but not Adam's slot weights
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    target = out_dir / ("model_keras3.keras" if keras3 else "model.keras")
    model.save(target)
    np.savez_compressed(out_dir / "data.npz", **data)
    print(f"test accuracy {accuracy:.4f}; wrote {target} and {out_dir / 'data.npz'}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--keras3"]
    main(Path(args[0]) if args else HERE, keras3="--keras3" in sys.argv)
