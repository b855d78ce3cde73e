"""A step: one iteration as a replica applied it, the features its cost depends on, and its price.

`ReplicaState.begin` makes a `Step`; the simulator prices it (`CostModel.price`) and waits that long,
the runtime runs it on kernels. Both record the same features, so a served iteration is a fit point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from dlora_sim.core.contracts import Decision
from dlora_sim.core.request import Request, to_ns


@dataclass(slots=True)
class Step:
    """One iteration as `begin` applied it: what runs and the features executors price or run."""

    batch: list[Request]
    decision: Decision
    prefill: list[int]               # per batch request: prompt tokens it prefills (0: one decode token)
    swap_in: list[Request]           # batch requests whose KV came back from host memory
    mode_from: int | None            # merged adapter before the iteration (None = clean weights)
    prefill_tokens: int = 0
    prefill_sq: int = 0              # sum of squared prefill lengths (attention)
    decode_seqs: int = 0
    decode_context: int = 0          # sum of decode sequences' context lengths
    rank_sum: int = 0                # ranks of the distinct adapters in the batch
    token_rank: int = 0              # sum over the batch's tokens of their adapter's rank
    distinct: int = 0                # distinct adapters in the batch
    # distinct adapters among the prefills plus those among the decodes: the passes of a LoRA path that
    # treats each kind apart and loops over adapters (the CPU runtime's torch path; lora.*.per_adapter_s)
    lora_passes: int = 0
    resident_rank_sum: int = 0       # ranks of the adapters in GPU slots (the einsum path prices them all)
    swapped_in_blocks: int = 0
    swapped_out_blocks: int = 0
    # what the replica's memory makes of the decision's loads and swaps (for their prices)
    load_bytes: list[int] = field(default_factory=list)   # bytes of each adapter loaded, in load order
    # seconds the loads waited on the backing store first (adapters not in a bounded host cache, or still
    # being prefetched; adapter_tiers.py); 0 when every adapter is in host memory
    store_s: float = 0.0
    overlap_loads: bool = False      # host-to-GPU loads overlap the iteration's compute (cluster.replica.overlap_loads)
    block_bytes: int = 0             # bytes of one KV block
    full_copy: bool = False          # adapters are whole model copies: a mode change is free

    @property
    def merged(self) -> int | None:
        return self.decision.merged


class LoraFeatures(NamedTuple):
    """The LoRA features a step is priced with: all zero when it runs merged (the one place that rule
    lives; the runtime records these as its fit points)."""

    rank_sum: int
    token_rank: int
    passes: int

    @classmethod
    def of(cls, step: Step) -> "LoraFeatures":
        if step.decision.merged is not None:
            return _NO_LORA
        return cls(step.rank_sum, step.token_rank, step.lora_passes)


_NO_LORA = LoraFeatures(0, 0, 0)


@dataclass(frozen=True, slots=True)
class Prices:
    """Seconds the cost model charges for a step (the simulator's time, the runtime's virtual clock)."""

    compute: float
    switch: float
    load: float
    swap: float

    @property
    def overhead(self) -> tuple[float, float, float]:
        return (self.switch, self.load, self.swap)

    def total_ns(self) -> int:
        return to_ns(self.compute + self.switch + self.load + self.swap)   # this order: bit-stable
