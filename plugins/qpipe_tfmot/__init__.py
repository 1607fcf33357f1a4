"""Built-in plugin: quantization-aware training with TF-MOT.

``tfmot.qat`` fine-tunes with TF-MOT's 8-bit fake quantization and converts to a
full-integer .tflite; ``tfmot.ternary`` and ``tfmot.binary`` train weights constrained to
three or two values per output channel and store them as 2-bit (or, with int8 activations,
4-bit) tensors. All three need ``data.training``. Keras 3 models are rebuilt in tf_keras
(``qpipe.keras``); TensorFlow and TF-MOT are imported at first use.
"""

from __future__ import annotations

from typing import Any

import qpipe

from qpipe_tfmot.quantizers import QAT, Binary, Ternary


@qpipe.hookimpl
def qpipe_register_quantizers(register: Any) -> None:
    for quantizer in (QAT, Ternary, Binary):
        register(quantizer)
