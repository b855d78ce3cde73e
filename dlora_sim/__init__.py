"""dlora_sim: a discrete-event simulator of multi-LoRA LLM serving clusters.

From Python: `simulate`, `load`, `load_sweep` and `Results` (dlora_sim.api), loaded on first use so
that `dlora-sim` itself starts without pandas.
"""
from __future__ import annotations

from typing import Any

from dlora_sim import compiled as _compiled

_compiled.install()   # the optional mypyc build of the hot modules, if built from these sources

__all__ = ["Results", "load", "load_sweep", "simulate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dlora_sim import api
        return getattr(api, name)
    raise AttributeError(f"module 'dlora_sim' has no attribute {name!r}")
