"""Unmerged-only (S-LoRA / Punica style): base weights stay clean; FCFS across adapters, bounded by slots."""
from __future__ import annotations

from dataclasses import dataclass

from dlora_sim.policies.base import Decision, LocalScheduler, ReplicaView
from dlora_sim.policies.batching import fill_batch, plan_adapter_slots


@dataclass
class UnmergedOnly(LocalScheduler):
    def schedule(self, view: ReplicaView) -> Decision:
        plan = fill_batch(view, view.queue, adapter_limit=view.adapter_slots)
        if not plan.batch:
            return Decision([])
        resident = view.resident
        if all(a in resident for a in plan.adapters):   # the common case: nothing to load
            load, evict = (), ()
        else:
            load, evict = plan_adapter_slots(view, (r.adapter for r in plan.batch))
        return Decision(plan.batch, merged=None, load=load, evict=evict, swap_out=tuple(plan.swap_out),
                        recompute=tuple(plan.recompute), stable=True)
