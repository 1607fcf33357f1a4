"""Built-in plugin: TensorFlow Lite for Microcontrollers (TFLM), an optional extra.

- the ``tflm`` backend runs a .tflite in TFLM's interpreter, one sample per invoke, with
  quantized inputs and outputs handled as the ``litert`` backend does;
- the ``micro`` evaluator reports whether TFLM runs the variant (``micro_compatible``, with
  TFLM's reason when not), the smallest tensor arena (``arena_bytes``), the flash it takes
  (``flash_bytes``), its operators (``micro_ops``), and how far TFLM's outputs are from
  LiteRT's.

Needs the ``tflite-micro`` package (``pip install qpipe[micro]``), imported at first use
only; a pipeline naming these components without it stops with that one line.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

import qpipe
from qpipe import Artifact, Backend, LoadedModel, QpipeError, Runner
from qpipe_tflm.runtime import require_tflm


class TFLMOptions(qpipe.Options):
    arena_size: int = Field(16 << 20, ge=1024, description="tensor arena bytes given to the interpreter")
    batch_size: int = Field(256, ge=1, description="samples handed over per call (TFLM invokes one at a time)")


class TFLMBackend(Backend):
    """Runs .tflite models in TensorFlow Lite for Microcontrollers, one sample per invoke."""

    name = "tflm"
    formats = ("tflite",)
    Options = TFLMOptions

    def __init__(self, options: TFLMOptions | None = None):
        super().__init__(options)
        require_tflm("the tflm backend")

    def load(self, artifact: Artifact, model: LoadedModel | None = None) -> Runner:
        from qpipe_tflm.arena import Prober
        from qpipe_tflm.runtime import SampleRunner, TFLMEngine

        arena = self.options.arena_size
        with Prober(artifact.path) as prober:  # in a worker first: TFLM may crash on failure
            tried = prober.attempt(arena)
        if not tried.ok:
            raise QpipeError(f"TFLite Micro cannot run {artifact.path.name}: {tried.reason}")
        return SampleRunner(artifact.path, TFLMEngine(artifact.path, arena))


@qpipe.hookimpl
def qpipe_register_backends(register: Any) -> None:
    register(TFLMBackend)


@qpipe.hookimpl
def qpipe_register_evaluators(register: Any) -> None:
    from qpipe_tflm.evaluator import Micro

    register(Micro)
