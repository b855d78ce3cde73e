"""Request–adapter co-migration as an integer program (after dLoRA's co-migration program; docs/algorithm.md).

Pure functions on plain arrays so the model can be checked against brute force. Variables:
x[i, j] binary (request i on replica j), y[k, j] binary (adapter k hosted on replica j), o[j] >= 0
(KV blocks over replica j's capacity), T (makespan). Constraints: each request on exactly one replica;
x[i, j] <= y[adapter(i), j]; adapters per replica within its slots; pinned adapters stay (a request
that cannot move needs them); adapters with no host outside the instance keep at least one host in it;
o[j] >= base_kv[j] + sum_i kv[i] x[i, j] - capacity[j]; and
  T >= base[j] + sum_i x[i, j] (exec[i] + move[i, j]) + sum_k y[k, j] load[k] (if k is new on j)
       + swap_s_per_block * o[j].
Objective: T + move_weight * (moving cost + move_penalty_s per moved request), so that among equal
makespans the plan that moves least wins (and no request moves for nothing).

`solve` runs scipy's HiGHS MILP under a time (and optional node) limit and also a fast local-search
greedy; it returns the better feasible answer, so a solver that runs out of time still yields a plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix


@dataclass
class MigrationInstance:
    exec_s: np.ndarray          # (n,) expected remaining seconds of each movable request
    adapter: np.ndarray         # (n,) adapter index 0..K-1
    src: np.ndarray             # (n,) replica index 0..m-1 it is on now
    move_s: np.ndarray          # (n, m) cost of running it on j (0 where j == src)
    kv: np.ndarray              # (n,) KV blocks it demands
    base_s: np.ndarray          # (m,) work that cannot move (running or fixed requests)
    base_kv: np.ndarray         # (m,)
    kv_capacity: np.ndarray     # (m,)
    slots: np.ndarray           # (m,) adapter slots
    current: np.ndarray         # (K, m) bool: adapter hosted there now (no load cost)
    pinned: np.ndarray          # (K, m) bool: must stay hosted
    must_host: np.ndarray       # (K,) bool: needs >= 1 host among these replicas
    load_s: np.ndarray          # (K,) seconds to load adapter k where it is not hosted
    swap_s_per_block: float = 0.0
    move_weight: float = 0.01
    move_penalty_s: float = 0.001

    def __post_init__(self) -> None:
        n, m, K = len(self.exec_s), len(self.base_s), len(self.load_s)
        shapes = {"adapter": (self.adapter, (n,)), "src": (self.src, (n,)), "move_s": (self.move_s, (n, m)),
                  "kv": (self.kv, (n,)), "base_kv": (self.base_kv, (m,)), "kv_capacity": (self.kv_capacity, (m,)),
                  "slots": (self.slots, (m,)), "current": (self.current, (K, m)), "pinned": (self.pinned, (K, m)),
                  "must_host": (self.must_host, (K,))}
        for name, (a, shape) in shapes.items():
            if np.shape(a) != shape:
                raise ValueError(f"MigrationInstance.{name} has shape {np.shape(a)}, expected {shape}")

    @property
    def n(self) -> int:
        return len(self.exec_s)

    @property
    def m(self) -> int:
        return len(self.base_s)

    @property
    def k(self) -> int:
        return len(self.load_s)


@dataclass
class MigrationSolution:
    assign: np.ndarray      # (n,) replica of each request
    y: np.ndarray           # (K, m) bool
    makespan: float
    objective: float
    status: str             # optimal | time_limit | node_limit | greedy | fallback_greedy | ...
    solve_s: float = 0.0


def replica_loads(inst: MigrationInstance, assign: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Seconds of work on each replica for an assignment (the right-hand sides of T's constraints)."""
    m = inst.m
    idx = np.arange(inst.n)
    work = inst.exec_s + inst.move_s[idx, assign]
    loads = inst.base_s + np.bincount(assign, weights=work, minlength=m)
    kv = inst.base_kv + np.bincount(assign, weights=inst.kv, minlength=m)
    loads = loads + inst.swap_s_per_block * np.maximum(0.0, kv - inst.kv_capacity)
    new = y & ~inst.current
    return loads + (new * inst.load_s[:, None]).sum(axis=0)


def objective(inst: MigrationInstance, assign: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(makespan, objective value)."""
    span = float(replica_loads(inst, assign, y).max()) if inst.m else 0.0
    idx = np.arange(inst.n)
    moved = assign != inst.src
    mig = float((inst.move_s[idx, assign] + inst.move_penalty_s * moved).sum())
    return span, span + inst.move_weight * mig


def violations(inst: MigrationInstance, assign: np.ndarray, y: np.ndarray) -> list[str]:
    """Every constraint the (assign, y) pair breaks; empty when feasible."""
    out = []
    if assign.shape != (inst.n,) or (inst.n and (assign.min() < 0 or assign.max() >= inst.m)):
        out.append("assignment out of range")
        return out
    for i in range(inst.n):
        if not y[inst.adapter[i], assign[i]]:
            out.append(f"request {i} on replica {assign[i]} without its adapter {inst.adapter[i]}")
    for j in range(inst.m):
        if y[:, j].sum() > inst.slots[j]:
            out.append(f"replica {j}: {int(y[:, j].sum())} adapters > {inst.slots[j]} slots")
    if (inst.pinned & ~y).any():
        out.append("a pinned adapter was removed")
    for k in np.flatnonzero(inst.must_host):
        if not y[k].any():
            out.append(f"adapter {k} lost its last host")
    return out


def _status_name(res) -> str:
    msg = (res.message or "").lower()
    if res.status == 0:
        return "optimal"
    if "time" in msg:
        return "time_limit"
    if "node" in msg:
        return "node_limit"
    if res.status == 2:
        return "infeasible"
    return f"status_{res.status}"


def solve_milp(inst: MigrationInstance, *, time_limit_s: float = 1.0, mip_rel_gap: float = 1e-4,
               node_limit: int | None = None) -> MigrationSolution | None:
    """HiGHS via scipy.optimize.milp; None when it found no feasible solution (infeasible or out of time)."""
    n, m, K = inst.n, inst.m, inst.k
    nx, ny = n * m, K * m
    ox, oy, oo, oT = 0, nx, nx + ny, nx + ny + m
    nv = oT + 1
    xi = lambda i, j: ox + i * m + j      # noqa: E731
    yi = lambda k, j: oy + k * m + j      # noqa: E731
    c = np.zeros(nv)
    c[oT] = 1.0
    idx = np.arange(n)
    moved = np.ones((n, m))
    moved[idx, inst.src] = 0.0
    c[ox:oy] = (inst.move_weight * (inst.move_s + inst.move_penalty_s * moved)).ravel()
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries, lb, ub):
        nonlocal r
        for col, v in entries:
            rows.append(r)
            cols.append(col)
            vals.append(v)
        lo.append(lb)
        hi.append(ub)
        r += 1

    for i in range(n):                                   # each request on exactly one replica
        add(((xi(i, j), 1.0) for j in range(m)), 1.0, 1.0)
    for i in range(n):                                   # only where its adapter is hosted
        for j in range(m):
            add(((xi(i, j), 1.0), (yi(inst.adapter[i], j), -1.0)), -np.inf, 0.0)
    for j in range(m):                                   # adapter slots
        add(((yi(k, j), 1.0) for k in range(K)), -np.inf, float(inst.slots[j]))
    for k in np.flatnonzero(inst.must_host):             # keep a host
        add(((yi(k, j), 1.0) for j in range(m)), 1.0, np.inf)
    for j in range(m):                                   # KV overflow: o_j - sum kv x >= base_kv - cap
        add([(oo + j, 1.0)] + [(xi(i, j), -float(inst.kv[i])) for i in range(n)],
            float(inst.base_kv[j] - inst.kv_capacity[j]), np.inf)
    for j in range(m):                                   # makespan
        ent = [(oT, 1.0), (oo + j, -inst.swap_s_per_block)]
        ent += [(xi(i, j), -float(inst.exec_s[i] + inst.move_s[i, j])) for i in range(n)]
        ent += [(yi(k, j), -float(inst.load_s[k])) for k in range(K) if not inst.current[k, j]]
        add(ent, float(inst.base_s[j]), np.inf)
    A = coo_matrix((vals, (rows, cols)), shape=(r, nv)).tocsr()
    lb = np.zeros(nv)
    ub = np.ones(nv)
    lb[oy:oo] = inst.pinned.ravel().astype(float)
    ub[oo:] = np.inf
    integrality = np.zeros(nv)
    integrality[:oo] = 1
    options = {"time_limit": float(time_limit_s), "mip_rel_gap": float(mip_rel_gap), "presolve": True}
    if node_limit is not None:
        options["node_limit"] = int(node_limit)
    t0 = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(lb, ub),
               options=options)
    dt = time.perf_counter() - t0
    if res.x is None:
        return None
    x = np.round(res.x[ox:oy]).reshape(n, m)
    assign = x.argmax(axis=1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    y = np.round(res.x[oy:oo]).reshape(K, m).astype(bool)
    # y may host adapters nothing needs (free when the adapter is already there): keep only what is
    # used, pinned, required, or already hosted, so no load is planned for nothing
    y = _trim(inst, assign, y)
    span, obj = objective(inst, assign, y)
    return MigrationSolution(assign, y, span, obj, _status_name(res), dt)


def _trim(inst: MigrationInstance, assign: np.ndarray, y: np.ndarray) -> np.ndarray:
    used = inst.pinned.copy()
    used[inst.adapter, assign] = True
    keep = used | (y & inst.current)
    for k in np.flatnonzero(inst.must_host & ~keep.any(axis=1)):
        j = int(np.flatnonzero(y[k])[0])
        keep[k, j] = True
    return keep


def stay(inst: MigrationInstance) -> MigrationSolution | None:
    """Nobody moves; adapters stay where they are. None if even that breaks a constraint."""
    assign = inst.src.astype(np.int64).copy()
    y = inst.current | inst.pinned
    if violations(inst, assign, y):
        return None
    span, obj = objective(inst, assign, y)
    return MigrationSolution(assign, y, span, obj, "stay")


def greedy(inst: MigrationInstance) -> MigrationSolution | None:
    """Local search from the current state: repeatedly move the request off the most loaded replica
    that lowers the makespan most (adding its adapter where a slot is free). O(steps * n * m)."""
    t0 = time.perf_counter()
    start = stay(inst)
    if start is None:
        return None
    assign, y = start.assign.copy(), start.y.copy()
    n, m = inst.n, inst.m
    loads = replica_loads(inst, assign, y)
    kvs = inst.base_kv + np.bincount(assign, weights=inst.kv, minlength=m)
    count = np.bincount(assign, minlength=m) if n else np.zeros(m, dtype=np.int64)
    swap = inst.swap_s_per_block
    for _ in range(2 * n + 1):
        hi = int(np.argmax(loads))
        best = None
        best_span = float(loads[hi]) - 1e-9
        others = np.delete(loads, hi)
        for i in np.flatnonzero(assign == hi):
            a = inst.adapter[i]
            work_hi = inst.exec_s[i] + inst.move_s[i, hi]
            over_hi_old = max(0.0, kvs[hi] - inst.kv_capacity[hi])
            over_hi_new = max(0.0, kvs[hi] - inst.kv[i] - inst.kv_capacity[hi])
            new_hi = loads[hi] - work_hi - swap * (over_hi_old - over_hi_new)
            for j in range(m):
                if j == hi:
                    continue
                add_adapter = not y[a, j]
                if add_adapter and y[:, j].sum() >= inst.slots[j]:
                    continue
                over_old = max(0.0, kvs[j] - inst.kv_capacity[j])
                over_new = max(0.0, kvs[j] + inst.kv[i] - inst.kv_capacity[j])
                new_j = (loads[j] + inst.exec_s[i] + inst.move_s[i, j] + swap * (over_new - over_old)
                         + (inst.load_s[a] if add_adapter and not inst.current[a, j] else 0.0))
                rest = np.delete(others, j if j < hi else j - 1).max() if m > 2 else -np.inf
                span = max(new_hi, new_j, rest)
                if span < best_span:
                    best_span, best = span, (int(i), j)
        if best is None:
            break
        i, j = best
        a, src = inst.adapter[i], assign[i]
        assign[i] = j
        y[a, j] = True
        kvs[src] -= inst.kv[i]
        kvs[j] += inst.kv[i]
        count[src] -= 1
        count[j] += 1
        y = _trim(inst, assign, y)
        loads = replica_loads(inst, assign, y)
    span, obj = objective(inst, assign, y)
    return MigrationSolution(assign, y, span, obj, "greedy", time.perf_counter() - t0)


def solve(inst: MigrationInstance, *, time_limit_s: float = 1.0, mip_rel_gap: float = 1e-4,
          node_limit: int | None = None, use_milp: bool = True) -> MigrationSolution | None:
    """The better of HiGHS's answer and the greedy one; greedy alone when HiGHS finds nothing in time."""
    g = greedy(inst)
    if not use_milp or inst.n == 0:
        return g
    s = solve_milp(inst, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap, node_limit=node_limit)
    if s is None:
        if g is not None:
            g.status = "fallback_greedy"
        return g
    if g is not None and g.objective < s.objective - 1e-12:
        g.status = f"greedy_better_than_{s.status}"
        g.solve_s += s.solve_s
        return g
    if g is not None:
        s.solve_s += g.solve_s
    return s
