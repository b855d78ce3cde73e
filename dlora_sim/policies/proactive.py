"""The "proactive" baseline (dLoRA §3/§4): dLoRA's placement and cost dispatch, plus dispatch-time
substitution — a request may also go to a replica that does not host its adapter if an idle, replicated
adapter there can be swapped out for it; that replica's cost then includes the adapter's load time.

The router owns the placement it adapts, so it declares every replica allowed to the engine (empty
`Placement.hosts`) and keeps its own host sets; the replica's local scheduler loads the adapter on demand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dlora_sim.policies.base import ClusterView, Placement
from dlora_sim.policies.dlora_router import DLoRARouter, placement_for, preload_for
from dlora_sim.request import Request


@dataclass
class ProactiveRouter(DLoRARouter):
    _hosts: list[set[int]] = field(default_factory=list, repr=False)
    substitutions: int = field(default=0, repr=False)

    def place(self, cluster: ClusterView) -> Placement:
        hosts = placement_for(cluster, self.extra_placements, self.demand)
        self._hosts = [set(hs) for hs in hosts]
        return Placement(hosts={}, preload=preload_for(cluster, hosts, self.demand))

    def _victim(self, j: int, cluster: ClusterView) -> int | None:
        """An adapter hosted on j, hosted elsewhere too, with no request queued on j (lowest id)."""
        view = cluster.replicas[j]
        busy = {r.adapter for r in view.queue}
        for b in sorted(a for a, hs in enumerate(self._hosts) if j in hs):
            if b not in busy and len(self._hosts[b]) > 1:
                return b
        return None

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        self._observe(request, cluster)
        a = request.adapter
        hosts = self._hosts[a]
        best_cost, best = min((self.replica_cost(j, request, cluster), j) for j in hosts)
        rank = cluster.adapters[a].rank
        load_s = cluster.cost.load_time(cluster.cost.profile.adapter_bytes(rank))
        swap = None
        for j in range(len(cluster.replicas)):
            if j in hosts:
                continue
            c = self.replica_cost(j, request, cluster) + load_s
            if c < best_cost:
                victim = self._victim(j, cluster)
                if victim is not None:
                    best, best_cost, swap = j, c, victim
        if swap is not None:
            self._hosts[swap].discard(best)
            hosts.add(best)
            self.substitutions += 1
        return best
