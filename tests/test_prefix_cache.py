"""Prefix caching keyed by adapter (core/prefix_cache.py): entries never cross adapters, a cached prefix is priced
for its suffix only, blocks shared by running requests exist once, references return to zero, and invariants hold
on random workloads with eviction exercised."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim_helpers import run_cfg
from test_engine_invariants import BLOCK_BYTES, check_invariants
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.profile import load_profile
from dlora_sim.core.workload import RequestSpec, Workload

ON = "cluster.replica.prefix_caching=true"
PB = 512   # prefix block tokens (Mooncake's)


def wl(rows, prefixes, adapters=2):
    w = Workload.from_requests([RequestSpec(*r) for r in rows], num_adapters=adapters)
    return Workload(w.requests, w.adapters, prefixes=tuple(tuple(p) for p in prefixes), prefix_block_tokens=PB)


def one_replica(*over, workload):
    return run_cfg("system=slora", "cluster.num_replicas=1", "router=least_loaded", *over, workload=workload)


def test_a_cached_prefix_is_priced_for_its_suffix_only():
    """The second request's 1,024 cached tokens are not recomputed: its prefill is 100 tokens whose attention
    runs over the cached 1,024 (prefill_sq = c (2 done + c)), the closed form a later chunk is priced by."""
    rows = [(0.0, 0, 1124, 2), (5.0, 0, 1124, 2)]
    sim, res = one_replica(ON, workload=wl(rows, [(7, 8, 9), (7, 8, 9)]))
    first, second = (r for r in res.recorder.rows if r.prefill_tokens)
    assert first.prefill_tokens == 1124 and second.prefill_tokens == 100
    cost = CostModel(load_profile("a100-80gb-llama-2-7b"))
    want = cost.iteration_time(prefill_tokens=100, prefill_sq=100 * (2 * 1024 + 100), num_seqs=1, lora_rank_sum=16,
                               lora_token_rank=100 * 16, lora_passes=1)
    assert second.compute == want
    c = res.recorder.counters
    assert c["prefix_hit_tokens"] == 1024 and c["prefix_prompt_tokens"] == 2 * 1124


def test_two_adapters_never_share_an_entry():
    rows = [(0.0, 0, 1124, 2), (5.0, 1, 1124, 2)]
    _, res = one_replica(ON, workload=wl(rows, [(7, 8, 9), (7, 8, 9)]))
    assert [r.prefill_tokens for r in res.recorder.rows if r.prefill_tokens] == [1124, 1124]
    assert res.recorder.counters["prefix_hit_tokens"] == 0


def test_blocks_shared_by_running_requests_exist_once():
    """Two requests of one adapter run together on a 1,024-token cached prefix: the replica's used blocks count
    it once (the state's own accounting check runs after every step)."""
    rows = [(0.0, 0, 1030, 2), (5.0, 0, 1030, 200), (5.0, 0, 1030, 200)]
    sim, res = one_replica(ON, workload=wl(rows, [(1, 2, 3)] * 3))
    rep = sim.cluster.replicas[0]
    assert res.recorder.counters["prefix_hit_tokens"] == 2 * 1024
    assert rep.prefix_cache.evictions == 0 and set(rep.prefix_cache.refs.values()) == {0}   # all released
    assert rep.free_blocks == rep.total_blocks


def test_without_caching_or_prefixes_nothing_changes():
    rows = [(0.0, 0, 1124, 2), (5.0, 0, 1124, 2)]
    _, off = one_replica(workload=wl(rows, [(7, 8, 9), (7, 8, 9)]))
    _, none = one_replica(ON, workload=Workload.from_requests([RequestSpec(*r) for r in rows], num_adapters=2))
    for res in (off, none):
        assert [r.prefill_tokens for r in res.recorder.rows if r.prefill_tokens] == [1124, 1124]


def test_a_prefix_block_that_is_not_whole_kv_blocks_is_named():
    w = wl([(0.0, 0, 100, 2)], [(1,)])
    w = Workload(w.requests, w.adapters, prefixes=w.prefixes, prefix_block_tokens=100)
    with pytest.raises(ValueError, match="cluster.replica.block_size"):
        one_replica(ON, workload=w)


# random requests on 3 adapters drawing their prompts' prefix blocks from a few shared "documents"
prefixed = st.lists(st.tuples(st.floats(0, 4, allow_nan=False), st.integers(0, 2), st.integers(300, 2600),
                              st.integers(4, 120), st.integers(0, 3)), min_size=10, max_size=35)


@pytest.mark.parametrize("system", ["slora", "dlora", "merged"])
def test_random_workloads_keep_invariants_with_prefix_caching(system):
    """A small KV cache so that cached entries are evicted, preemptions by swap and recompute, chunked prefill
    drawn per example: every request finishes once, memory returns, references end at zero."""
    paths: Counter = Counter()

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
              derandomize=True)
    @given(rows=prefixed, replicas=st.integers(1, 2), kv=st.integers(200, 400), chunked=st.booleans(),
           swap=st.sampled_from([0, 60]))
    def one(rows, replicas, kv, chunked, swap):
        prefixes = [tuple(100 * doc + i for i in range(6)) for _, _, _, _, doc in rows]
        w = wl([r[:4] for r in rows], prefixes, adapters=3)
        sim, res = run_cfg(f"system={system}", f"cluster.num_replicas={replicas}", ON,
                           "cluster.replica.max_num_seqs=6", "cluster.replica.max_num_batched_tokens=2700",
                           f"cluster.replica.chunked_prefill={str(chunked).lower()}", "cluster.replica.watermark=0.0",
                           f"cluster.replica.host_swap_bytes={swap * BLOCK_BYTES}", f"cluster.replica.max_kv_blocks={kv}",
                           workload=w)
        check_invariants(sim, res)
        for rep in sim.cluster.replicas:
            cache = rep.prefix_cache
            assert set(cache.refs.values()) <= {0} and cache.evictable == cache.blocks * len(cache.lru)
        paths.update(res.recorder.counters)
        paths["prefix_evictions"] += sum(rep.prefix_cache.evictions for rep in sim.cluster.replicas)

    one()
    for path in ("prefix_hit_tokens", "prefix_evictions", "preemptions"):
        assert paths[path] > 0, f"{system}: no example exercised {path} ({dict(paths)})"


def test_shared_system_prompts_are_served_from_the_cache_end_to_end():
    """The synthetic generator's shared system prompts (4 of 1,024 tokens, on 16 adapters): with caching on, a large share of
    the prompt tokens come from the cache and TTFT falls; the generator's prefixes never change the requests."""
    over = ("system=vllm_lora", "workload.shared_prefix_groups=4", "workload.shared_prefix_tokens=1024",
            "workload.num_requests=400")
    _, off = run_cfg(*over)
    _, on = run_cfg(*over, ON)
    c = on.recorder.counters
    assert c["prefix_hit_tokens"] > 0.3 * c["prefix_prompt_tokens"]   # 64 (adapter, prompt) pairs over 4 replicas
    assert [(r.prompt_tokens, r.output_tokens, r.adapter) for r in on.requests] == \
        [(r.prompt_tokens, r.output_tokens, r.adapter) for r in off.requests]
    mean_ttft = [sum(r.first_token - r.arrival for r in res.requests) / len(res.requests) for res in (off, on)]
    assert mean_ttft[1] < mean_ttft[0]


def test_a_long_prompt_reuses_its_whole_cached_prefix_past_the_first_chunk():
    """A 1,024-token budget cuts a 2,000-token prompt into chunks, yet the second request takes all three cached
    blocks (1,536 tokens), not only those of its first chunk: one iteration computes the last 464 tokens over them."""
    rows = [(0.0, 0, 2000, 2), (10.0, 0, 2000, 2)]
    _, res = one_replica(ON, "cluster.replica.chunked_prefill=true", "cluster.replica.max_num_batched_tokens=1024",
                         workload=wl(rows, [(1, 2, 3, 4)] * 2))
    chunks = [(r.prefill_tokens, r.start) for r in res.recorder.rows if r.prefill_tokens]
    assert [t for t, _ in chunks] == [1024, 976, 464]
    assert res.recorder.counters["prefix_hit_tokens"] == 1536
    assert res.recorder.counters["prefill_chunks"] == 1   # only the first request's prompt was cut
