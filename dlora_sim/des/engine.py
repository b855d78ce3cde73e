"""Simulated time for a cluster: arrivals, replica processes and (optionally) periodic migration in SimPy.

Everything but time lives in the serving core (`dlora_sim.core.cluster.Cluster`): this module only
decides *when*. Arrivals and migration ticks are scheduled URGENT, so at any instant global decisions
happen before replica iterations that end at that same instant: ties resolve the same way every run,
and the same way with or without fast-forwarding.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import simpy
from omegaconf import DictConfig
from simpy.events import URGENT

from dlora_sim.core.cluster import Cluster, SimulationError
from dlora_sim.core.config import auto_flag, build_parts, keep_iterations, show_progress
from dlora_sim.core.contracts import LocalScheduler, MigrationPlan, Migrator, Router
from dlora_sim.core.profile import Profile
from dlora_sim.core.replica_config import ClusterConfig
from dlora_sim.core.request import Request, to_ns
from dlora_sim.core.results import RequestStream, SimResult
from dlora_sim.core.workload import Workload
from dlora_sim.des.replica import Replica

__all__ = ["Simulation", "SimulationError", "build_simulation"]


class Simulation:
    """Replays a workload on a cluster; `run()` returns every request's timestamps and the iteration log."""

    def __init__(self, workload: Workload, profile: Profile, cluster: ClusterConfig,
                 scheduler_factory: Callable[[], LocalScheduler], router: Router,
                 migrator: Migrator | None = None, *, progress: bool = False, keep_iterations: bool = True,
                 stream: RequestStream | None = None):
        """`stream`: write each request's row as it finishes and keep only the requests in flight."""
        self.env = simpy.Environment()
        self.cluster = Cluster(workload, profile, cluster, scheduler_factory, router, migrator, lambda: self.env.now,
                               keep_iterations=keep_iterations, stream=stream)
        self.processes = [Replica(state, sched, self.env)
                          for state, sched in zip(self.cluster.replicas, self.cluster.schedulers)]
        self.cluster.sync = self.sync
        self._all_done = self.env.event()
        self.cluster.on_all_done = self._all_done.succeed
        self._progress = progress

    @property
    def stream(self) -> RequestStream | None:
        return self.cluster.stream

    def sync(self) -> None:
        now = self.env.now
        for proc in self.processes:
            proc.sync(now)

    # --- processes -----------------------------------------------------------------------------------
    def _urgent_timeout(self, delay: int) -> simpy.Event:
        ev = simpy.Event(self.env)
        ev._ok, ev._value = True, None   # what simpy.Timeout does, at URGENT priority
        self.env.schedule(ev, URGENT, delay)
        return ev

    def _arrivals(self):
        env, cluster = self.env, self.cluster
        for r in cluster.incoming():
            if r.arrival > env.now:
                yield self._urgent_timeout(r.arrival - env.now)
            cluster.dispatch(r, env.now)

    def _migration(self):
        """Every interval: observe, plan, wait while the scheduler 'computes' (plan.solve_s), apply.

        Dispatch is a separate process, so arrivals keep being routed while the plan is computed;
        moves are re-validated when they take effect because the cluster moved on meanwhile."""
        migrator = self.cluster.migrator
        assert migrator is not None
        interval = to_ns(migrator.interval_s)
        if interval <= 0:
            raise ValueError(f"migration interval_s must be > 0, got {migrator.interval_s}")
        while True:
            yield self._urgent_timeout(interval)
            plan = self.cluster.plan_migration()
            if not plan.moves and plan.adapter_hosts is None:
                continue
            delay = to_ns(max(plan.solve_s, 0.0))
            if delay:
                yield self._urgent_timeout(delay)
                self.sync()
            self.apply_migration(plan)

    def apply_migration(self, plan: MigrationPlan) -> dict[str, int]:
        """Apply a migration plan now (`Cluster.apply_migration`); KV transfers land after their time."""
        return self.cluster.apply_migration(plan, self._deliver)

    def _deliver(self, r: Request, src: int, dst: int, delay_ns: int) -> None:
        self.env.process(self._transfer(r, dst, delay_ns))

    def _transfer(self, r: Request, dst: int, delay_ns: int):
        if delay_ns > 0:
            yield self._urgent_timeout(delay_ns)
        self.cluster.arrive(r, dst)

    # --- run -----------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        cluster = self.cluster
        cluster.place()
        for proc in self.processes:
            proc.start()
        self.env.process(self._arrivals())
        if cluster.migrator is not None:
            self.env.process(self._migration())
        with cluster.progress(self._progress, f"simulating {len(self.processes)} replica(s)") as bar:
            cluster.bar = bar
            if cluster.total:
                try:
                    self.env.run(until=self._all_done)
                except RuntimeError as e:
                    if "No scheduled events left" not in str(e):
                        raise   # otherwise: stalled; reported by `result` with the stuck requests
            cluster.bar = None
        return cluster.result(self.env.now, wall0)


def run_job(cfg: DictConfig, out: Path, system: str, overrides: list[str], charts: bool = True) -> dict:
    """Simulate a composed config into the results folder `out` (charts too, if `charts` and the config's
    `charts` key say so); its summary. What `dlora-sim` and `dlora_sim.simulate` run."""
    from dlora_sim import compiled
    from dlora_sim.run_charts import draw_run_charts
    from dlora_sim.core.jobs import finish_job

    sim = build_simulation(cfg, out=out)
    # what sim_wall_s was measured on (the results are the same either way)
    about = {"sim_build": compiled.build_kind()}
    try:
        return finish_job(cfg, out, system, overrides, sim.run, about=about,
                          charts=draw_run_charts if charts else None)
    finally:
        if sim.stream is not None:
            sim.stream.abort()   # a no-op once the stream was closed into requests.csv


def build_simulation(cfg: DictConfig, workload: Workload | None = None, out: Path | None = None) -> Simulation:
    """The simulation of a composed config. With `out`, large runs (`stream_requests`) write
    requests.csv there while they run."""
    p = build_parts(cfg, workload)
    n = len(p.workload.requests)
    stream = RequestStream(out, n) if out is not None and auto_flag(cfg, "stream_requests", n, large=True) else None
    return Simulation(p.workload, p.profile, p.cluster, p.scheduler_factory, p.router, p.migrator,
                      progress=show_progress(cfg), keep_iterations=keep_iterations(cfg, n), stream=stream)
