"""The canonical request stream every workload source produces.

A workload is data, not behaviour: a tuple of requests sorted by arrival and the adapters they use.
Synthetic generators, trace loaders and the canonical CSV all produce a `Workload`; the engine and
the GPU replay consume nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

PREFIX_BLOCK_TOKENS = 512   # tokens per prompt-prefix hash block (Mooncake's hash_ids) unless a workload says


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request as it arrives: when, for which adapter, and how many tokens in and out."""

    arrival_s: float
    adapter: int
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not self.arrival_s >= 0.0:
            raise ValueError(f"arrival_s must be >= 0, got {self.arrival_s}")
        if self.adapter < 0:
            raise ValueError(f"adapter must be >= 0, got {self.adapter}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(
                f"prompt_tokens and output_tokens must be >= 1, got {self.prompt_tokens}, {self.output_tokens}"
            )


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A LoRA adapter: its index (as used by RequestSpec.adapter), a name, and its rank."""

    id: int
    rank: int = 16
    name: str = ""


class RequestArrays(Sequence[RequestSpec]):
    """Requests as four numpy columns (arrival, adapter, prompt and output tokens): 32 bytes a
    request instead of a Python object each. Items are `RequestSpec`s, made when read."""

    __slots__ = ("arrival_s", "adapter", "prompt_tokens", "output_tokens")

    def __init__(self, arrival_s, adapter, prompt_tokens, output_tokens):
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        self.adapter = np.asarray(adapter, dtype=np.int64)
        self.prompt_tokens = np.asarray(prompt_tokens, dtype=np.int64)
        self.output_tokens = np.asarray(output_tokens, dtype=np.int64)
        n = self.arrival_s.size
        if not (self.adapter.size == self.prompt_tokens.size == self.output_tokens.size == n):
            raise ValueError("request columns differ in length")
        for name, bad in (("arrival_s must be >= 0", ~(self.arrival_s >= 0)), ("adapter must be >= 0", self.adapter < 0),
                          ("prompt_tokens and output_tokens must be >= 1",
                           (self.prompt_tokens < 1) | (self.output_tokens < 1))):
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(f"request {i}: {name}, got {self[i]}")

    def __len__(self) -> int:
        return self.arrival_s.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RequestArrays(self.arrival_s[i], self.adapter[i], self.prompt_tokens[i], self.output_tokens[i])
        return RequestSpec(float(self.arrival_s[i]), int(self.adapter[i]), int(self.prompt_tokens[i]),
                           int(self.output_tokens[i]))

    def __iter__(self) -> Iterator[RequestSpec]:
        step = 1 << 16   # converted a chunk at a time: never a million Python floats at once
        for lo in range(0, len(self), step):
            hi = lo + step
            for t, a, p, o in zip(self.arrival_s[lo:hi].tolist(), self.adapter[lo:hi].tolist(),
                                  self.prompt_tokens[lo:hi].tolist(), self.output_tokens[lo:hi].tolist()):
                yield RequestSpec(t, a, p, o)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival plus the adapters they reference (ids 0..len(adapters)-1)."""

    requests: Sequence[RequestSpec]
    adapters: tuple[AdapterSpec, ...]
    name: str = "workload"
    meta: dict = field(default_factory=dict)
    # per request, the hashes of its prompt's prefix blocks of `prefix_block_tokens` tokens each (Mooncake's
    # hash_ids; equal hashes at equal positions = equal tokens): what prefix caching matches on; None = unknown
    prefixes: Sequence[tuple[int, ...]] | None = None
    prefix_block_tokens: int = PREFIX_BLOCK_TOKENS

    def __post_init__(self) -> None:
        if self.prefixes is not None and len(self.prefixes) != len(self.requests):
            raise ValueError(f"{len(self.prefixes)} prefixes for {len(self.requests)} requests")
        ids = [a.id for a in self.adapters]
        if ids != list(range(len(ids))):
            raise ValueError(f"adapter ids must be 0..{len(ids) - 1} in order, got {ids[:10]}...")
        if isinstance(self.requests, RequestArrays):   # checked a column at a time
            r = self.requests
            unsorted = np.diff(r.arrival_s) < 0
            if unsorted.any():
                i = int(np.argmax(unsorted)) + 1
                raise ValueError(f"requests must be sorted by arrival: request {i} at {r.arrival_s[i]} < "
                                 f"{r.arrival_s[i - 1]}")
            unknown = r.adapter >= len(self.adapters)
            if unknown.any():
                i = int(np.argmax(unknown))
                raise ValueError(f"request {i} uses unknown adapter {r.adapter[i]} (workload has {len(self.adapters)})")
            return
        last = 0.0
        for i, r in enumerate(self.requests):
            if r.arrival_s < last:
                raise ValueError(f"requests must be sorted by arrival: request {i} at {r.arrival_s} < {last}")
            if r.adapter >= len(self.adapters):
                raise ValueError(f"request {i} uses unknown adapter {r.adapter} (workload has {len(self.adapters)})")
            last = r.arrival_s

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def longest_prompt(self) -> int:
        if isinstance(self.requests, RequestArrays):
            return int(self.requests.prompt_tokens.max(initial=0))
        return max((r.prompt_tokens for r in self.requests), default=0)

    @staticmethod
    def from_requests(requests: Sequence[RequestSpec], num_adapters: int | None = None,
                      rank: int | Sequence[int] = 16, name: str = "workload", meta: dict | None = None) -> "Workload":
        """Sort requests by arrival (stable) and build uniform- or per-adapter-rank adapters."""
        reqs = tuple(sorted(requests, key=lambda r: r.arrival_s))
        n = num_adapters if num_adapters is not None else (max((r.adapter for r in reqs), default=-1) + 1)
        return Workload(requests=reqs, adapters=_adapters(n, rank), name=name, meta=dict(meta or {}))

    @staticmethod
    def from_arrays(requests: RequestArrays, num_adapters: int, rank: int | Sequence[int] = 16,
                    name: str = "workload", meta: dict | None = None) -> "Workload":
        """Requests already sorted by arrival, as columns (what generators of many requests return)."""
        return Workload(requests=requests, adapters=_adapters(num_adapters, rank), name=name, meta=dict(meta or {}))


def shared_prompt_prefixes(groups: Sequence[int], prompts: Sequence[int], shared_tokens: int,
                           block_tokens: int) -> tuple[tuple[int, ...], ...]:
    """Prefix hashes of prompts that open with their group's system prompt of `shared_tokens` tokens (already in
    `prompts`): its whole blocks hash by (group, block), so equal hashes are equal tokens; every other block is
    the request's own (a negative hash by (request, block))."""
    shared = shared_tokens // block_tokens
    return tuple(tuple([int(g) * 100_003 + b for b in range(shared)]
                       + [-(i * 100_003 + b) - 1 for b in range(shared, -(-int(p) // block_tokens))])
                 for i, (g, p) in enumerate(zip(groups, prompts)))


def _adapters(n: int, rank: int | Sequence[int]) -> tuple[AdapterSpec, ...]:
    ranks = [rank] * n if isinstance(rank, int) else list(rank)
    if len(ranks) != n:
        raise ValueError(f"got {len(ranks)} ranks for {n} adapters")
    return tuple(AdapterSpec(id=i, rank=int(ranks[i]), name=f"adapter-{i}") for i in range(n))


class WorkloadSource(Protocol):
    """What a `workload` config instantiates to (Hydra `_target_`): builds a Workload from a seed."""

    def build(self, seed: int) -> Workload: ...
