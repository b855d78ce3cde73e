"""Invariants of the engine on random small workloads, for every baseline system."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim_helpers import SYSTEMS, run_cfg
from dlora_sim.core.request import State
from dlora_sim.core.workload import RequestSpec, Workload


def check_invariants(sim, res) -> None:
    ids = [r.id for r in res.requests]
    assert len(ids) == len(set(ids)) == len(sim.cluster.workload.requests)
    for r in res.requests:
        assert r.state in (State.FINISHED, State.REJECTED)
        if r.state == State.REJECTED:
            assert r.reject_reason
            continue
        assert r.generated == r.output_tokens
        assert r.arrival <= r.dispatch <= r.first_scheduled <= r.first_token <= r.finish
        assert r.kv_blocks == 0
    for rep in sim.cluster.replicas:
        assert not rep.queue
        assert rep.free_blocks == rep.total_blocks
        assert rep.host_free_blocks == rep.host_total_blocks
        assert len(rep.resident) <= rep.adapter_slots
    last_end: dict[int, int] = {}
    for row in res.recorder.rows:
        replica, start, dur = row.replica, row.start, row.duration
        assert dur > 0
        assert start >= last_end.get(replica, 0), "iterations overlap on one replica"
        last_end[replica] = start + dur


# bursts (arrivals within a few seconds) of long-ish requests on up to six adapters: KV runs out
workloads = st.lists(
    st.tuples(st.floats(0, 3, allow_nan=False), st.integers(0, 5), st.integers(60, 900), st.integers(20, 300)),
    min_size=12, max_size=40)
BLOCK_BYTES = 16 * 524288   # one KV block of Llama-2-7B


@pytest.mark.parametrize("system", SYSTEMS)
def test_random_workloads_keep_invariants(system):
    """A tiny GPU (few KV blocks) with no, little or ample host swap, so that across the generated
    examples every memory path runs: preemption by swap-out and by recompute, and swap-in."""
    paths: Counter = Counter()

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
              derandomize=True)
    @given(rows=workloads, replicas=st.integers(1, 2), slots=st.integers(1, 4), seqs=st.integers(3, 8),
           kv=st.integers(60, 100), swap_blocks=st.sampled_from([0, 12, 400]), spread=st.sampled_from([1, 2, 6]))
    def one(rows, replicas, slots, seqs, kv, swap_blocks, spread):
        # `spread` adapters in use: one or two make long same-adapter runs (PEFT's and merged batches)
        wl = Workload.from_requests([RequestSpec(t, a % spread, p, o) for t, a, p, o in rows], num_adapters=6)
        sim, res = run_cfg(f"system={system}", f"cluster.num_replicas={replicas}",
                           f"cluster.replica.gpu_adapter_slots={max(slots, 2) if system == 'vllm' else slots}",
                           f"cluster.replica.max_num_seqs={seqs}", "cluster.replica.max_num_batched_tokens=1024",
                           f"cluster.replica.host_swap_bytes={swap_blocks * BLOCK_BYTES}",
                           "profile.hardware=a100-80gb", "cluster.replica.watermark=0.0",
                           f"cluster.replica.max_kv_blocks={kv}", workload=wl)
        check_invariants(sim, res)
        paths.update(res.recorder.counters)

    one()
    for path in ("preemptions", "swap_outs", "swap_ins", "recomputes"):
        assert paths[path] > 0, f"{system}: no example exercised {path} ({dict(paths)})"


@pytest.mark.parametrize("system", SYSTEMS)
def test_random_workloads_keep_invariants_with_chunked_prefill(system):
    """The same tiny GPU with a 256-token budget, chunked prefill and prefill priority drawn per example:
    prompts part-way through their chunks hold KV, can be preempted, and every request still finishes."""
    paths: Counter = Counter()

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
              derandomize=True)
    @given(rows=workloads, seqs=st.integers(3, 8), kv=st.integers(60, 100), swap_blocks=st.sampled_from([0, 400]),
           priority=st.booleans())
    def one(rows, seqs, kv, swap_blocks, priority):
        wl = Workload.from_requests([RequestSpec(t, a % 2, p, o) for t, a, p, o in rows], num_adapters=6)
        sim, res = run_cfg(f"system={system}", "cluster.num_replicas=1", "cluster.replica.gpu_adapter_slots=2",
                           f"cluster.replica.max_num_seqs={seqs}", "cluster.replica.max_num_batched_tokens=256",
                           "cluster.replica.chunked_prefill=true", f"cluster.replica.prefill_priority={priority}",
                           f"cluster.replica.host_swap_bytes={swap_blocks * BLOCK_BYTES}",
                           "profile.hardware=a100-80gb", "cluster.replica.watermark=0.0",
                           f"cluster.replica.max_kv_blocks={kv}", workload=wl)
        check_invariants(sim, res)
        assert all(row.prefill_tokens + row.decode_seqs <= 256 for row in res.recorder.rows)   # prefill tokens + decodes
        paths.update(res.recorder.counters)

    one()
    for path in ("prefill_chunks", "preemptions"):
        assert paths[path] > 0, f"{system}: no example exercised {path} ({dict(paths)})"
