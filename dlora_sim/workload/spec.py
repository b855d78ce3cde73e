"""The canonical request stream every workload source produces.

A workload is data, not behaviour: a tuple of requests sorted by arrival and the adapters they use.
Synthetic generators, trace loaders and the canonical CSV all produce a `Workload`; the engine and
the GPU replay consume nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


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


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival plus the adapters they reference (ids 0..len(adapters)-1)."""

    requests: tuple[RequestSpec, ...]
    adapters: tuple[AdapterSpec, ...]
    name: str = "workload"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = [a.id for a in self.adapters]
        if ids != list(range(len(ids))):
            raise ValueError(f"adapter ids must be 0..{len(ids) - 1} in order, got {ids[:10]}...")
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

    @staticmethod
    def from_requests(requests: Sequence[RequestSpec], num_adapters: int | None = None,
                      rank: int | Sequence[int] = 16, name: str = "workload", meta: dict | None = None) -> "Workload":
        """Sort requests by arrival (stable) and build uniform- or per-adapter-rank adapters."""
        reqs = tuple(sorted(requests, key=lambda r: r.arrival_s))
        n = num_adapters if num_adapters is not None else (max((r.adapter for r in reqs), default=-1) + 1)
        ranks = [rank] * n if isinstance(rank, int) else list(rank)
        if len(ranks) != n:
            raise ValueError(f"got {len(ranks)} ranks for {n} adapters")
        adapters = tuple(AdapterSpec(id=i, rank=int(ranks[i]), name=f"adapter-{i}") for i in range(n))
        return Workload(requests=reqs, adapters=adapters, name=name, meta=dict(meta or {}))


class WorkloadSource(Protocol):
    """What a `workload` config instantiates to (Hydra `_target_`): builds a Workload from a seed."""

    def build(self, seed: int) -> Workload: ...
