"""The cluster: arrivals, dispatch, replicas and (optionally) periodic migration, as SimPy processes.

Arrivals and migration ticks are scheduled URGENT, so at any instant global decisions happen before
replica iterations that end at that same instant: ties resolve the same way every run, and the same
way with or without fast-forwarding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import simpy
from simpy.events import URGENT
from tqdm import tqdm

from dlora_sim.cost_model import CostModel
from dlora_sim.metrics import Recorder, RequestStream, SimResult
from dlora_sim.migration_apply import MigrationStats, apply_plan
from dlora_sim.policies.base import LocalScheduler, MigrationPlan, Migrator, PolicyError, Router
from dlora_sim.profile import Profile
from dlora_sim.replica import Replica
from dlora_sim.replica_state import ReplicaConfig, reject_reason, resolve_chunked_prefill
from dlora_sim.request import NS, Request, State, to_ns
from dlora_sim.workload.spec import Workload


class SimulationError(RuntimeError):
    """The simulation could not finish every request (a policy stalled the cluster)."""


@dataclass(frozen=True)
class ClusterConfig:
    num_replicas: int = 1
    gpus_per_replica: int = 1
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.gpus_per_replica < 1:
            raise ValueError("cluster.num_replicas and cluster.gpus_per_replica must be >= 1")


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


class Simulation:
    """Replays a workload on a cluster; `run()` returns every request's timestamps and the iteration log."""

    def __init__(self, workload: Workload, profile: Profile, cluster: ClusterConfig,
                 scheduler_factory: Callable[[], LocalScheduler], router: Router,
                 migrator: Migrator | None = None, *, progress: bool = False, keep_iterations: bool = True,
                 stream: RequestStream | None = None):
        """`stream`: write each request's row as it finishes and keep only the requests in flight
        (a million-request run then holds a few thousand `Request`s, not a million)."""
        cluster = replace(cluster, replica=resolve_chunked_prefill(cluster.replica, workload.longest_prompt))
        self.workload, self.profile, self.cluster_cfg = workload, profile, cluster
        self.env = simpy.Environment()
        self.cost = CostModel(profile, cluster.gpus_per_replica, cluster.replica.merge)
        self.adapters = workload.adapters
        self.recorder = Recorder(keep_iterations=keep_iterations)
        self.router, self.migrator = router, migrator
        self.stream = stream
        self.requests: list[Request] | None = None if stream is not None else [
            Request(i, s.adapter, to_ns(s.arrival_s), s.prompt_tokens, s.output_tokens)
            for i, s in enumerate(workload.requests)]
        self._live: dict[int, Request] = {}   # streaming: created, not yet done
        ranks = [a.rank for a in workload.adapters]
        self.replicas: list[Replica] = [
            Replica(j, self.env, cluster.replica, self.cost, scheduler_factory(), ranks, self.recorder, self._done)
            for j in range(cluster.num_replicas)]
        self.hosts: dict[int, tuple[int, ...]] = {}
        self._total = len(workload.requests)
        self._remaining = self._total
        self._all_done = self.env.event()
        self._progress = progress
        self._bar: tqdm | None = None
        span = workload.duration_s
        self.extra: dict = {"chunked_prefill": cluster.replica.chunked_prefill,
                            "offered_rps": round(len(workload.requests) / span, 6) if span > 0 else None}
        self.arrivals = DemandEstimate(len(workload.adapters))
        self.workload_demand = workload_demand(workload)    # ClusterView: look-ahead, for demand=oracle only
        self.in_transit: dict[int, Request] = {}   # migrating requests, in no replica's queue
        self._mig_stats = MigrationStats()
        self._kv_cap = min(rep.total_blocks for rep in self.replicas)   # the smallest replica's KV blocks

    @property
    def debug_checks(self) -> bool:
        return self.replicas[0].debug

    @debug_checks.setter
    def debug_checks(self, on: bool) -> None:
        for rep in self.replicas:
            rep.debug = on

    # --- ClusterView ---------------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.env.now / NS

    @property
    def demand(self) -> tuple[float, ...]:
        return self.arrivals.share()

    def sync(self) -> None:
        now = self.env.now
        for rep in self.replicas:
            rep.sync(now)

    # --- processes -----------------------------------------------------------------------------------
    def _urgent_timeout(self, delay: int) -> simpy.Event:
        ev = simpy.Event(self.env)
        ev._ok, ev._value = True, None   # what simpy.Timeout does, at URGENT priority
        self.env.schedule(ev, URGENT, delay)
        return ev

    def _incoming(self) -> Iterator[Request]:
        if self.requests is not None:
            yield from self.requests
            return
        live = self._live
        for i, s in enumerate(self.workload.requests):
            r = Request(i, s.adapter, to_ns(s.arrival_s), s.prompt_tokens, s.output_tokens)
            live[i] = r
            yield r

    def _arrivals(self):
        env = self.env
        for r in self._incoming():
            if r.arrival > env.now:
                yield self._urgent_timeout(r.arrival - env.now)
            if self.router.reads_progress:
                self.sync()
            self._dispatch(r)

    def _dispatch(self, r: Request) -> None:
        self.arrivals.observe(r.adapter)
        reason = reject_reason(r, self.cluster_cfg.replica, self._kv_cap)
        if reason:
            r.state, r.reject_reason = State.REJECTED, reason
            self._done(r)
            return
        j = self.router.dispatch(r, self)
        if not 0 <= j < len(self.replicas):
            raise PolicyError(f"router returned replica {j}; valid 0..{len(self.replicas) - 1}")
        hosts = self.hosts.get(r.adapter)
        if hosts is not None and j not in hosts:
            raise PolicyError(f"router sent request {r.id} (adapter {r.adapter}) to replica {j}, not a host {hosts}")
        r.dispatch = self.env.now
        self.replicas[j].enqueue(r)

    def _migration(self):
        """Every interval: observe, plan, wait while the scheduler 'computes' (plan.solve_s), apply.

        Dispatch is a separate process, so arrivals keep being routed while the plan is computed;
        moves are re-validated when they take effect because the cluster moved on meanwhile."""
        assert self.migrator is not None
        interval = to_ns(self.migrator.interval_s)
        if interval <= 0:
            raise ValueError(f"migration interval_s must be > 0, got {self.migrator.interval_s}")
        while True:
            yield self._urgent_timeout(interval)
            self.sync()
            t0 = time.perf_counter()
            plan = self.migrator.plan(self)
            wall = time.perf_counter() - t0
            self._mig_stats.record(self.now, wall, plan)
            if not plan.moves and plan.adapter_hosts is None:
                continue
            delay = to_ns(max(plan.solve_s, 0.0))
            if delay:
                yield self._urgent_timeout(delay)
                self.sync()
            self.apply_migration(plan)

    def apply_migration(self, plan: MigrationPlan) -> dict[str, int]:
        """Apply a migration plan now; see `dlora_sim.migration_apply`. Returns counts of what happened."""
        return apply_plan(self, plan)

    def _done(self, r: Request) -> None:
        self._remaining -= 1
        if self.stream is not None:
            del self._live[r.id]
            self.stream.done(r)
        if self._bar is not None:
            self._bar.update(1)
        if self._remaining == 0:
            self._all_done.succeed()

    # --- run -----------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        placement = self.router.place(self)
        self.hosts = {a: tuple(h) for a, h in placement.hosts.items()}
        for j, adapters in placement.preload.items():
            self.replicas[j].preload(adapters)
        for rep in self.replicas:
            rep.start()
        self.env.process(self._arrivals())
        if self.migrator is not None:
            self.env.process(self._migration())
        with tqdm(total=self._total, disable=not self._progress, unit="req", mininterval=0.5,
                  desc=f"simulating {len(self.replicas)} replica(s)", leave=False) as bar:
            self._bar = bar
            if self._total:
                try:
                    self.env.run(until=self._all_done)
                except RuntimeError as e:
                    if "No scheduled events left" not in str(e):
                        raise   # otherwise: stalled; reported below with the stuck requests
            self._bar = None
        self.sync()
        self.extra.update(self.router.stats())
        if self.migrator is not None:
            self.extra.update(self._mig_stats.summary(self.env.now / NS))
        stuck = [r for r in self.requests if not r.done] if self.requests is not None else \
            sorted(self._live.values(), key=lambda r: r.id)
        if self._remaining and not stuck:   # streamed: not even created (arrivals never reached them)
            raise SimulationError(f"{self._remaining} request(s) never arrived; the simulation stopped early")
        if stuck:
            raise SimulationError(f"{len(stuck)} request(s) never finished, e.g. request {stuck[0].id} on replica "
                                  f"{stuck[0].replica} ({stuck[0].state.name}); the local policy stalled")
        return SimResult(self.requests, self.recorder, self.env.now / NS, time.perf_counter() - wall0,
                         len(self.replicas), self.extra, streamed=self.stream)
