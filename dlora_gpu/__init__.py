"""Real GPU runtime for multi-LoRA serving: Triton kernels, a pure-torch fallback, drift-free merging,
and the model they serve (a request's path: model, weights, adapters, kv_cache, batch).

Importing the package imports nothing heavy: its apps check first that the `gpu` extra is installed
(`require_runtime`), and `dlora_gpu.kernels` is imported lazily by the triton backend.
"""
from __future__ import annotations

from dlora_sim.core.errors import require_extra

RUNTIME_MODULES = ("torch", "safetensors")   # the `gpu` extra (triton: only for runtime.backend=triton, Linux)


def require_runtime(prog: str) -> None:
    """Exit with one line naming the install command when the `gpu` extra is missing."""
    require_extra(prog, "the runtime", RUNTIME_MODULES, "gpu",
                  "`make install-runtime` (PyTorch's CPU build where no NVIDIA GPU is found; docs/runtime.md)")
