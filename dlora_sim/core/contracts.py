"""The contracts between policies and executors (the simulator's engine or the GPU runtime).

A local scheduler sees a `ReplicaView` and returns a `Decision` for the next iteration. A router
places adapters and dispatches each arriving request. A migrator periodically moves requests (and
adapters) between replicas. Views are read-only by contract: policies keep their own state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Collection, Literal, Mapping, Protocol, Sequence

from dlora_sim.core.request import Request

if TYPE_CHECKING:
    from dlora_sim.core.cost_model import CostModel
    from dlora_sim.core.workload import AdapterSpec


class PolicyError(RuntimeError):
    """A policy returned a decision the executor cannot apply (a bug in the policy)."""


class ReplicaView(Protocol):
    """What a local scheduler may read about its replica."""

    id: int
    queue: Sequence[Request]          # unfinished requests on this replica, FCFS (arrival, id)
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked_prefill: bool             # prompts over the token budget run in chunks (request.prefill_chunks)
    prefill_priority: bool            # admissible prefills go before decodes
    block_size: int
    total_blocks: int
    free_blocks: int
    watermark_blocks: int
    host_free_blocks: int
    adapter_slots: int
    resident: Collection[int]         # adapters in GPU slots (insertion = load order)
    resident_rank_sum: int            # the sum of their ranks
    merged: int | None                # adapter merged into the base weights, or None (clean)
    full_copy: bool                   # adapters are whole merged model copies (vLLM-replicated)
    host_adapter_cache: int | None    # adapters host memory holds (null: every adapter; core/adapter_tiers.py)
    adapter_prefetch: bool            # decisions may fetch adapters from the backing store ahead of their loads
    cost: "CostModel"

    @property
    def now(self) -> float: ...
    @property
    def in_flight(self) -> Sequence[Request]: ...   # the batch of the iteration running now (not movable)
    def adapter_rank(self, adapter: int) -> int: ...
    @property
    def ranks(self) -> Sequence[int]: ...          # every workload adapter's rank, by id
    def by_adapter(self) -> Mapping[int, Sequence[Request]]: ...   # the queue per adapter, FCFS, oldest first
    version: int                      # changes with every change to the queue or its requests' progress
    # iterations of `in_flight` that ended but are not applied to its requests (each has generated that many
    # tokens more than it shows); may apply the run's first iteration first, which changes `version`
    def lag(self) -> int: ...
    # the latest time (ns) up to which `lag()` keeps the value it last returned and has no effect, while `version`
    # holds (a price read through the lag may be reused until then); and the clock it is read against
    def lag_until(self) -> int: ...
    def clock_ns(self) -> int: ...
    # KV blocks preempting r alone gives back: its blocks less those of cached prefixes other requests share
    # (prefix caching; all of them otherwise). Per victim: two victims sharing an entry free it once more than
    # the sum says (a planner that adds them up preempts a little more than it must, never too little)
    def freed_by(self, r: Request) -> int: ...


@dataclass(slots=True)
class Decision:
    """One iteration: who runs, in which mode, and what changes in memory first.

    `merged` is the adapter merged into the weights for this iteration (then every request in the
    batch must use it), or None for unmerged. `stable` promises that, until the replica's queue
    membership changes or a batch request finishes, the policy would return this same decision
    again; executors may then repeat it without asking (the simulator fast-forwards), at most
    `max_repeats` times in all when that is set (a policy that learns every N iterations).
    """

    batch: list[Request]
    merged: int | None = None
    load: tuple[int, ...] = ()
    evict: tuple[int, ...] = ()
    swap_out: tuple[Request, ...] = ()
    recompute: tuple[Request, ...] = ()
    stable: bool = False
    max_repeats: int | None = None
    forced: bool = False
    info: Mapping[str, float] | None = None   # extra columns for iterations.csv
    # adapters to start fetching from the backing store into host memory, most urgent first (adapter_prefetch)
    prefetch: tuple[int, ...] = ()


class LocalScheduler(ABC):
    """Per-replica batching policy; one instance per replica. `merges` declares that it may merge an
    adapter into the base weights (then a pristine_gpu merge strategy reserves its copy).

    `continues` promises more than `stable`: a stable decision that takes the whole queue, in queue order,
    and loads nothing is also this policy's decision right after the batch's prefills complete, as long as
    the queue's membership is unchanged and every request's next decode fits the free KV blocks. The
    simulator then runs that iteration and its repeats without asking (one call per arrival saved)."""

    merges: bool = False
    continues: bool = False

    @abstractmethod
    def schedule(self, view: ReplicaView) -> Decision: ...


class ClusterView(Protocol):
    """What routers and migrators may read about the cluster."""

    replicas: Sequence[ReplicaView]
    adapters: Sequence["AdapterSpec"]
    cost: "CostModel"
    hosts: Mapping[int, tuple[int, ...]]     # adapter -> replicas allowed to serve it (all, if absent)
    demand: Sequence[float]                  # share of requests per adapter, learnt from arrivals so far
    workload_demand: Sequence[float]         # the whole workload's mix: look-ahead, only for demand=oracle

    @property
    def now(self) -> float: ...


@dataclass
class Placement:
    """Initial adapter placement: who may serve each adapter, and what each replica preloads."""

    hosts: dict[int, tuple[int, ...]] = field(default_factory=dict)    # absent adapter = any replica
    preload: dict[int, list[int]] = field(default_factory=dict)       # replica -> adapters loaded at t=0


class Router(ABC):
    """Global scheduler: placement at start, then one replica per arriving request.

    `reads_progress` = False declares that dispatch reads request progress (tokens generated, KV blocks
    held) only through the views' `lag` or not at all, so an executor need not apply fast-forwarded
    iterations before it."""

    reads_progress: bool = True

    def place(self, cluster: ClusterView) -> Placement:
        return Placement()

    def stats(self) -> dict:
        """Counters for summary.json (e.g. how often the policy adapted its placement)."""
        return {}

    def adapter_added(self, adapter: int, cluster: ClusterView) -> Sequence[int] | None:
        """An adapter loaded while serving (a server's; no workload's run calls it): its hosts, or None
        for any replica (as for an adapter no placement names, until a migration round places it). A
        router that keeps state per adapter grows it here."""
        return None

    @abstractmethod
    def dispatch(self, request: Request, cluster: ClusterView) -> int: ...

    @staticmethod
    def candidates(request: Request, cluster: ClusterView) -> Sequence[int]:
        hosts = cluster.hosts.get(request.adapter)
        return hosts if hosts is not None else range(len(cluster.replicas))


@dataclass(frozen=True)
class RequestMove:
    request: Request
    dst: int
    mode: Literal["transfer", "recompute"] = "transfer"


@dataclass
class MigrationPlan:
    moves: list[RequestMove] = field(default_factory=list)
    adapter_hosts: dict[int, tuple[int, ...]] | None = None   # new hosts mapping, if placement changed
    solve_s: float = 0.0                                       # scheduler time spent deciding
    info: dict = field(default_factory=dict)


class Migrator(ABC):
    """Periodic global rebalancing (dLoRA's co-migration)."""

    interval_s: float = 10.0

    @abstractmethod
    def plan(self, cluster: ClusterView) -> MigrationPlan: ...
