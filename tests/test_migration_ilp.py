"""The co-migration integer program against brute force on tiny random instances."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from dlora_sim.policies.migration_ilp import (MigrationInstance, greedy, objective, replica_loads, solve,
                                              solve_milp, violations)


def random_instance(rng: np.random.Generator, *, move_weight: float = 0.01) -> MigrationInstance:
    m = int(rng.integers(2, 4))
    n = int(rng.integers(1, 7))
    K = int(rng.integers(1, 4))
    adapter = rng.integers(0, K, n)
    src = rng.integers(0, m, n)
    slots = rng.integers(1, K + 1, m)
    current = np.zeros((K, m), dtype=bool)
    current[adapter, src] = True
    for k in range(K):   # every adapter starts somewhere
        if not current[k].any():
            current[k, rng.integers(0, m)] = True
    slots = np.maximum(slots, current.sum(axis=0))   # the current state is feasible
    pinned = current & (rng.random((K, m)) < 0.2)
    move = rng.uniform(0, 0.5, (n, m)) * (rng.random((n, 1)) < 0.7)
    move[np.arange(n), src] = 0.0
    return MigrationInstance(
        exec_s=rng.uniform(0.1, 3.0, n), adapter=adapter, src=src, move_s=move, kv=rng.integers(1, 40, n).astype(float),
        base_s=rng.uniform(0, 2, m), base_kv=rng.integers(0, 30, m).astype(float),
        kv_capacity=rng.integers(30, 80, m).astype(float), slots=slots, current=current, pinned=pinned,
        must_host=rng.random(K) < 0.5, load_s=rng.uniform(0, 0.3, K), swap_s_per_block=float(rng.uniform(0, 0.05)),
        move_weight=move_weight, move_penalty_s=0.001)


def brute_force(inst: MigrationInstance) -> tuple[float, float]:
    """Minimum objective (and its makespan) over every assignment and every adapter placement."""
    n, m, K = inst.n, inst.m, inst.k
    best = (np.inf, np.inf)
    assigns = np.array(list(itertools.product(range(m), repeat=n)), dtype=np.int64).reshape(-1, n)
    for bits in itertools.product((False, True), repeat=K * m):
        y = np.array(bits, dtype=bool).reshape(K, m)
        if (y.sum(axis=0) > inst.slots).any() or (inst.pinned & ~y).any() or \
                any(not y[k].any() for k in np.flatnonzero(inst.must_host)):
            continue
        ok = y[inst.adapter[None, :], assigns].all(axis=1) if n else np.ones(len(assigns), bool)
        for a in assigns[ok]:
            obj = objective(inst, a, y)
            if obj[1] < best[1]:
                best = (obj[0], obj[1])
    return best


@pytest.mark.parametrize("seed", range(40))
def test_milp_matches_brute_force(seed: int) -> None:
    inst = random_instance(np.random.default_rng(seed))
    span_bf, obj_bf = brute_force(inst)
    sol = solve_milp(inst, time_limit_s=10.0, mip_rel_gap=0.0)
    assert sol is not None and sol.status == "optimal"
    assert violations(inst, sol.assign, sol.y) == []
    span, obj = objective(inst, sol.assign, sol.y)
    assert obj == pytest.approx(obj_bf, abs=1e-6)
    assert span == pytest.approx(sol.makespan, abs=1e-9)


@pytest.mark.parametrize("seed", range(40, 60))
def test_pure_makespan_matches_brute_force(seed: int) -> None:
    """With no tie-break weight the objective is the makespan itself: optimal makespans agree."""
    inst = random_instance(np.random.default_rng(seed), move_weight=0.0)
    span_bf, _ = brute_force(inst)
    sol = solve_milp(inst, time_limit_s=10.0, mip_rel_gap=0.0)
    assert sol is not None and violations(inst, sol.assign, sol.y) == []
    assert sol.makespan == pytest.approx(span_bf, abs=1e-6)


@pytest.mark.parametrize("seed", range(30))
def test_greedy_is_feasible_and_never_worse_than_staying(seed: int) -> None:
    inst = random_instance(np.random.default_rng(seed))
    g = greedy(inst)
    assert g is not None and violations(inst, g.assign, g.y) == []
    stay_span = replica_loads(inst, inst.src, inst.current | inst.pinned).max()
    assert g.makespan <= stay_span + 1e-9


def test_time_limit_falls_back_to_greedy() -> None:
    """A big instance with a zero time budget: HiGHS returns nothing, the greedy plan is used."""
    rng = np.random.default_rng(7)
    n, m, K = 300, 4, 6
    adapter, src = rng.integers(0, K, n), rng.integers(0, m, n)
    current = np.ones((K, m), dtype=bool)
    inst = MigrationInstance(exec_s=rng.uniform(0.1, 3, n), adapter=adapter, src=src, move_s=np.zeros((n, m)),
                             kv=np.ones(n), base_s=np.array([50.0, 0, 0, 0]), base_kv=np.zeros(m),
                             kv_capacity=np.full(m, 1e6), slots=np.full(m, K), current=current,
                             pinned=np.zeros((K, m), bool), must_host=np.ones(K, bool), load_s=np.zeros(K))
    sol = solve(inst, time_limit_s=1e-6)
    assert sol is not None and sol.status in ("fallback_greedy", "greedy") or sol.status.startswith("greedy_better")
    assert violations(inst, sol.assign, sol.y) == []
    assert sol.makespan < replica_loads(inst, inst.src, current).max()


def test_swap_overflow_is_charged() -> None:
    """Two requests that fit only apart: together they overflow KV and pay the swap term."""
    inst = MigrationInstance(exec_s=np.array([1.0, 1.0]), adapter=np.array([0, 0]), src=np.array([0, 0]),
                             move_s=np.zeros((2, 2)), kv=np.array([10.0, 10.0]), base_s=np.zeros(2),
                             base_kv=np.zeros(2), kv_capacity=np.array([10.0, 10.0]), slots=np.array([1, 1]),
                             current=np.array([[True, False]]), pinned=np.zeros((1, 2), bool),
                             must_host=np.array([True]), load_s=np.array([0.0]), swap_s_per_block=1.0)
    loads = replica_loads(inst, np.array([0, 0]), np.array([[True, False]]))
    assert loads[0] == pytest.approx(2.0 + 10.0)
    sol = solve_milp(inst, mip_rel_gap=0.0)
    assert sorted(sol.assign.tolist()) == [0, 1] and sol.makespan == pytest.approx(1.0)
