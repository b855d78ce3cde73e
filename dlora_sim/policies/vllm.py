"""vLLM (replicated): a whole merged model copy per adapter, one model per iteration, whole-model LRU
swap between host and GPU. Pair with `router=static` and `cluster.replica.weights=full_copy`."""
from __future__ import annotations

from dataclasses import dataclass, field

from dlora_sim.policies.base import Decision, ReplicaView
from dlora_sim.policies.merged import MergedOnly


@dataclass
class VllmReplicated(MergedOnly):
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
