"""The cluster front end every executor drives: requests, demand, hosts, dispatch, migration, the end.

One place for the bookkeeping around the replicas, whatever moves time: it makes the requests of a
workload (all at once, or one by one when requests.csv is streamed), rejects those no replica can
ever serve, asks the router for a replica and checks its answer against the adapter's hosts,
applies the router's placement, validates and applies migration plans (handing each KV transfer to
the executor, which delivers it when its time has come), counts finished requests and reports a
stalled cluster. The `Cluster` is the `ClusterView` routers and migrators read. It knows no clock
of its own: the executor passes its clock in (simulated or real nanoseconds) and says when.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterator

from tqdm import tqdm

from dlora_sim.core.contracts import LocalScheduler, MigrationPlan, Migrator, PolicyError, Router
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.migration import Deliver, MigrationStats, apply_plan, arrive
from dlora_sim.core.profile import Profile
from dlora_sim.core.replica_config import ClusterConfig, reject_reason, resolve_chunked_prefill
from dlora_sim.core.replica_state import ReplicaState
from dlora_sim.core.request import NS, Request, State, to_ns
from dlora_sim.core.results import Recorder, RequestStream, SimResult
from dlora_sim.core.workload import AdapterSpec, RequestSpec, Workload


class SimulationError(RuntimeError):
    """The run could not finish every request (a policy stalled the cluster)."""


def workload_demand(workload: Workload) -> tuple[float, ...]:
    """Each adapter's share of the *whole* workload's requests: look-ahead, for `demand: oracle` only."""
    counts = [0] * len(workload.adapters)
    for spec in workload.requests:
        counts[spec.adapter] += 1
    total = max(sum(counts), 1)
    return tuple(c / total for c in counts)


class DemandEstimate:
    """Adapter popularity learnt from arrivals so far, from a uniform prior (one pseudo-arrival each), as
    the dLoRA artifact learns it: what a router may know at any instant without seeing the future."""

    def __init__(self, num_adapters: int, prior: float = 1.0):
        self.counts = [0] * num_adapters
        self.prior = prior

    def observe(self, adapter: int) -> None:
        self.counts[adapter] += 1

    def share(self) -> tuple[float, ...]:
        total = sum(self.counts) + self.prior * len(self.counts)
        return tuple((c + self.prior) / total for c in self.counts)


def _nothing() -> None:
    pass


def _left(r: Request, src: int) -> None:
    pass


class Cluster:
    """Replica states, their local policies, and the global policies' front end (a `ClusterView`).

    `clock()` is the executor's time in ns. `sync` is the executor's hook that brings every replica up
    to now before a global policy reads them (the simulator's fast-forward; a no-op elsewhere)."""

    def __init__(self, workload: Workload, profile: Profile, config: ClusterConfig,
                 scheduler_factory: Callable[[], LocalScheduler], router: Router, migrator: Migrator | None,
                 clock: Callable[[], int], *, keep_iterations: bool = True, stream: RequestStream | None = None):
        """`stream`: write each request's row as it finishes and keep only the requests in flight
        (a million-request run then holds a few thousand `Request`s, not a million)."""
        config = replace(config, replica=resolve_chunked_prefill(config.replica, workload.longest_prompt))
        self.workload, self.profile, self.config = workload, profile, config
        self.clock = clock
        self.cost = CostModel(profile, config.gpus_per_replica, config.replica.merge)
        self.adapters: list[AdapterSpec] = list(workload.adapters)   # grows when a server loads one
        self.recorder = Recorder(keep_iterations=keep_iterations)
        self.router, self.migrator, self.stream = router, migrator, stream
        self._prefixes = workload.prefixes   # the prompts' text as routers see it; replicas cache it only if asked
        self.requests: list[Request] | None = None if stream is not None else [
            self._request(i, s) for i, s in enumerate(workload.requests)]
        self._live: dict[int, Request] = {}   # streaming: created, not yet done
        ranks = [a.rank for a in workload.adapters]
        self.schedulers: list[LocalScheduler] = [scheduler_factory() for _ in range(config.num_replicas)]
        self.replicas: list[ReplicaState] = [
            ReplicaState(j, config.replica, self.cost, ranks, self.recorder, self._done, clock, merges=s.merges,
                         prefix_block_tokens=workload.prefix_block_tokens)
            for j, s in enumerate(self.schedulers)]
        self.hosts: dict[int, tuple[int, ...]] = {}
        self.total = len(workload.requests)
        self.remaining = self.total
        self.sync: Callable[[], None] = _nothing
        self.on_all_done: Callable[[], None] = _nothing
        # a migrating request left replica `src` without its KV (recompute): the executor frees its copy
        self.left_without_kv: Callable[[Request, int], None] = _left
        self.bar: tqdm | None = None
        span = workload.duration_s
        self.extra: dict = {"chunked_prefill": config.replica.chunked_prefill,
                            "offered_rps": round(len(workload.requests) / span, 6) if span > 0 else None}
        self.arrivals = DemandEstimate(len(workload.adapters))
        self.workload_demand = list(workload_demand(workload))    # look-ahead, for demand=oracle only
        self.in_transit: dict[int, Request] = {}   # migrating requests, in no replica's queue
        self.migration_stats = MigrationStats()
        self.kv_cap = min(rep.total_blocks for rep in self.replicas)   # the smallest replica's KV blocks

    # --- ClusterView ---------------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.clock() / NS

    @property
    def demand(self) -> tuple[float, ...]:
        return self.arrivals.share()

    # --- requests ------------------------------------------------------------------------------------
    def incoming(self) -> Iterator[Request]:
        """The workload's requests in arrival order (made as they are reached when streaming)."""
        if self.requests is not None:
            yield from self.requests
            return
        live = self._live
        for i, s in enumerate(self.workload.requests):
            r = self._request(i, s)
            live[i] = r
            yield r

    def _request(self, i: int, s: RequestSpec) -> Request:
        r = Request(i, s.adapter, to_ns(s.arrival_s), s.prompt_tokens, s.output_tokens)
        if self._prefixes is not None:
            r.prefix = self._prefixes[i]
        return r

    def place(self) -> dict[int, list[int]]:
        """The router's initial placement: hosts, and each replica's preloaded adapters (returned, so an
        executor loads them too)."""
        placement = self.router.place(self)
        self.hosts = {a: tuple(h) for a, h in placement.hosts.items()}
        if not self.config.preload:   # a cold start: adapters load on demand
            return {}
        for j, adapters in placement.preload.items():
            self.replicas[j].preload(adapters)
        return placement.preload

    def dispatch(self, r: Request, at: int) -> int | None:
        """Route an arrival at `at` ns: rejected (with its reason) if no replica can ever serve it, else
        enqueued on the router's replica, which is returned."""
        if self.router.reads_progress:
            self.sync()
        self.arrivals.observe(r.adapter)
        reason = reject_reason(r, self.config.replica, self.kv_cap)
        if reason:
            r.state, r.reject_reason = State.REJECTED, reason
            self._done(r)
            return None
        j = self.router.dispatch(r, self)
        if not 0 <= j < len(self.replicas):
            raise PolicyError(f"router returned replica {j}; valid 0..{len(self.replicas) - 1}")
        hosts = self.hosts.get(r.adapter)
        if hosts is not None and j not in hosts:
            raise PolicyError(f"router sent request {r.id} (adapter {r.adapter}) to replica {j}, not a host {hosts}")
        r.dispatch = at
        self.replicas[j].enqueue(r)
        return j

    # --- a live server: requests and adapters that no workload named in advance ----------------------
    def admit(self, r: Request) -> None:
        """Count a request made while serving (ids beyond the workload's, in arrival order); the executor
        then dispatches it like any arrival."""
        if self.requests is None:   # streamed: its row is written when it ends
            self._live[r.id] = r
            self.stream.total += 1
        else:
            self.requests.append(r)
        self.total += 1
        self.remaining += 1
        if self.bar is not None:
            self.bar.total = self.total

    def add_adapter(self, rank: int, name: str) -> int:
        """A new adapter's id (never one used before), with no demand yet, hosted where the router says."""
        aid = len(self.adapters)
        self.adapters.append(AdapterSpec(aid, rank, name))
        for rep in self.replicas:
            rep.add_adapter(rank)
        self.arrivals.counts.append(0)
        self.workload_demand.append(0.0)
        hosts = self.router.adapter_added(aid, self)
        if hosts is not None:
            self.hosts[aid] = tuple(hosts)
        return aid

    def cancel(self, r: Request, reason: str) -> bool:
        """End a request its client gave up on, freeing its KV: now if it waits in a queue (True), not
        while it is in a running batch or in transit (False: ask again once it is back in a queue).
        It is recorded as rejected with `reason`."""
        if r.done:
            return True
        if r.id in self.in_transit or r.replica < 0:
            return False
        state = self.replicas[r.replica]
        if any(x is r for x in state.running):
            return False
        state.remove(r)
        r.state, r.reject_reason = State.REJECTED, reason
        self._done(r)
        return True

    def _done(self, r: Request) -> None:
        self.remaining -= 1
        if self.stream is not None:
            del self._live[r.id]
            self.stream.done(r)
        if self.bar is not None:
            self.bar.update(1)
        if self.remaining == 0:
            self.on_all_done()

    # --- migration -----------------------------------------------------------------------------------
    def plan_migration(self, charged: bool = True) -> MigrationPlan:
        """Ask the migrator for a plan now (the replicas synced first), recording its wall time and, if
        the executor waits it out before applying the plan (`charged`), its `solve_s`."""
        assert self.migrator is not None
        self.sync()
        t0 = time.perf_counter()
        plan = self.migrator.plan(self)
        self.migration_stats.record(self.now, time.perf_counter() - t0, plan, charged)
        return plan

    def apply_migration(self, plan: MigrationPlan, deliver: Deliver) -> dict[str, int]:
        """Validate and apply `plan` now; requests whose KV travels go to `deliver(request, src, dst, ns)`,
        which must call `arrive` once that many ns have passed. Returns counts of what happened."""
        return apply_plan(self, plan, deliver)

    def arrive(self, r: Request, dst: int, failure: str | None = None) -> State:
        """A request in transit reaches replica `dst` with its KV (or without, after a failed transfer:
        `failure` says why); where it landed (RESIDENT, SWAPPED or QUEUED to be recomputed)."""
        self.sync()
        return arrive(self, r, dst, failure)

    # --- the end -------------------------------------------------------------------------------------
    def progress(self, enabled: bool, desc: str) -> tqdm:
        """The run's progress bar (requests done), shown only when `enabled`."""
        return tqdm(total=self.total, disable=not enabled, unit="req", mininterval=0.5, desc=desc, leave=False)

    def result(self, end_ns: int, wall0: float, extra: dict | None = None) -> SimResult:
        """Every request finished or rejected (else SimulationError naming a stuck one): the run's result,
        with the router's and migrator's counters and the executor's `extra` in summary.json."""
        self.sync()
        self.extra.update(self.router.stats())
        if self.migrator is not None:
            self.extra.update(self.migration_stats.summary(end_ns / NS))
        self.extra.update(extra or {})
        stuck = [r for r in self.requests if not r.done] if self.requests is not None else \
            sorted(self._live.values(), key=lambda r: r.id)
        if self.remaining and not stuck:   # streamed: not even created (arrivals never reached them)
            raise SimulationError(f"{self.remaining} request(s) never arrived; the run stopped early")
        if stuck:
            raise SimulationError(f"{len(stuck)} request(s) never finished, e.g. request {stuck[0].id} on replica "
                                  f"{stuck[0].replica} ({stuck[0].state.name}); the local policy stalled")
        return SimResult(self.requests, self.recorder, end_ns / NS, time.perf_counter() - wall0,
                         len(self.replicas), self.extra, streamed=self.stream)

    @property
    def debug_checks(self) -> bool:
        return self.replicas[0].debug

    @debug_checks.setter
    def debug_checks(self, on: bool) -> None:
        for rep in self.replicas:
            rep.debug = on
