"""LoRA-affinity routers of today's serving stacks, beside dLoRA's placement and cost dispatch.

Production routers send a request to a replica that already has its adapter unless that replica is busy ("soft
affinity"), so adapters stay where they are loaded without a placement plan:

- `LoraAffinity`: the Kubernetes Gateway API inference extension's endpoint picker, its default decision tree
  with its default thresholds, on the engine state it scrapes (vLLM's running and waiting adapters, waiting
  queue, KV use; read here at the instant of dispatch, where the gateway's scrape is up to 50 ms old).
- `AdapterLRU`: a router that sees no engine state (BLIS's resident-set router, gateways without metrics): it
  remembers the adapters it last sent to each replica, an LRU as large as the replica's adapter slots, and
  prefers the least loaded of those replicas unless its outstanding requests exceed a threshold.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dlora_sim.core.contracts import ClusterView, ReplicaView, Router
from dlora_sim.core.request import Request
from dlora_sim.policies.dispatch import least_loaded


def _waiting(view: ReplicaView) -> int:
    return len(view.queue) - len(view.in_flight)


def _kv_used(view: ReplicaView) -> float:
    return 1.0 - view.free_blocks / view.total_blocks


def _band(js: list[int], metric: Callable[[int], float]) -> list[int]:
    """The replicas in the lowest 1/n of the metric's range (the inference extension's least-queue and
    least-KV filters: near-ties stay candidates instead of the one minimum)."""
    values = [metric(j) for j in js]
    lo, hi = min(values), max(values)
    return [j for j, v in zip(js, values) if v <= lo + (hi - lo) / len(js)]


@dataclass
class LoraAffinity(Router):
    """The inference extension's default for critical requests: with some replica's waiting queue under
    `queue_threshold`, keep those, then LoRA affinity, then least queue, then least KV; otherwise least queue
    first, then affinity, then least KV; a seeded random pick among what remains. Affinity: replicas where
    the adapter runs or waits; with probability `affinity_share`, only those (if any), else the replicas with
    room for one more active adapter (running adapters plus waiting adapters, an adapter in both counted twice
    as the extension counts vLLM's two lists, < adapter slots: vLLM's max_loras). Defaults are the extension's:
    128 and 0.999."""

    queue_threshold: int = 128
    affinity_share: float = 0.999
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.queue_threshold < 0:
            raise ValueError(f"router.queue_threshold must be >= 0, got {self.queue_threshold}")
        if not 0.0 <= self.affinity_share <= 1.0:
            raise ValueError(f"router.affinity_share must be in [0, 1], got {self.affinity_share}")
        self._rng = random.Random(self.seed)

    def _affinity(self, js: list[int], adapter: int, reps: Sequence[ReplicaView]) -> list[int]:
        active, room = [], []
        for j in js:
            view = reps[j]
            running = {r.adapter for r in view.in_flight}
            flight = {id(r) for r in view.in_flight}
            waiting = {r.adapter for r in view.queue if id(r) not in flight}
            if adapter in running or adapter in waiting:
                active.append(j)
            elif len(running) + len(waiting) < view.adapter_slots:   # as the extension counts: both lists
                room.append(j)
        if active and room:
            return active if self._rng.random() < self.affinity_share else room
        return active or room or js

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        reps = cluster.replicas
        js = list(self.candidates(request, cluster))
        low = [j for j in js if _waiting(reps[j]) < self.queue_threshold]
        if low:
            js = _band(self._affinity(low, request.adapter, reps), lambda j: _waiting(reps[j]))
        else:
            js = self._affinity(_band(js, lambda j: _waiting(reps[j])), request.adapter, reps)
        js = _band(js, lambda j: _kv_used(reps[j]))
        return js[self._rng.randrange(len(js))]


@dataclass
class AdapterLRU(Router):
    """Least outstanding requests among the replicas this router last sent the adapter to (its own LRU per
    replica, as many adapters as the replica has slots), unless that replica holds more than
    `queue_threshold` outstanding requests; then, or with no such replica, the least loaded. Ties: lower id."""

    queue_threshold: int = 128
    reads_progress = False
    _lru: list[dict[int, None]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.queue_threshold < 0:
            raise ValueError(f"router.queue_threshold must be >= 0, got {self.queue_threshold}")

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        reps = cluster.replicas
        if not self._lru:
            self._lru = [dict.fromkeys(r.resident) for r in reps]   # what each replica preloaded
        js = self.candidates(request, cluster)
        a = request.adapter
        warm = [j for j in js if a in self._lru[j]]
        best = least_loaded(reps, warm) if warm else None
        if best is None or len(reps[best].queue) > self.queue_threshold:
            best = least_loaded(reps, js)
        lru = self._lru[best]
        lru.pop(a, None)
        lru[a] = None
        while len(lru) > reps[best].adapter_slots:
            del lru[next(iter(lru))]
        return best
