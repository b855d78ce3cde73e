"""Mechanics of applying a migration plan (the cluster's side; the decisions come from a Migrator).

Invariant: every unfinished request is in exactly one place, one replica's queue or `in_transit`.
A move takes the request out of its source queue (freeing its GPU or host KV blocks), and delivers
it to the destination after the KV transfer time (tokens x kv_bytes_per_token / inter-replica bandwidth,
from the cost model; transfers over one (src, dst) link in one plan go one after another). It arrives
RESIDENT if the destination has free blocks then, else in host swap, else it is recomputed. In
recompute mode (or when the request has no KV yet) it arrives at once, QUEUED, and the destination's
prefill of prompt + generated tokens pays the cost. Adapter moves update the hosts mapping only: the
destination's local scheduler loads an adapter when a request needs it (paying the profile's load time
through its Decision), so GPU slots are never exceeded and no load is paid for an adapter nobody uses.
Stale moves (the request finished, is in the batch in flight, or already moved) are skipped.
The executor delivers a request whose KV travels (`Deliver`): the simulator after a SimPy timeout,
the runtime once its clock has passed the transfer's end (or, on the real clock, once the KV has
landed). A transfer that fails on the way (a worker died, the object was lost) arrives without its KV
and is recomputed there, with the reason recorded: a request is never lost.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from dlora_sim.core.contracts import MigrationPlan, PolicyError
from dlora_sim.core.replica_config import hosting_capacity
from dlora_sim.core.request import UNSET, Request, State, to_ns

if TYPE_CHECKING:
    from dlora_sim.core.cluster import Cluster

# the executor's delivery of a request whose KV travels: (request, source, destination, delay in ns)
Deliver = Callable[[Request, int, int, int], None]

MODES = ("transfer", "recompute")


@dataclass
class MigrationStats:
    """Per-round record of the migrator: solver wall time, charged time, what was planned and applied."""

    rounds: int = 0
    wall_total_s: float = 0.0
    charged_total_s: float = 0.0
    wall_max_s: float = 0.0
    log: list[dict] = field(default_factory=list)
    applied: Counter = field(default_factory=Counter)
    kv_bytes: int = 0            # KV bytes sent between replicas
    kv_transfer_s: float = 0.0   # their transfer time as the cost model prices it (the runtime adds its own)
    failures: list[dict] = field(default_factory=list)   # transfers that fell back to recompute, and why

    def record(self, now_s: float, wall_s: float, plan: MigrationPlan, charged: bool = True) -> None:
        """`charged`: the executor waits `plan.solve_s` before applying the plan (the runtime's real
        clock applies it once solved, the solve's own wall time having passed)."""
        charge = plan.solve_s if charged else 0.0
        self.rounds += 1
        self.wall_total_s += wall_s
        self.wall_max_s = max(self.wall_max_s, wall_s)
        self.charged_total_s += charge
        if plan.info.get("solved"):
            self.log.append({"t_s": round(now_s, 6), "solve_wall_s": round(wall_s, 6),
                             "charged_s": round(charge, 6), "moves": len(plan.moves),
                             **{k: v for k, v in plan.info.items() if k != "solved"}})

    def summary(self, sim_s: float) -> dict:
        solved = [e["solve_wall_s"] for e in self.log]
        return {"migration_rounds": self.rounds, "migration_rounds_solved": len(self.log),
                "solver_time_total_s": round(self.wall_total_s, 6),
                "solver_time_charged_s": round(self.charged_total_s, 6),
                "solver_time_frac": round(self.wall_total_s / sim_s, 6) if sim_s > 0 else 0.0,
                "solver_time_max_s": round(self.wall_max_s, 6),
                "solver_time_mean_per_solved_round_s": round(sum(solved) / len(solved), 6) if solved else 0.0,
                "migration_applied": dict(sorted(self.applied.items())),
                "migration_kv_bytes": self.kv_bytes, "migration_kv_transfer_s": round(self.kv_transfer_s, 6),
                "migration_transfer_failures": self.failures, "migration_log": self.log}


def apply_plan(cluster: "Cluster", plan: MigrationPlan, deliver: Deliver) -> dict[str, int]:
    """Validate and apply `plan` at the current instant. Policy bugs raise PolicyError."""
    reps = cluster.replicas
    nrep = len(reps)
    counts: Counter = Counter()
    if plan.adapter_hosts is not None:
        hosts = dict(cluster.hosts)
        for a, hs in plan.adapter_hosts.items():
            if not 0 <= a < len(cluster.adapters):
                raise PolicyError(f"migration plan names unknown adapter {a}")
            hs = tuple(sorted(set(hs)))
            if not hs or any(not 0 <= j < nrep for j in hs):
                raise PolicyError(f"migration plan gives adapter {a} hosts {hs}; valid replicas 0..{nrep - 1}")
            counts["adapter_placements_added"] += len(set(hs) - set(hosts.get(a, range(nrep))))
            hosts[a] = hs
        per = Counter(j for hs in hosts.values() for j in hs)
        for j, c in per.items():
            cap = hosting_capacity(reps[j].adapter_slots, len(cluster.adapters), nrep)
            if c > cap:
                raise PolicyError(f"migration plan hosts {c} adapters on replica {j}, which may host {cap}")
        cluster.hosts = hosts
    seen: set[int] = set()
    link_free: dict[tuple[int, int], int] = {}
    now = cluster.clock()
    for mv in plan.moves:
        r = mv.request
        if id(r) in seen:
            raise PolicyError(f"migration plan moves request {r.id} twice")
        seen.add(id(r))
        if mv.mode not in MODES:
            raise PolicyError(f"migration mode {mv.mode!r}; valid: {MODES}")
        if not 0 <= mv.dst < nrep:
            raise PolicyError(f"migration plan sends request {r.id} to replica {mv.dst}; valid 0..{nrep - 1}")
        hs = cluster.hosts.get(r.adapter)
        if hs is not None and mv.dst not in hs:
            raise PolicyError(f"migration plan sends request {r.id} (adapter {r.adapter}) to replica {mv.dst}, "
                              f"not a host {hs}")
        if r.done or r.id in cluster.in_transit or r.replica == mv.dst or r.replica == UNSET:
            counts["skipped_stale"] += 1
            continue
        src = reps[r.replica]
        if any(x is r for x in src.in_flight):
            counts["skipped_in_flight"] += 1
            continue
        had_kv = r.state in (State.RESIDENT, State.SWAPPED)
        with_kv = had_kv and mv.mode == "transfer"
        tokens = r.context_len
        src.remove(r)          # frees its KV blocks there and wakes the source's scheduler
        if had_kv and not with_kv:
            r.state = State.QUEUED   # recompute: re-prefill prompt + generated tokens at the destination
            counts["recompute"] += 1
        r.migrations += 1
        cluster.recorder.count("migrations", 1)
        counts["moved"] += 1
        if not with_kv:
            cluster.left_without_kv(r, src.id)
            reps[mv.dst].receive(r, with_kv=False)
            continue
        counts["transfer"] += 1
        key = (src.id, mv.dst)
        start = max(now, link_free.get(key, now))
        seconds = cluster.cost.kv_transfer_time(tokens)
        end = start + to_ns(seconds)
        link_free[key] = end
        cluster.migration_stats.kv_bytes += cluster.cost.kv_bytes(tokens)
        cluster.migration_stats.kv_transfer_s += seconds
        r.replica = UNSET
        cluster.in_transit[r.id] = r
        deliver(r, src.id, mv.dst, end - now)
    cluster.migration_stats.applied.update(counts)
    return dict(counts)


def arrive(cluster: "Cluster", r: Request, dst: int, failure: str | None = None) -> State:
    """A request in transit reaches `dst` with its KV (see `ReplicaState.receive` for where it lands),
    or without it when its transfer failed (`failure` says why): then it is recomputed there."""
    del cluster.in_transit[r.id]
    stats = cluster.migration_stats
    if failure is not None:
        stats.failures.append({"t_s": round(cluster.now, 6), "request": r.id, "dst": dst, "why": failure})
        stats.applied["transfer_failed"] += 1
    state = cluster.replicas[dst].receive(r, with_kv=failure is None)
    stats.applied[f"arrived_{state.name.lower()}"] += 1
    return state
