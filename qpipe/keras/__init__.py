"""Toolkit for quantizers that train Keras models (TF-MOT and the like), public API.

- ``tf_keras_copy(ctx.model, sample, what)``: a private tf_keras copy of the model, ready for
  TF-MOT (a Keras 3 model is rebuilt in tf_keras and checked to give the same outputs).
- ``choose_loss(requested, model, labels, what)``: the loss from an option, the saved compile
  config, or inferred from the output activation and labels (``infer_loss``).
- ``TrainingOptions`` and ``fit(model, choice, options, ctx, what)``: compile and fine-tune on
  ``ctx.training``, reporting each epoch through ``ctx.report`` and ``ctx.log_metrics``;
  ``final_metrics(history)`` gives the last epoch as ``train_*``/``val_*`` metrics.

Nothing here imports TensorFlow until a function is called.
"""

from qpipe.keras.loss import LossChoice, choose_loss, infer_loss
from qpipe.keras.rebuild import check_graph_model, check_same_outputs, rebuild_keras3, tf_keras_copy
from qpipe.keras.training import TrainingOptions, final_metrics, fit, labels_of, model_inputs

__all__ = [
    "LossChoice", "choose_loss", "infer_loss", "check_graph_model", "check_same_outputs", "rebuild_keras3",
    "tf_keras_copy", "TrainingOptions", "final_metrics", "fit", "labels_of", "model_inputs",
]
