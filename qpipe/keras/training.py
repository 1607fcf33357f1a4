"""Fine-tune a tf_keras model for a quantizer: compile from the options, fit, report every epoch.

Each epoch's loss and metrics go to ``ctx.report`` (progress), ``ctx.log_metrics`` (trackers
record them as step metrics) and the returned history (kept with the variant's results).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

import qpipe
from qpipe import Dataset, QpipeError, QuantizeContext
from qpipe.tfenv import tf_keras

from qpipe.keras.loss import LossChoice


class TrainingOptions(qpipe.Options):
    """Options shared by every training quantizer (subclass it to add your own)."""

    epochs: int = Field(3, ge=1, description="fine-tuning epochs")
    batch_size: int = Field(32, ge=1, description="samples per training step")
    learning_rate: float = Field(1e-4, gt=0, description="optimizer learning rate")
    optimizer: Literal["adam", "sgd", "rmsprop"] = Field("adam", description="optimizer")
    loss: str | None = Field(None, description="Keras loss name; default: the saved compile config, "
                                                "else inferred for classifiers and regressors")
    seed: int = Field(0, description="random seed for weight shuffling and initial state")


def model_inputs(data: Dataset) -> Any:
    """The arrays to feed: one array for a single-input model, else a dict by input name."""
    return next(iter(data.inputs.values())) if len(data.inputs) == 1 else dict(data.inputs)


def labels_of(data: Dataset, section: str, what: str) -> Any:
    """The labels of ``data`` (from ``data.<section>``): an array, or ``{output name: array}`` for
    a model with several outputs; an error naming the section if it has none."""
    if data.labels is None or isinstance(data.labels, dict) and not data.labels:
        raise QpipeError(f"{what}: data.{section} has no labels; add 'labels:' to data.{section}")
    if isinstance(data.labels, dict):
        return {name: np.asarray(y) for name, y in data.labels.items()}
    return np.asarray(data.labels)


def output_keys(model: Any, original: list[str]) -> Any:
    """A function re-keying ``{original output name: value}`` by ``model``'s output names (TF-MOT
    renames the output layers, ``species`` to ``quant_species``; else matched by position)."""
    names = list(getattr(model, "output_names", None) or original)

    def key(name: str) -> str:
        if name in names:
            return name
        ends = [n for n in names if n.endswith("_" + name)]
        if len(ends) == 1:
            return ends[0]
        return names[original.index(name)] if name in original and len(names) == len(original) else name

    return lambda values: {key(name): value for name, value in values.items()}


def _optimizer(options: TrainingOptions) -> Any:
    k2 = tf_keras()
    cls = {"adam": k2.optimizers.Adam, "sgd": k2.optimizers.SGD, "rmsprop": k2.optimizers.RMSprop}
    return cls[options.optimizer](learning_rate=options.learning_rate)


def fit(model: Any, choice: LossChoice, options: TrainingOptions, ctx: QuantizeContext, what: str,
        callbacks: list[Any] | tuple[Any, ...] = ()) -> dict[str, Any]:
    """Compile and fit ``model`` on ``ctx.training`` (validating on ``ctx.validation``); the history.

    ``callbacks`` are extra tf_keras callbacks (e.g. TF-MOT's ``UpdatePruningStep``).
    """
    k2 = tf_keras()
    if ctx.training is None:
        raise QpipeError(f"{what} trains the model: add data.training to the pipeline (and needs_training = True)")
    x, y = model_inputs(ctx.training), labels_of(ctx.training, "training", what)
    validation = None
    if ctx.validation is not None:
        validation = (model_inputs(ctx.validation), labels_of(ctx.validation, "validation", what))
    loss, metrics = choice.loss, choice.metrics
    if isinstance(loss, dict):  # several outputs: keyed by the trained model's output names
        original = getattr(ctx.model.model, "output_names", None) if ctx.model is not None else None
        rename = output_keys(model, list(original or loss))
        loss, metrics, y = (rename(loss), rename(metrics), rename(y))
        if validation is not None and isinstance(validation[1], dict):
            validation = (validation[0], rename(validation[1]))
    model.compile(optimizer=_optimizer(options), loss=loss, metrics=metrics)

    class Progress(k2.callbacks.Callback):  # type: ignore[name-defined]  # a module known at run time
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            values = {("train_" + k if not k.startswith("val_") else k): float(v) for k, v in (logs or {}).items()}
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
            ctx.report(f"training epoch {epoch + 1}/{options.epochs}: {shown} "
                       f"({time.perf_counter() - self.started:.1f} s)")
            ctx.log_metrics(values, epoch + 1)

    k2.utils.set_random_seed(options.seed)
    try:
        history = model.fit(x, y, epochs=options.epochs, batch_size=options.batch_size, shuffle=True,
                            validation_data=validation, verbose=0, callbacks=[Progress(), *callbacks])
    except (ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise QpipeError(f"{what}: training failed with loss '{choice.name}': {first[:300]}") from exc
    return {k: [round(float(v), 6) for v in values] for k, values in history.history.items()}


def final_metrics(history: dict[str, list[float]]) -> dict[str, float]:
    """The last epoch's values as ``train_<metric>`` / ``val_<metric>``."""
    return {("train_" + k if not k.startswith("val_") else k): values[-1] for k, values in history.items() if values}
