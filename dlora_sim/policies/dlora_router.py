"""dLoRA's global dispatch (docs/algorithm.md): greedy adapter placement, then each request to the host of its adapter
with the least outstanding work, in integer ns (estimates.py: no division of counts, so lightly loaded replicas
do not all tie at zero; a host that only fast-forwarded since the last arrival is priced by a bisection)."""
from __future__ import annotations

from dataclasses import dataclass, field

from dlora_sim.core.contracts import ClusterView, Placement, Router
from dlora_sim.policies.estimates import WorkModel
from dlora_sim.core.replica_config import hosting_capacity
from dlora_sim.policies.placement import greedy_placement
from dlora_sim.core.request import NS, Request


DEMAND_SOURCES = ("online", "oracle")


def known_demand(cluster: ClusterView, source: str) -> list[float]:
    """The adapter mix a router plans with: learnt from arrivals so far (`online`, the default: at t=0
    the uniform prior), or the whole workload's (`oracle`: look-ahead, an explicit upper bound)."""
    if source not in DEMAND_SOURCES:
        raise ValueError(f"router.demand must be one of {list(DEMAND_SOURCES)}, got {source!r}")
    return list(cluster.workload_demand if source == "oracle" else cluster.demand)


def placement_for(cluster: ClusterView, extra_placements: int | None, demand: str = "online") -> list[list[int]]:
    """Greedy placement with `extra_placements` beyond one per adapter; None = as many as the replicas'
    adapter slots hold. (The paper places replicas + adapters - 1, extra_placements = replicas - 1,
    because its slots *were* the adapters placed; with slots sized by memory, empty slots buy nothing.)"""
    reps = cluster.replicas
    n = len(cluster.adapters)
    slots = [hosting_capacity(r.adapter_slots, n, len(reps)) for r in reps]
    target = sum(slots) if extra_placements is None else n + extra_placements
    return greedy_placement(known_demand(cluster, demand), [r.total_blocks for r in reps], slots, target)


def preload_for(cluster: ClusterView, hosts: list[list[int]], demand: str = "online") -> dict[int, list[int]]:
    """What each replica loads at t=0: its hosted adapters, most demanded first, up to its GPU slots
    (hosted adapters beyond the slots are loaded on demand)."""
    n = len(hosts)
    weights = known_demand(cluster, demand)
    preload: dict[int, list[int]] = {}
    for a in sorted(range(n), key=lambda a: (-weights[a], a)):
        for j in hosts[a]:
            if len(preload.setdefault(j, [])) < cluster.replicas[j].adapter_slots:
                preload[j].append(a)
    return preload


@dataclass
class DLoRARouter(Router):
    """Cost = work queued on the replica (full single-adapter batches discounted by the profile's
    merged/unmerged ratio) + this request's own expected time. Candidates: hosts only, each priced by
    `WorkModel.replica_ns`, which counts the iterations an executor has not applied yet (the view's
    `lag`): nothing is materialised for a dispatch."""

    reads_progress = False

    work: WorkModel = field(default_factory=WorkModel)
    extra_placements: int | None = None   # placements beyond one per adapter; None = fill the adapter slots
    harvest_every: int = 64               # refresh per-adapter length estimates every N dispatches
    demand: str = "online"                # placement's adapter mix: online (arrivals so far) | oracle (look-ahead)
    _n: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.demand not in DEMAND_SOURCES:
            raise ValueError(f"router.demand must be one of {list(DEMAND_SOURCES)}, got {self.demand!r}")

    def place(self, cluster: ClusterView) -> Placement:
        hosts = placement_for(cluster, self.extra_placements, self.demand)
        return Placement(hosts={a: tuple(hs) for a, hs in enumerate(hosts)},
                         preload=preload_for(cluster, hosts, self.demand))

    def _observe(self, request: Request, cluster: ClusterView) -> None:
        self.work.bind(cluster.cost, cluster.replicas[0].max_num_seqs)
        self.work.track((request,))
        self._n += 1
        if self._n % self.harvest_every == 0:
            self.work.harvest()

    def replica_cost(self, j: int, request: Request, cluster: ClusterView) -> float:
        """Seconds: the host's work and the request's own."""
        view, work = cluster.replicas[j], self.work
        work.bind(cluster.cost, view.max_num_seqs)
        return (work.replica_ns(view) + work.request_ns(request)) / NS

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        """The host of least `replica_cost` (ties: the lower index), compared in integer ns."""
        self._observe(request, cluster)
        return self.work.cheapest(cluster.replicas, self.candidates(request, cluster), request, cluster.cost)
