"""Built-in plugin: quantization-aware training with TF-MOT (work in progress)."""
