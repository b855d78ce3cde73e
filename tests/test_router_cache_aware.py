"""SGLang's cache-aware router (dlora_sim/policies/cache_aware.py): on hand-set replica states, its tree of sent
prompts, the threshold, the balance rule and its blindness to adapters; end to end in a cluster."""
from __future__ import annotations

import pytest

from sim_helpers import requests_csv, run_cfg
from test_engine_invariants import check_invariants
from test_router_affinity import Cluster, rep
from dlora_sim.core.request import Request
from dlora_sim.policies.cache_aware import CacheAware, _chain

_ids = iter(range(10**6))


def req(adapter: int, *prefix: int) -> Request:
    r = Request(id=next(_ids), adapter=adapter, arrival=0, prompt_tokens=512 * len(prefix), output_tokens=10)
    r.prefix = tuple(prefix)
    return r


def test_a_prompt_goes_where_its_opening_went_whatever_its_adapter():
    c = Cluster([rep(), rep(), rep()])
    router = CacheAware()
    assert router.dispatch(req(1, 10, 11, 90), c) == 0            # nothing sent yet: the least loaded
    c.replicas[0].queue.append(req(1))                            # it waits there
    assert router.dispatch(req(2, 20, 21), c) == 1                # no match: the least loaded
    c.replicas[1].queue.append(req(2))
    assert router.dispatch(req(5, 10, 11, 91), c) == 0            # 2 of 3 blocks match replica 0's, adapter 5 or not
    assert router.dispatch(req(1, 10, 12, 92), c) == 0            # 1 of 3 = 0.33 > 0.3, though replica 2 is idle
    assert router.dispatch(req(1, 12, 10, 11), c) == 2            # blocks match only as an opening: the least loaded


def test_the_threshold_and_the_chain():
    c = Cluster([rep(), rep()])
    router = CacheAware(cache_threshold=0.5)
    router.dispatch(req(0, 1, 2, 3, 4), c)                       # replica 0's tree: 1, 12, 123, 1234
    c.replicas[0].queue.append(req(0))
    assert router.dispatch(req(0, 1, 2, 8, 9), c) == 1            # 2 of 4 = 0.5, not above 0.5: least loaded
    c.replicas[1].queue.append(req(0))
    assert router.dispatch(req(0, 1, 2, 3, 9), c) == 0            # 3 of 4 on replica 0
    assert router.dispatch(req(0, 9, 2, 3, 4), c) == 0            # no opening matches: the least loaded, ties -> 0
    assert CacheAware(cache_threshold=0.5).dispatch(req(0), Cluster([rep(0), rep()])) == 1   # no text: least loaded


def test_imbalanced_loads_go_to_the_least_loaded_even_with_a_match():
    router = CacheAware(balance_abs_threshold=4, balance_rel_threshold=1.5)
    c = Cluster([rep(), rep()])
    assert router.dispatch(req(0, 1, 2), c) == 0
    c.replicas[0].queue.extend(req(0) for _ in range(6))          # 6 vs 0: 6 - 0 > 4 and 6 > 0 x 1.5
    assert router.dispatch(req(0, 1, 2), c) == 1
    c.replicas[1].queue.extend(req(0) for _ in range(4))          # 6 vs 4: 2 is not above 4, balanced again
    assert router.dispatch(req(0, 1, 2, 7), c) == 0               # both trees match 2 of 3: the lower id, not load
    c.replicas[0].queue.extend(req(0) for _ in range(4))          # 10 vs 4: both thresholds exceeded
    assert router.dispatch(req(0, 1, 2, 8), c) == 1
    c.replicas[1].queue.extend(req(0) for _ in range(3))          # 10 vs 7: 3 is under 4; 10 < 7 x 1.5 too
    assert router.dispatch(req(0, 1, 2, 7), c) == 0               # balanced: the longer match (3 vs 2), busier


def test_the_tree_forgets_its_least_recently_used_blocks():
    router = CacheAware(max_tree_blocks=3)
    c = Cluster([rep()])
    router.dispatch(req(0, 1, 2), c)
    router.dispatch(req(0, 5, 6), c)
    assert list(router._trees[0]) == [_chain((1, 2))[1], *_chain((5, 6))]   # the least recent block, (1,), went


@pytest.mark.parametrize("value", ["router.cache_threshold=1.5", "router.balance_rel_threshold=0.5",
                                   "router.max_tree_blocks=0"])
def test_bad_settings_are_named(value):
    with pytest.raises(Exception, match=value.split("=")[0].replace(".", r"\.")):
        run_cfg("system=sglang_router", value)


def test_a_cluster_behind_it_serves_every_request_once_and_deterministically():
    over = ("system=sglang_router", "cluster.num_replicas=4", "workload.num_adapters=16", "workload.num_requests=400",
            "workload.rate=40", "cluster.replica.gpu_adapter_slots=4", "workload.shared_prefix_groups=4",
            "workload.shared_prefix_tokens=1024", "cluster.replica.prefix_caching=true")
    sim, res = run_cfg(*over)
    check_invariants(sim, res)
    assert len({r.replica for r in res.requests}) == 4
    by_group: dict = {}
    for r in res.requests:   # each system prompt's requests mostly on one replica: the router follows the text
        by_group.setdefault(r.prefix[:2], []).append(r.replica)
    assert all(max(map(v.count, set(v))) / len(v) > 0.5 for v in by_group.values())
    _, again = run_cfg(*over)
    assert requests_csv(again) == requests_csv(res)
