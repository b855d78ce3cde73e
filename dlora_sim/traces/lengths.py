"""Where prompt/output lengths come from when the arrival trace has none.

Azure Functions and ServeGen m-large give arrivals but no token counts, so lengths are drawn from
another source: a fixed pair, S-LoRA's uniform range, or (prompt, output) pairs resampled jointly
from a real LLM trace, optionally filtered like dLoRA's ShareGPT setup (prompt <= 1024,
prompt + output <= 2048). Every source has `sample(n, rng) -> (prompts, outputs)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from dlora_sim.traces.raw import RawRequests


class LengthSource:
    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


@dataclass(frozen=True)
class FixedLengths(LengthSource):
    """Every request has the same prompt and output length."""

    prompt_tokens: int = 512
    output_tokens: int = 128

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt_tokens, dtype=np.int64), np.full(n, self.output_tokens, dtype=np.int64)


@dataclass(frozen=True)
class UniformLengths(LengthSource):
    """Independent uniform integers in [low, high) for prompt and output (S-LoRA used [8, 512))."""

    prompt_low: int = 8
    prompt_high: int = 512
    output_low: int = 8
    output_high: int = 512

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return (rng.integers(self.prompt_low, self.prompt_high, size=n),
                rng.integers(self.output_low, self.output_high, size=n))


@dataclass(frozen=True)
class TraceLengths(LengthSource):
    """(prompt, output) pairs resampled with replacement from a registered LLM trace (joint, not marginals)."""

    trace: str = "azure_conv"
    path: str | None = None
    max_prompt: int | None = None
    max_total: int | None = None

    def pool(self) -> tuple[np.ndarray, np.ndarray]:
        return _pool(self.trace, self.path, self.max_prompt, self.max_total)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p, o = self.pool()
        idx = rng.integers(0, len(p), size=n)
        return p[idx], o[idx]


@lru_cache(maxsize=8)
def _pool(trace: str, path: str | None, max_prompt: int | None, max_total: int | None):
    raw = load_registered(trace, path)
    if not raw.has_lengths:
        raise ValueError(f"trace {trace!r} has no token lengths to sample from")
    p, o = raw.prompt_tokens, raw.output_tokens
    keep = np.ones(len(p), dtype=bool)
    if max_prompt is not None:
        keep &= p <= max_prompt
    if max_total is not None:
        keep &= p + o <= max_total
    if not keep.any():
        raise ValueError(f"no request of {trace!r} has prompt <= {max_prompt} and total <= {max_total}")
    return p[keep], o[keep]


def load_registered(trace: str, path: str | None = None) -> RawRequests:
    """Load a request-level registered trace (azure_llm or mooncake format) by name."""
    from dlora_sim.traces.azure_llm import load_azure_llm
    from dlora_sim.traces.mooncake import load_mooncake
    from dlora_sim.traces.registry import get_entry, resolve

    entry = get_entry(trace)
    loaders = {"azure_llm": load_azure_llm, "mooncake": load_mooncake}
    if entry.format not in loaders:
        raise ValueError(f"trace {trace!r} (format {entry.format}) has no per-request lengths; "
                         f"use one of the formats {sorted(loaders)}")
    return loaders[entry.format](Path(resolve(trace, path=path)))
