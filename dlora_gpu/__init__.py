"""Real GPU runtime for multi-LoRA serving: Triton kernels, a pure-torch fallback, drift-free merging,
and the model they serve (a request's path: model, weights, adapters, kv_cache, batch).

Nothing here imports triton at package import time, so the torch path (and the simulator) works on
machines without triton; `dlora_gpu.kernels` is imported lazily by the triton backend.
"""

from dlora_gpu.lora_stack import LoRAStack, Segments

__all__ = ["LoRAStack", "Segments"]
