"""Adapter tiers (core/adapter_tiers.py): a bounded host cache with a backing store behind it, prefetch and
loads overlapped with compute, priced in closed form; invariants hold on random workloads with every tier used."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim_helpers import run_cfg
from test_engine_invariants import BLOCK_BYTES, check_invariants
from dlora_sim.core.adapter_tiers import AdapterTiers
from dlora_sim.core.config import ConfigError
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.profile import load_profile
from dlora_sim.core.request import NS
from dlora_sim.core.workload import RequestSpec, Workload

MS = NS // 1000


def tiers(capacity: int = 2, fetch_ms: int = 10) -> AdapterTiers:
    return AdapterTiers(capacity, lambda nbytes: fetch_ms * MS)


def test_host_memory_keeps_the_most_recently_used_adapters():
    t = tiers(capacity=2)
    assert t.load(1, 0, 0) == (0.01, "store")
    assert t.load(2, 0, 0) == (0.01, "store")
    assert t.load(1, 0, 0) == (0.0, "host")        # 1 is now the most recent
    assert t.load(3, 0, 0) == (0.01, "store")      # evicts 2, the least recent
    assert list(t.host) == [1, 3] and t.evictions == 1
    assert t.load(2, 0, 0)[1] == "store"


def test_prefetches_run_one_after_another_and_a_load_waits_for_what_is_left():
    t = tiers(capacity=4, fetch_ms=10)
    assert t.prefetch([5, 6, 7], lambda a: 0, now=0, depth=2) == 2   # depth bounds what is in flight
    assert t.fetching == {5: 10 * MS, 6: 20 * MS}                    # serial on the store link
    assert t.load(6, 0, 4 * MS) == (0.016, "prefetched")             # 16 ms of its fetch left at 4 ms
    t.settle(12 * MS)                                                 # 5 landed at 10 ms
    assert t.load(5, 0, 12 * MS) == (0.0, "host")
    assert t.prefetch([5, 6, 7], lambda a: 0, now=12 * MS, depth=2) == 1   # 5 and 6 are in host memory
    assert t.fetching == {7: 30 * MS}                                 # after the link frees at 20 ms


def _profile():
    return load_profile("a100-80gb-llama-2-7b")


def test_a_cold_load_costs_the_store_fetch_plus_the_copy_to_the_gpu():
    """One request on a replica whose host cache holds one adapter that is not its: the first iteration's
    load is the closed form, latency + bytes / store bandwidth + bytes / host-to-GPU bandwidth."""
    wl = Workload.from_requests([RequestSpec(0.0, 1, 64, 4)], num_adapters=2)
    sim, res = run_cfg("system=slora", "cluster.num_replicas=1", "router=least_loaded",
                       "cluster.replica.host_adapter_cache=1", "cluster.replica.gpu_adapter_slots=1", workload=wl)
    cost = CostModel(_profile())
    nbytes = _profile().adapter_bytes(16)
    first = res.recorder.rows[0]
    assert first.load == pytest.approx(cost.load_time(nbytes) + cost.store_time(nbytes), rel=1e-12)
    tr = _profile().transfers
    assert cost.store_time(nbytes) == tr.store_latency_s + nbytes / tr.store_bytes_per_s
    assert res.recorder.counters["adapter_loads_store"] == 1


def test_overlapped_loads_show_only_what_outlasts_the_compute():
    wl = Workload.from_requests([RequestSpec(0.0, 1, 64, 4)], num_adapters=2)
    common = ("system=slora", "cluster.num_replicas=1", "router=least_loaded", "cluster.replica.gpu_adapter_slots=1")
    _, plain = run_cfg(*common, workload=wl)
    _, over = run_cfg(*common, "cluster.replica.overlap_loads=true", workload=wl)
    p, o = plain.recorder.rows[0], over.recorder.rows[0]
    assert p.load > 0 and o.compute == p.compute
    assert o.load == pytest.approx(max(0.0, p.load - p.compute), abs=1e-15)


@pytest.mark.parametrize("override, key", [
    ("cluster.replica.host_adapter_cache=0", "cluster.replica.host_adapter_cache"),
    ("cluster.replica.adapter_prefetch=true", "cluster.replica.adapter_prefetch"),
])
def test_bad_tier_settings_are_named(override, key):
    with pytest.raises((ConfigError, ValueError), match=key):
        run_cfg(override)


def test_a_profile_without_a_store_refuses_a_bounded_host_cache():
    with pytest.raises(ValueError, match=r"cpu-tiny.yaml: 'transfers.store_bytes_per_s' is 0"):
        run_cfg("model=tiny", "profile=cpu", "cluster.replica.host_adapter_cache=2")


def test_prefetch_hides_the_store_behind_batches_that_outlast_a_fetch():
    """PEFT runs one adapter's batch at a time, each longer than a fetch: with prefetch the next adapter is in
    host memory when its turn comes; without, every switch waits on the store."""
    wl = Workload.from_requests([RequestSpec(i * 0.05, i % 4, 100, 50) for i in range(40)], num_adapters=4)
    common = ("system=peft", "cluster.num_replicas=1", "cluster.replica.gpu_adapter_slots=1",
              "cluster.replica.host_adapter_cache=2")
    _, off = run_cfg(*common, workload=wl)
    _, on = run_cfg(*common, "cluster.replica.adapter_prefetch=true", workload=wl)
    c_off, c_on = off.recorder.counters, on.recorder.counters
    assert c_off["adapter_loads_store"] == c_off["adapter_loads"] > 30
    assert c_on["adapter_prefetches"] > 30 and c_on["adapter_loads_store"] == c_on["adapter_loads_prefetched"] == 0
    assert on.recorder.busy_ns < off.recorder.busy_ns


workloads = st.lists(
    st.tuples(st.floats(0, 3, allow_nan=False), st.integers(0, 11), st.integers(60, 600), st.integers(10, 200)),
    min_size=12, max_size=40)


@pytest.mark.parametrize("system", ["slora", "dlora", "peft"])
def test_random_workloads_keep_invariants_with_tiers(system):
    """Tiny replicas with a bounded host cache, prefetch and overlapped loads drawn per example: every request
    finishes once, memory returns, and across the examples every tier, prefetch and host eviction ran."""
    paths: Counter = Counter()

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
              derandomize=True)
    @given(rows=workloads, replicas=st.integers(1, 2), slots=st.integers(1, 3), cache=st.integers(1, 6),
           prefetch=st.booleans(), overlap=st.booleans(), kv=st.integers(60, 120))
    def one(rows, replicas, slots, cache, prefetch, overlap, kv):
        wl = Workload.from_requests([RequestSpec(t, a, p, o) for t, a, p, o in rows], num_adapters=12)
        sim, res = run_cfg(f"system={system}", f"cluster.num_replicas={replicas}",
                           f"cluster.replica.gpu_adapter_slots={slots}", f"cluster.replica.host_adapter_cache={cache}",
                           f"cluster.replica.adapter_prefetch={str(prefetch).lower()}",
                           f"cluster.replica.overlap_loads={str(overlap).lower()}", "cluster.replica.max_num_seqs=6",
                           f"cluster.replica.host_swap_bytes={40 * BLOCK_BYTES}", "cluster.replica.watermark=0.0",
                           f"cluster.replica.max_kv_blocks={kv}", workload=wl)
        check_invariants(sim, res)
        for rep in sim.cluster.replicas:
            assert len(rep.tiers.host) <= cache and len(rep.tiers.fetching) <= rep.adapter_slots
        c = res.recorder.counters
        assert c["adapter_loads"] == c["adapter_loads_host"] + c["adapter_loads_store"] + c["adapter_loads_prefetched"]
        paths.update(c)

    one()
    # PEFT's one-adapter batches outlast a fetch: its prefetches land before their loads (the test above)
    partly = () if system == "peft" else ("adapter_loads_prefetched",)
    for path in ("adapter_loads_host", "adapter_loads_store", *partly, "adapter_prefetches", "host_cache_evictions"):
        assert paths[path] > 0, f"{system}: no example exercised {path} ({dict(paths)})"


def test_fast_forward_changes_nothing_with_prefetch():
    """Prefetches start at decisions: a fast-forwarded decode run must not skip the decisions that would start
    fetches for waiting requests' adapters (the same requests.csv with fast-forward on and off)."""
    from sim_helpers import requests_csv
    rows = [RequestSpec(0.0, 0, 64, 300), RequestSpec(0.0, 1, 64, 300)] + \
        [RequestSpec(0.5 + 0.01 * i, 2 + i, 64, 4) for i in range(5)]
    w = Workload.from_requests(rows, num_adapters=7)
    common = ("system=slora", "cluster.num_replicas=1", "router=least_loaded", "cluster.replica.gpu_adapter_slots=2",
              "cluster.replica.host_adapter_cache=12", "cluster.replica.adapter_prefetch=true")
    _, ff = run_cfg(*common, workload=w)
    _, steps = run_cfg(*common, "cluster.replica.fast_forward=false", workload=w)
    assert steps.recorder.counters["adapter_prefetches"] > 0
    assert requests_csv(ff) == requests_csv(steps)


def test_a_prefetch_without_the_option_is_refused():
    """Prefetching is the option's: a decision that asks for it on a replica without it is a policy bug, named."""
    from dlora_util import add, make_replica
    from dlora_sim.core.contracts import Decision, PolicyError
    from dlora_sim.policies.dlora import DLoRAScheduler
    rep = make_replica(DLoRAScheduler())
    reqs = add(rep, [0, 1])
    with pytest.raises(PolicyError, match="adapter_prefetch"):
        rep.begin(Decision(reqs[:1], prefetch=(1,)))
