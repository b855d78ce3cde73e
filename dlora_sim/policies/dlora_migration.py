"""dLoRA's periodic request–adapter co-migration (docs/algorithm.md) as a Migrator.

Every `interval_s`: trigger when the replica with the most demanded KV blocks is above `kv_trigger` of
its blocks while the least is below, or when the replica with the most requests has `count_trigger`
more than the mean. Scope: the two extreme replicas by outstanding work, or the `k` most imbalanced
(k/2 most and k - k/2 least loaded). The instance: every request queued on those replicas that is not
in the batch in flight is a variable (the latest `max_requests` if there are more; the rest stay, and
with the running batch count as fixed work and pin their adapters). Solved by `migration_ilp.solve`
(HiGHS under a time limit, greedy fallback). A plan is returned only when it shortens the makespan by
`min_gain_s` — moving costs time, and a tie is not worth it.

Solver time: `solve_delay` says what the scheduler is charged in simulated time before the moves take
effect — "limit" (the time limit: the scheduler commits to act by its deadline; deterministic),
"measured" (the wall time this solve took; realistic but not reproducible), or "none". Wall time is
always recorded by the engine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dlora_sim.core.contracts import ClusterView, MigrationPlan, Migrator, RequestMove
from dlora_sim.core.cost_model import CostModel
from dlora_sim.policies.estimates import WorkModel
from dlora_sim.core.replica_config import hosting_capacity
from dlora_sim.policies.migration_ilp import MigrationInstance, replica_loads, solve, stay
from dlora_sim.core.request import Request, State, blocks_for

POLICY_MODES = ("transfer", "recompute", "auto")   # a move's own mode is transfer or recompute


@dataclass
class DLoRAMigrator(Migrator):
    interval_s: float = 10.0
    kv_trigger: float = 0.9            # fraction of KV blocks demanded
    count_trigger: int = 16            # requests above the mean on the most loaded replica
    always: bool = False               # solve every round (tests, ablations of the trigger)
    scope: str = "extremes"            # extremes | imbalanced
    k: int = 4                         # replicas in scope when scope = imbalanced
    mode: str = "transfer"             # transfer | recompute | auto (per request, whichever the cost model prices lower)
    time_limit_s: float = 1.0         # wall-clock safety net; node_limit normally binds first
    mip_rel_gap: float = 0.01
    node_limit: int | None = 300       # deterministic bound on the search (None = time limit only)
    max_requests: int = 192            # variables per instance; the latest arrivals are the movable ones
    use_milp: bool = True              # False = the greedy alone
    move_weight: float = 0.01          # objective weight of migration cost (tie-break towards staying)
    move_penalty_s: float = 0.001      # per moved request, in that tie-break
    min_gain_s: float = 0.05           # apply only if the makespan drops by at least this
    solve_delay: str = "limit"         # limit | measured | none
    work: WorkModel = field(default_factory=WorkModel)

    def move_mode(self, r: Request, cost: CostModel) -> tuple[str, float]:
        """How a request with KV moves, and what moving it costs: its KV over the link (transfer),
        re-prefilling its context at the destination (recompute), or the cheaper of the two (auto:
        short contexts recompute when a transfer's fixed cost outweighs their prefill)."""
        if self.mode == "transfer":
            return "transfer", cost.kv_transfer_time(r.context_len)
        if self.mode == "recompute":
            return "recompute", self.work.prefill_s(r.context_len)
        send, redo = cost.kv_transfer_time(r.context_len), self.work.prefill_s(r.context_len)
        return ("transfer", send) if send <= redo else ("recompute", redo)

    def __post_init__(self) -> None:
        if self.scope not in ("extremes", "imbalanced"):
            raise ValueError(f"migration.scope must be 'extremes' or 'imbalanced', got {self.scope!r}")
        if self.mode not in POLICY_MODES:
            raise ValueError(f"migration.mode must be one of {list(POLICY_MODES)}, got {self.mode!r}")
        if self.solve_delay not in ("limit", "measured", "none"):
            raise ValueError(f"migration.solve_delay must be limit, measured or none, got {self.solve_delay!r}")
        if self.interval_s <= 0 or self.time_limit_s <= 0 or self.k < 2 or self.max_requests < 1:
            raise ValueError("migration: interval_s and time_limit_s must be > 0, k >= 2, max_requests >= 1")

    # --- trigger and scope --------------------------------------------------------------------------
    def triggered(self, cluster: ClusterView) -> str:
        reps = cluster.replicas
        if len(reps) < 2:
            return ""
        if self.always:
            return "always"
        frac = [WorkModel.demanded_blocks(v) / v.total_blocks for v in reps]
        if max(frac) > self.kv_trigger and min(frac) < self.kv_trigger:
            return "kv"
        counts = [len(v.queue) for v in reps]
        if max(counts) - sum(counts) / len(counts) >= self.count_trigger:
            return "count"
        return ""

    def choose_scope(self, work: list[float]) -> list[int]:
        order = sorted(range(len(work)), key=lambda j: (-work[j], j))
        if self.scope == "extremes" or len(work) <= 2:
            return sorted({order[0], order[-1]})
        k = min(self.k, len(work))
        return sorted(set(order[: k // 2]) | set(order[len(order) - (k - k // 2):]))

    # --- the plan ---------------------------------------------------------------------------------
    def plan(self, cluster: ClusterView) -> MigrationPlan:
        t0 = time.perf_counter()
        reps = cluster.replicas
        self.work.bind(cluster.cost, reps[0].max_num_seqs)
        for v in reps:
            self.work.track(v.queue)
        self.work.harvest()
        why = self.triggered(cluster)
        if not why:
            return MigrationPlan()
        work = [self.work.replica_s(v) for v in reps]
        scope = self.choose_scope(work)
        if work[scope[-1]] == work[scope[0]] == 0.0 and len(scope) == 2 and max(work) == 0.0:
            return MigrationPlan()
        inst, movable, adapters = self._instance(cluster, scope)
        sol = solve(inst, time_limit_s=self.time_limit_s, mip_rel_gap=self.mip_rel_gap,
                    node_limit=self.node_limit, use_milp=self.use_milp)
        st = stay(inst)
        before = float(replica_loads(inst, st.assign, st.y).max()) if st is not None else float("nan")
        info = {"solved": True, "trigger": why, "scope": "-".join(map(str, scope)), "requests": inst.n,
                "adapters": inst.k, "status": "infeasible" if sol is None else sol.status,
                "makespan_before_s": round(before, 6),
                "makespan_after_s": round(sol.makespan, 6) if sol is not None else None}
        wall = time.perf_counter() - t0
        charged = {"limit": self.time_limit_s, "measured": wall, "none": 0.0}[self.solve_delay]
        if sol is None or not (before - sol.makespan >= self.min_gain_s):
            return MigrationPlan(solve_s=charged, info=info)
        moves = [RequestMove(movable[i], scope[int(sol.assign[i])], self.move_mode(movable[i], cluster.cost)[0])
                 for i in range(inst.n) if sol.assign[i] != inst.src[i]]
        hosts_changed: dict[int, tuple[int, ...]] = {}
        scope_set = set(scope)
        for kk, a in enumerate(adapters):
            old = cluster.hosts.get(a)
            if old is None:
                continue   # unrestricted adapter: nothing to change
            new = tuple(sorted({j for j in old if j not in scope_set}
                               | {scope[j] for j in np.flatnonzero(sol.y[kk])}))
            if new != tuple(old):
                hosts_changed[a] = new
        info["adapter_changes"] = len(hosts_changed)
        return MigrationPlan(moves, hosts_changed or None, charged, info)

    def _instance(self, cluster: ClusterView, scope: list[int]):
        reps = cluster.replicas
        m = len(scope)
        cost = cluster.cost
        in_flight = [{id(r) for r in reps[j].in_flight} for j in scope]
        cand = [(r, jj) for jj, j in enumerate(scope) for r in reps[j].queue if id(r) not in in_flight[jj]]
        cand.sort(key=lambda x: (x[0].arrival, x[0].id))
        movable_pairs = cand[-self.max_requests:] if len(cand) > self.max_requests else cand
        movable_ids = {id(r) for r, _ in movable_pairs}
        adapters = sorted({r.adapter for j in scope for r in reps[j].queue}
                          | {a for a, hs in cluster.hosts.items() if any(j in hs for j in scope)})
        kidx = {a: i for i, a in enumerate(adapters)}
        K = len(adapters)
        base_s = np.zeros(m)
        base_kv = np.zeros(m)
        pinned = np.zeros((K, m), dtype=bool)
        current = np.zeros((K, m), dtype=bool)
        for jj, j in enumerate(scope):
            v = reps[j]
            fixed = [r for r in v.queue if id(r) not in movable_ids]
            base_s[jj] = self.work.queue_s(fixed, v.max_num_seqs) if fixed else 0.0
            for r in fixed:
                base_kv[jj] += self._kv(r, v.block_size)
                pinned[kidx[r.adapter], jj] = True
            for a in adapters:
                hs = cluster.hosts.get(a)
                if hs is not None:
                    current[kidx[a], jj] = j in hs
                else:
                    current[kidx[a], jj] = a in v.resident or any(r.adapter == a for r in v.queue)
        current |= pinned
        n = len(movable_pairs)
        movable = [r for r, _ in movable_pairs]
        src = np.array([jj for _, jj in movable_pairs], dtype=np.int64)
        exec_s = np.array([self.work.request_s(r) for r in movable])
        move = np.zeros((n, m))
        for i, r in enumerate(movable):
            if r.state in (State.RESIDENT, State.SWAPPED):
                move[i, :] = self.move_mode(r, cost)[1]
                move[i, src[i]] = 0.0
        bs = reps[scope[0]].block_size
        kv = np.array([self._kv(r, bs) for r in movable], dtype=float)
        must = np.array([cluster.hosts.get(a) is not None and all(j in scope for j in cluster.hosts[a])
                         for a in adapters], dtype=bool)
        prof = cost.profile
        load_s = np.array([cost.load_time(prof.adapter_bytes(cluster.adapters[a].rank)) for a in adapters])
        v0 = reps[scope[0]]
        block_bytes = v0.block_size * prof.model.kv_bytes_per_token
        inst = MigrationInstance(
            exec_s=exec_s, adapter=np.array([kidx[r.adapter] for r in movable], dtype=np.int64), src=src,
            move_s=move, kv=kv, base_s=base_s, base_kv=base_kv,
            kv_capacity=np.array([reps[j].total_blocks for j in scope], dtype=float),
            slots=np.array([hosting_capacity(reps[j].adapter_slots, len(cluster.adapters), len(reps)) for j in scope]),
            current=current, pinned=pinned,
            must_host=must, load_s=load_s,
            swap_s_per_block=2 * cost.swap_time(1, block_bytes),   # out to host and back in
            move_weight=self.move_weight, move_penalty_s=self.move_penalty_s)
        return inst, movable, adapters

    @staticmethod
    def _kv(r, bs: int) -> int:
        return blocks_for(r.context_len + (0 if r.state == State.QUEUED else 1), bs)
