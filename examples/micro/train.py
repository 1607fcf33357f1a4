"""Train the microcontroller example: a Conv1D activity classifier on synthetic accelerometer windows.

Each sample is 1.28 s of a 3-axis accelerometer at 100 Hz (128 x 3 values, in g) showing one of
five activities: idle, walk, run, shake, tap. The signals are synthetic (gravity in a random
orientation, a periodic motion with a random rate, amplitude and phase, sensor noise), so
nothing is downloaded. Writes ``model.keras`` and ``data.npz`` (x_cal, y_cal, x_test, y_test,
stored as float16 to keep the file small) beside this file.

    python examples/micro/train.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLASSES = ("idle", "walk", "run", "shake", "tap")
STEPS, RATE = 128, 100.0


def _orientation(rng: np.random.Generator) -> np.ndarray:
    """A random unit vector near 'down': how the sensor happens to be worn."""
    v = np.array([0.0, 0.0, 1.0]) + rng.normal(0, 0.5, 3)
    return v / np.linalg.norm(v)


def _motion(label: int, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The activity's own acceleration, (STEPS, 3) in g."""
    out = np.zeros((len(t), 3))
    phase = rng.uniform(0, 2 * np.pi)
    if label in (1, 2):  # walk / run: vertical bounce with a harmonic, some sway
        rate = rng.uniform(1.4, 2.4) if label == 1 else rng.uniform(2.2, 3.4)
        amp = rng.uniform(0.15, 0.45) if label == 1 else rng.uniform(0.4, 1.0)
        wave = np.sin(2 * np.pi * rate * t + phase) + 0.4 * np.sin(4 * np.pi * rate * t + 2 * phase)
        out[:, 2] = amp * wave
        out[:, 0] = 0.3 * amp * np.sin(np.pi * rate * t + phase)
    elif label == 3:  # shake: fast side to side
        rate, amp = rng.uniform(4.0, 8.0), rng.uniform(0.3, 0.9)
        axis = rng.normal(0, 1, 3)
        out += np.outer(amp * np.sin(2 * np.pi * rate * t + phase), axis / np.linalg.norm(axis))
    elif label == 4:  # tap: a few sharp, decaying spikes
        for start in rng.choice(len(t) - 12, size=rng.integers(1, 4), replace=False):
            out[start:start + 12] += np.outer(np.exp(-np.arange(12) / 2.5), rng.normal(0, 1.2, 3))
    return out


def make_signals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled windows, classes balanced: (n, 128, 3) float32 and (n,) int64."""
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS) / RATE
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    x = np.empty((n, STEPS, 3), dtype=np.float32)
    for i, label in enumerate(labels):
        noise = rng.uniform(0.05, 0.25)
        x[i] = _orientation(rng) + _motion(int(label), t, rng) + rng.normal(0, noise, (STEPS, 3))
    return x, labels.astype(np.int64)


def build_model(keras):
    """Three Conv1D layers and two dense ones: ~90k weights, too big for 256 KB of flash as
    float32, a quarter of that as int8."""
    layers = keras.layers
    return keras.Sequential([
        layers.Input((STEPS, 3), name="accel"),
        layers.Conv1D(32, 5, padding="same", activation="relu"),
        layers.Conv1D(64, 5, padding="same", activation="relu"),
        layers.MaxPooling1D(2),
        layers.Conv1D(64, 3, padding="same", activation="relu"),
        layers.MaxPooling1D(2),
        layers.Flatten(),
        layers.Dense(32, activation="relu"),
        layers.Dense(len(CLASSES), activation="softmax"),
    ], name="activity_cnn")


def main(out_dir: Path = HERE, epochs: int = 12) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    x_train, y_train = make_signals(2000, seed=0)
    x_cal, y_cal = make_signals(100, seed=1)
    x_test, y_test = make_signals(300, seed=2)
    x_test16 = x_test.astype(np.float16)  # what data.npz stores (and the pipeline evaluates)
    model = build_model(keras)

    def compile_model() -> None:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])

    compile_model()
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0, validation_split=0.1)
    _, accuracy = model.evaluate(x_test16.astype(np.float32), y_test, verbose=0)
    compile_model()  # a fresh optimizer: the saved file carries no Adam slot weights
    model.save(out_dir / "model.keras")
    np.savez_compressed(out_dir / "data.npz", x_cal=x_cal.astype(np.float16), y_cal=y_cal,
                        x_test=x_test16, y_test=y_test)
    print(f"{model.count_params()} weights; test accuracy {accuracy:.4f}; wrote model.keras and data.npz "
          f"to {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
