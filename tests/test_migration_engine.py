"""Applying migration plans in the engine: nothing lost or duplicated, costs from the profile,
determinism and fast-forward equivalence with migration on."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dlora_sim.core.replica_config import ClusterConfig
from dlora_sim.des.engine import Simulation
from dlora_sim.core.results import request_rows
from dlora_sim.core.paths import PROFILES_DIR
from dlora_sim.core.contracts import MigrationPlan, PolicyError, RequestMove
from dlora_sim.policies.dlora_migration import DLoRAMigrator
from dlora_sim.policies.dlora_router import DLoRARouter
from dlora_sim.policies.unmerged import UnmergedOnly
from dlora_sim.core.profile import load_profile
from dlora_sim.core.replica_config import ReplicaConfig
from dlora_sim.core.request import NS, State, blocks_for
from dlora_sim.core.workload import RequestSpec, Workload
from dlora_sim.workload.synthetic import SyntheticWorkload
from dlora_sim.workload.lengths import LengthDist

PROFILE = load_profile(PROFILES_DIR / "a100-80gb-llama-2-7b.yaml")


def make_sim(workload: Workload, replicas: int = 2, *, migrator=None, seqs: int = 4, slots: int = 2,
             ff: bool = True, host_swap: int = 16 << 30) -> Simulation:
    cfg = ClusterConfig(replicas, 1, ReplicaConfig(max_num_seqs=seqs, gpu_adapter_slots=slots, fast_forward=ff,
                                                   host_swap_bytes=host_swap))
    return Simulation(workload, PROFILE, cfg, UnmergedOnly, DLoRARouter(), migrator, keep_iterations=True)


def aggressive(mode: str = "transfer", **kw) -> DLoRAMigrator:
    return DLoRAMigrator(interval_s=0.25, always=True, min_gain_s=0.0, mode=mode, solve_delay="limit",
                         time_limit_s=0.05, **kw)


def check_locations(sim: Simulation):
    """Every 50 ms: each dispatched, unfinished request is in exactly one queue or in transit."""
    while True:
        yield sim.env.timeout(NS // 20)
        where: dict[int, int] = {}
        for rep in sim.cluster.replicas:
            for r in rep.queue:
                where[r.id] = where.get(r.id, 0) + 1
        for rid in sim.cluster.in_transit:
            where[rid] = where.get(rid, 0) + 1
        for r in sim.cluster.requests:
            if r.dispatch >= 0 and not r.done:
                assert where.get(r.id, 0) == 1, f"request {r.id} is in {where.get(r.id, 0)} places"
            elif r.done:
                assert r.id not in where, f"finished request {r.id} is still queued"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(10, 40), adapters=st.integers(1, 4),
       replicas=st.integers(2, 3), rate=st.floats(5, 60), mode=st.sampled_from(["transfer", "recompute"]),
       scope=st.sampled_from(["extremes", "imbalanced"]))
def test_no_request_lost_or_duplicated(seed, n, adapters, replicas, rate, mode, scope) -> None:
    wl = SyntheticWorkload(num_adapters=adapters, num_requests=n, rate=rate, prompt=LengthDist("uniform", low=8, high=300),
                           output=LengthDist("uniform", low=8, high=200)).build(seed)
    sim = make_sim(wl, replicas, migrator=aggressive(mode, scope=scope, k=3, max_requests=8), seqs=3,
                   slots=max(1, adapters // 2 + 1))
    sim.env.process(check_locations(sim))
    res = sim.run()
    assert all(r.state == State.FINISHED for r in res.requests)
    assert len(res.requests) == n and all(r.finish >= r.arrival for r in res.requests)
    assert sum(r.migrations for r in res.requests) == res.recorder.counters["migrations"]
    assert not sim.cluster.in_transit
    for rep in sim.cluster.replicas:   # every KV block came back: nothing leaked by remove/receive
        assert rep.free_blocks == rep.total_blocks and rep.host_free_blocks == rep.host_total_blocks
        assert not rep.queue
    # generated tokens are exactly the output lengths (no request ran twice or lost progress)
    assert all(r.generated == r.output_tokens for r in res.requests)


def test_aggressive_migration_actually_moves_requests() -> None:
    wl = SyntheticWorkload(num_adapters=3, num_requests=60, rate=40.0).build(1)
    sim = make_sim(wl, 3, migrator=aggressive(), seqs=4)
    res = sim.run()
    assert res.recorder.counters["migrations"] > 5
    assert res.extra["migration_rounds_solved"] > 0 and res.extra["solver_time_total_s"] > 0


def _one_request_sim(generated: int, state: State):
    wl = Workload((RequestSpec(0.0, 0, 300, 100),), (Workload_adapter(),))
    sim = make_sim(wl, 2)
    r = sim.cluster.requests[0]
    rep0 = sim.cluster.replicas[0]
    r.generated, r.state = generated, state
    r.kv_blocks = blocks_for(r.context_len, rep0.block_size)
    if state == State.RESIDENT:
        rep0.free_blocks -= r.kv_blocks
    else:
        rep0.host_free_blocks -= r.kv_blocks
    r.dispatch = 0
    rep0.enqueue(r)
    return sim, r


def Workload_adapter():
    from dlora_sim.core.workload import AdapterSpec
    return AdapterSpec(0, 16)


@pytest.mark.parametrize("state", [State.RESIDENT, State.SWAPPED])
def test_transfer_delay_is_kv_transfer_time(state: State) -> None:
    sim, r = _one_request_sim(40, state)
    rep0, rep1 = sim.cluster.replicas
    delay = sim.cluster.cost.kv_transfer_time(340)
    assert delay == pytest.approx(340 * PROFILE.model.kv_bytes_per_token / PROFILE.transfers.kv_transfer_bytes_per_s)
    sim.apply_migration(MigrationPlan([RequestMove(r, 1, "transfer")]))
    assert rep0.free_blocks == rep0.total_blocks and rep0.host_free_blocks == rep0.host_total_blocks
    assert r.id in sim.cluster.in_transit and not rep0.queue and not rep1.queue and r.migrations == 1
    arrive = int(round(delay * NS))
    sim.env.run(until=arrive)          # not yet: the delivery is scheduled at exactly `arrive`
    assert r.id in sim.cluster.in_transit
    sim.env.run(until=arrive + 1)
    assert rep1.queue == [r] and r.state == State.RESIDENT and r.replica == 1
    assert rep1.free_blocks == rep1.total_blocks - blocks_for(340, rep1.block_size)
    assert sim.cluster.recorder.counters["migrations"] == 1


def test_recompute_pays_prefill_of_prompt_and_generated() -> None:
    sim, r = _one_request_sim(40, State.RESIDENT)
    rep1 = sim.cluster.replicas[1]
    sim.apply_migration(MigrationPlan([RequestMove(r, 1, "recompute")]))
    assert rep1.queue == [r] and r.state == State.QUEUED and r.kv_blocks == 0 and not sim.cluster.in_transit
    sim.processes[1].start()
    sim.env.run(until=int(0.5 * NS))
    row = sim.cluster.recorder.rows[0]
    assert row.replica == 1 and row.prefill_tokens == 340          # replica 1 prefilled prompt (300) + generated (40)
    rank = 16
    cost = sim.cluster.cost
    expect = cost.iteration_time(prefill_tokens=340, prefill_sq=340 * 340, num_seqs=1, lora_rank_sum=rank,
                                 lora_token_rank=340 * rank, lora_passes=1) \
        + cost.load_time(PROFILE.adapter_bytes(rank))   # the adapter is loaded on demand at the destination
    assert row.duration == int(round(expect * NS))


def test_transfer_without_room_lands_in_host_swap_or_recomputes() -> None:
    sim, r = _one_request_sim(40, State.RESIDENT)
    rep1 = sim.cluster.replicas[1]
    rep1.free_blocks = 0
    sim.apply_migration(MigrationPlan([RequestMove(r, 1, "transfer")]))
    sim.env.run(until=int(NS))
    assert r.state == State.SWAPPED and rep1.host_free_blocks == rep1.host_total_blocks - r.kv_blocks


def test_invalid_plans_are_rejected() -> None:
    sim, r = _one_request_sim(40, State.RESIDENT)
    with pytest.raises(PolicyError):
        sim.apply_migration(MigrationPlan([RequestMove(r, 5)]))
    with pytest.raises(PolicyError):
        sim.apply_migration(MigrationPlan([RequestMove(r, 1), RequestMove(r, 1)]))
    sim.cluster.hosts = {0: (0,)}
    with pytest.raises(PolicyError):
        sim.apply_migration(MigrationPlan([RequestMove(r, 1)]))


def _rows(ff: bool, mode: str) -> list:
    """A wall-clock time limit that binds would make runs differ; the node limit is the deterministic bound."""
    wl = SyntheticWorkload(num_adapters=4, num_requests=70, rate=30.0).build(3)
    mig = dataclasses.replace(aggressive(mode), time_limit_s=0.2, node_limit=200, max_requests=24)
    sim = make_sim(wl, 3, migrator=mig, seqs=6, ff=ff)
    return list(request_rows(sim.run().requests))


@pytest.mark.parametrize("mode", ["transfer", "recompute"])
def test_fast_forward_and_determinism_with_migration(mode: str) -> None:
    on = _rows(True, mode)
    assert sum(int(r[16]) for r in on) > 0        # migrations happened
    assert on == _rows(False, mode)
    assert on == _rows(True, mode)
