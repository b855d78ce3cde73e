"""Invariants of the engine on random small workloads, for every baseline system."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim_helpers import SYSTEMS, run_cfg
from dlora_sim.request import State
from dlora_sim.workload.spec import RequestSpec, Workload


def check_invariants(sim, res) -> None:
    ids = [r.id for r in res.requests]
    assert len(ids) == len(set(ids)) == len(sim.workload.requests)
    for r in res.requests:
        assert r.state in (State.FINISHED, State.REJECTED)
        if r.state == State.REJECTED:
            assert r.reject_reason
            continue
        assert r.generated == r.output_tokens
        assert r.arrival <= r.dispatch <= r.first_scheduled <= r.first_token <= r.finish
        assert r.kv_blocks == 0
    for rep in sim.replicas:
        assert not rep.queue
        assert rep.free_blocks == rep.total_blocks
        assert rep.host_free_blocks == rep.host_total_blocks
        assert len(rep.resident) <= rep.adapter_slots
    last_end: dict[int, int] = {}
    for row in res.recorder.rows:
        replica, start, dur = row[0], row[1], row[2]
        assert dur > 0
        assert start >= last_end.get(replica, 0), "iterations overlap on one replica"
        last_end[replica] = start + dur


workloads = st.lists(
    st.tuples(st.floats(0, 20, allow_nan=False), st.integers(0, 5), st.integers(1, 900), st.integers(1, 300)),
    min_size=1, max_size=40)


@pytest.mark.parametrize("system", SYSTEMS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=workloads, replicas=st.integers(1, 3), slots=st.integers(1, 4), seqs=st.integers(1, 8),
       kv=st.integers(90, 200))
def test_random_workloads_keep_invariants(system, rows, replicas, slots, seqs, kv):
    wl = Workload.from_requests([RequestSpec(*r) for r in rows], num_adapters=6)
    # a tiny GPU (few KV blocks, small host swap) so preemption, swap and recompute all happen
    sim, res = run_cfg(f"system={system}", f"cluster.num_replicas={replicas}",
                       f"cluster.replica.gpu_adapter_slots={max(slots, 2) if system == 'vllm' else slots}",
                       f"cluster.replica.max_num_seqs={seqs}", "cluster.replica.max_num_batched_tokens=1024",
                       "cluster.replica.host_swap_bytes=50000000", "profile.hardware=a100-80gb",
                       "cluster.replica.watermark=0.0", f"cluster.replica.max_kv_blocks={kv}", workload=wl)
    check_invariants(sim, res)
