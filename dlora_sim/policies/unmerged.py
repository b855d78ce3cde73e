"""Unmerged-only (S-LoRA / Punica style): base weights stay clean; FCFS across adapters, bounded by slots.

`evict` picks the adapter a full set of slots gives up: `outstanding` (the one with fewest requests on
the replica, dLoRA's and S-LoRA's rule) or `lru` (least recently used, vLLM's multi-LoRA LRU cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dlora_sim.core.contracts import Decision, LocalScheduler, ReplicaView
from dlora_sim.policies.batching import adapter_prefetch, batch_adapter_slots, fill_batch


@dataclass
class UnmergedOnly(LocalScheduler):
    # FCFS over an unchanged queue takes it whole again; skipped LRU ticks keep the adapters' order
    continues = True
    evict: str = "outstanding"     # outstanding | lru
    _last_used: dict[int, int] = field(default_factory=dict, repr=False)
    _tick: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.evict not in ("outstanding", "lru"):
            raise ValueError(f"scheduler.evict must be 'outstanding' or 'lru', got {self.evict!r}")

    def schedule(self, view: ReplicaView) -> Decision:
        plan = fill_batch(view, view.queue, adapter_limit=view.adapter_slots)
        if not plan.batch:
            return Decision([])
        lru = (lambda: sorted(view.resident, key=lambda a: self._last_used.get(a, 0))) if self.evict == "lru" else None
        load, evict = batch_adapter_slots(view, plan, lru=lru)
        if self.evict == "lru":
            self._tick += 1
            for a in plan.adapters:
                self._last_used[a] = self._tick
        return Decision(plan.batch, merged=None, load=load, evict=evict, swap_out=tuple(plan.swap_out),
                        recompute=tuple(plan.recompute), stable=True, prefetch=adapter_prefetch(view, load, evict))
