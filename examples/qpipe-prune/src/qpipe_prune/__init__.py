"""qpipe-prune: a third-party qpipe plugin written only against qpipe's public API.

``prune.int8`` prunes the model's Dense/Conv kernels to a target sparsity with TF-MOT
(``prune_low_magnitude``), fine-tunes on ``data.training``, strips the pruning wrappers and
converts to a full-integer int8 .tflite; it reports the ``sparsity`` it reached.
``top_k`` measures top-k accuracy.
"""

from __future__ import annotations

import qpipe

from qpipe_prune.quantizer import PruneInt8
from qpipe_prune.topk import TopK


@qpipe.hookimpl
def qpipe_register_quantizers(register) -> None:
    register(PruneInt8)


@qpipe.hookimpl
def qpipe_register_evaluators(register) -> None:
    register(TopK)
