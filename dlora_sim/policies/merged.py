"""Merged-only: always merged on the adapter of the oldest queued request, running only its requests."""
from __future__ import annotations

from dataclasses import dataclass

from dlora_sim.core.contracts import Decision, LocalScheduler, ReplicaView
from dlora_sim.policies.batching import adapter_prefetch, fill_batch, plan_adapter_slots


@dataclass
class MergedOnly(LocalScheduler):
    merges = True

    def schedule(self, view: ReplicaView) -> Decision:
        if not view.queue:
            return Decision([], merged=view.merged)
        target = view.queue[0].adapter
        plan = fill_batch(view, self._candidates(view, target))
        if not plan.batch:
            return Decision([], merged=view.merged)
        load, evict = plan_adapter_slots(view, [target], lru=self._lru(view))
        return Decision(plan.batch, merged=target, load=load, evict=evict, swap_out=tuple(plan.swap_out),
                        recompute=tuple(plan.recompute), stable=True, prefetch=adapter_prefetch(view, load, evict))

    def _candidates(self, view: ReplicaView, target: int):
        """The requests it may batch, in priority order: every queued request of the target adapter."""
        return (r for r in view.queue if r.adapter == target)

    def _lru(self, view: ReplicaView) -> list[int] | None:
        return None
