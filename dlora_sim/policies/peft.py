"""PEFT: one adapter per iteration, unmerged compute; the batch is the FCFS run of consecutive requests
sharing the head request's adapter."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import takewhile

from dlora_sim.core.contracts import Decision, LocalScheduler, ReplicaView
from dlora_sim.policies.batching import adapter_prefetch, fill_batch, plan_adapter_slots


@dataclass
class Peft(LocalScheduler):
    def schedule(self, view: ReplicaView) -> Decision:
        if not view.queue:
            return Decision([])
        head = view.queue[0].adapter
        plan = fill_batch(view, takewhile(lambda r: r.adapter == head, view.queue))
        if not plan.batch:
            return Decision([])
        load, evict = plan_adapter_slots(view, [head])
        return Decision(plan.batch, merged=None, load=load, evict=evict, swap_out=tuple(plan.swap_out),
                        recompute=tuple(plan.recompute), stable=True, prefetch=adapter_prefetch(view, load, evict))
