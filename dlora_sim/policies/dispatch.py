"""Dispatch baselines: round-robin, least-loaded, and a static adapter -> replica mapping."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from dlora_sim.core.contracts import ClusterView, Placement, ReplicaView, Router
from dlora_sim.core.request import Request


@dataclass
class RoundRobin(Router):
    """Each request to the next replica that may serve its adapter."""

    reads_progress = False

    _next: int = field(default=0, repr=False)

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        cands = self.candidates(request, cluster)
        choice = cands[self._next % len(cands)]
        self._next += 1
        return choice


def least_loaded(replicas: Sequence[ReplicaView], candidates: Iterable[int]) -> int:
    """The candidate with the fewest outstanding requests; ties -> lowest id."""
    return min(candidates, key=lambda j: (len(replicas[j].queue), j))


@dataclass
class LeastLoaded(Router):
    """Fewest outstanding requests on the replica (Vidur's and Llumnix's simple baseline); ties -> lowest id."""

    reads_progress = False

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        return least_loaded(cluster.replicas, self.candidates(request, cluster))


@dataclass
class StaticAdapter(Router):
    """vLLM-replicated: adapter a lives on replica a mod R only; requests go where their model is."""

    reads_progress = False

    def place(self, cluster: ClusterView) -> Placement:
        n = len(cluster.replicas)
        return Placement(hosts={a.id: (a.id % n,) for a in cluster.adapters})

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        return self.candidates(request, cluster)[0]
