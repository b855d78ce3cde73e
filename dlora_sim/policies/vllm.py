"""vLLM with replicated models: a whole merged model copy per adapter, one model per iteration,
whole-model LRU swap between host and GPU. Pair with `router=static` and `cluster.replica.weights=full_copy`.

`VllmReplicated` is how the dLoRA paper emulated it: the batch is the FCFS run of consecutive requests
sharing the head request's model (as PEFT's), so a model serves only until another model's request
interleaves. `VllmGrouped` is the stronger variant: every queued request of the head request's model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import takewhile

from dlora_sim.core.contracts import Decision, ReplicaView
from dlora_sim.policies.merged import MergedOnly


@dataclass
class VllmGrouped(MergedOnly):
    """All queued requests of the head request's model, merged (its whole copy), LRU model swap."""

    _last_used: dict[int, int] = field(default_factory=dict, repr=False)
    _tick: int = field(default=0, repr=False)

    def schedule(self, view: ReplicaView) -> Decision:
        d = super().schedule(view)
        if d.batch:
            self._tick += 1
            self._last_used[d.merged] = self._tick
        return d

    def _lru(self, view: ReplicaView) -> list[int]:
        return sorted(view.resident, key=lambda a: self._last_used.get(a, 0))


@dataclass
class VllmReplicated(VllmGrouped):
    """The paper's emulation: the contiguous FCFS run of the head request's model."""

    def _candidates(self, view: ReplicaView, target: int):
        return takewhile(lambda r: r.adapter == target, view.queue)
