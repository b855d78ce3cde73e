"""Soft LoRA-affinity routers (dlora_sim/policies/affinity.py): the inference extension's decision tree and a
router-side adapter LRU, on hand-set replica states, and end to end in a cluster."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sim_helpers import requests_csv, run_cfg
from test_engine_invariants import check_invariants
from dlora_sim.core.request import Request
from dlora_sim.policies.affinity import AdapterLRU, LoraAffinity


@dataclass
class Rep:
    """The replica state a router reads (ReplicaView's fields it uses)."""

    queue: list[Request] = field(default_factory=list)
    in_flight: list[Request] = field(default_factory=list)
    free_blocks: int = 100
    total_blocks: int = 100
    adapter_slots: int = 2
    resident: tuple[int, ...] = ()


@dataclass
class Cluster:
    replicas: list[Rep]
    hosts: dict = field(default_factory=dict)


_ids = iter(range(10**6))


def req(adapter: int) -> Request:
    return Request(id=next(_ids), adapter=adapter, arrival=0, prompt_tokens=10, output_tokens=10)


def rep(*adapters: int, running: int = 0, **kw) -> Rep:
    q = [req(a) for a in adapters]
    return Rep(queue=q, in_flight=q[:running], **kw)


def test_affinity_first_below_the_queue_threshold():
    c = Cluster([rep(), rep(7, 7, 7), rep()])
    assert LoraAffinity(affinity_share=1.0).dispatch(req(7), c) == 1   # busier, but its adapter is there
    # without the affinity draw: a replica with room for another adapter, here the idle ones
    assert LoraAffinity(affinity_share=0.0).dispatch(req(7), c) in (0, 2)


def test_a_replica_without_room_for_another_adapter_is_no_candidate_for_a_new_one():
    c = Cluster([rep(1, 2), rep(3, 3, 3, 3)])   # replica 0: two distinct adapters = its two slots
    assert LoraAffinity(affinity_share=0.0).dispatch(req(9), c) == 1


def test_above_the_threshold_everywhere_the_least_queue_comes_first():
    c = Cluster([rep(*[7] * 12), rep(*[1] * 5), rep(*[7] * 9)])
    assert LoraAffinity(queue_threshold=4, affinity_share=1.0).dispatch(req(7), c) == 1
    # below it, affinity wins over a shorter queue
    assert LoraAffinity(queue_threshold=20, affinity_share=1.0).dispatch(req(7), c) == 2


def test_running_requests_do_not_count_as_waiting():
    c = Cluster([rep(*[7] * 10, running=10), rep(1, 1)])
    assert LoraAffinity(queue_threshold=2, affinity_share=1.0).dispatch(req(7), c) == 0


def test_bad_thresholds_are_named():
    with pytest.raises(ValueError, match="router.affinity_share"):
        LoraAffinity(affinity_share=1.5)
    with pytest.raises(ValueError, match="router.queue_threshold"):
        AdapterLRU(queue_threshold=-1)


def test_the_router_lru_keeps_an_adapter_where_it_sent_it_until_that_replica_is_too_busy():
    c = Cluster([rep(), rep()])
    r = AdapterLRU(queue_threshold=2)
    first = r.dispatch(req(5), c)
    c.replicas[first].queue.append(req(5))
    assert r.dispatch(req(5), c) == first          # its LRU has 5 there, though the other replica is idle
    c.replicas[first].queue += [req(5), req(5)]    # 3 outstanding > threshold 2
    assert r.dispatch(req(5), c) == 1 - first


def test_the_router_lru_holds_as_many_adapters_as_the_replicas_slots():
    c = Cluster([rep(adapter_slots=2)])
    r = AdapterLRU()
    for a in (1, 2, 3):
        r.dispatch(req(a), c)
    assert list(r._lru[0]) == [2, 3]


@pytest.mark.parametrize("router", ["lora_affinity", "adapter_lru"])
def test_a_cluster_behind_each_router_serves_every_request_once_and_deterministically(router):
    over = ("system=vllm_lora", f"router={router}", "cluster.num_replicas=4", "workload.num_adapters=32",
            "workload.num_requests=400", "workload.rate=40", "cluster.replica.gpu_adapter_slots=4")
    sim, res = run_cfg(*over)
    check_invariants(sim, res)
    assert len({r.replica for r in res.requests}) == 4
    _, again = run_cfg(*over)
    assert requests_csv(again) == requests_csv(res)
