"""The "proactive" baseline (from the dLoRA paper; docs/algorithm.md): dLoRA's placement and cost dispatch, plus dispatch-time
substitution — a request may also go to a replica that does not host its adapter if an idle, replicated
adapter there can be swapped out for it; that replica's cost then includes the adapter's load time.

Substitution changes the placement for good, so it must clearly pay: the other replica's cost plus
the load must undercut the best host's by `min_gain_s` seconds and by `min_gain` of that cost, and a
replica that took part in a substitution (either side) sits out for `cooldown_s` (hysteresis). A
substitution that fired on any small cost difference kept moving the hottest adapters around and left
replicas idle once their adapters were taken.

The router owns the placement it adapts, so it declares every replica allowed to the engine (empty
`Placement.hosts`) and keeps its own host sets; the replica's local scheduler loads the adapter on demand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from dlora_sim.core.contracts import ClusterView, Placement
from dlora_sim.policies.dlora_router import DLoRARouter, placement_for, preload_for
from dlora_sim.core.request import Request


@dataclass
class ProactiveRouter(DLoRARouter):
    min_gain_s: float = 0.5          # a substitution must save at least this many seconds of work ...
    min_gain: float = 0.25           # ... and this fraction of the best host's cost
    cooldown_s: float = 5.0          # a replica that gained or lost an adapter sits out this long
    _hosts: list[set[int]] = field(default_factory=list, repr=False)
    _busy_until: dict[int, float] = field(default_factory=dict, repr=False)
    substitutions: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_gain_s < 0 or not 0 <= self.min_gain < 1 or self.cooldown_s < 0:
            raise ValueError("router: min_gain_s and cooldown_s must be >= 0 and min_gain in [0, 1)")

    def stats(self) -> dict:
        return {"substitutions": self.substitutions}

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

    def _cooling(self, j: int, now: float) -> bool:
        return self._busy_until.get(j, -math.inf) > now

    def adapter_added(self, adapter: int, cluster: ClusterView) -> Sequence[int] | None:
        self._hosts.append(set(range(len(cluster.replicas))))   # its own host sets: every replica may serve it
        return None

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        self._observe(request, cluster)
        a, now = request.adapter, cluster.now
        hosts = self._hosts[a]
        best_cost, best = min((self.replica_cost(j, request, cluster), j) for j in hosts)
        rank = cluster.adapters[a].rank
        load_s = cluster.cost.load_time(cluster.cost.profile.adapter_bytes(rank))
        bar = min(best_cost - self.min_gain_s, best_cost * (1 - self.min_gain))
        swap = None
        for j in range(len(cluster.replicas)):
            if j in hosts or self._cooling(j, now):
                continue
            c = self.replica_cost(j, request, cluster) + load_s
            if c < bar:
                victim = self._victim(j, cluster)
                if victim is not None:
                    best, bar, swap = j, c, victim
        if swap is not None:
            self._hosts[swap].discard(best)
            hosts.add(best)
            self._busy_until[best] = now + self.cooldown_s
            self.substitutions += 1
        return best
