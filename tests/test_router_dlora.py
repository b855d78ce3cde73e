"""Greedy placement properties, cost dispatch in seconds, and the proactive baseline's substitution."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sim_helpers import compose_cfg
from dlora_sim.des.engine import build_simulation
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.paths import PROFILES_DIR
from dlora_sim.policies.dlora_router import DLoRARouter
from dlora_sim.policies.placement import greedy_placement
from dlora_sim.policies.proactive import ProactiveRouter
from dlora_sim.core.profile import load_profile
from dlora_sim.core.request import Request, State
from dlora_sim.core.workload import AdapterSpec, RequestSpec, Workload

COST = CostModel(load_profile(PROFILES_DIR / "a100-80gb-llama-2-7b.yaml"))


@settings(max_examples=60, deadline=None)
@given(demand=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), m=st.integers(1, 6),
       slots=st.integers(1, 8), kv=st.integers(100, 5000))
def test_placement_properties(demand, m, slots, kv) -> None:
    n = len(demand)
    if n > m * slots:
        with pytest.raises(ValueError):
            greedy_placement(demand, [kv] * m, [slots] * m)
        return
    hosts = greedy_placement(demand, [kv] * m, [slots] * m)
    assert all(len(h) >= 1 and len(set(h)) == len(h) and all(0 <= j < m for j in h) for h in hosts)
    per = [sum(j in h for h in hosts) for j in range(m)]
    assert max(per) <= slots
    total = sum(map(len, hosts))
    positive = sum(d > 0 for d in demand)
    if m * slots >= n + m - 1 and positive > 0 and (n + m - 1) <= n + positive * (m - 1):
        assert total == n + m - 1
    assert total <= n + m - 1


def test_placement_replicates_the_hot_adapter_and_balances_counts() -> None:
    demand = [0.5] + [0.5 / 15] * 15
    hosts = greedy_placement(demand, [1000] * 4, [8] * 4)
    assert len(hosts[0]) >= 2
    assert sum(map(len, hosts)) == 16 + 4 - 1
    per = [sum(j in h for h in hosts) for j in range(4)]
    assert max(per) - min(per) <= 3


def _view(j: int, queue: list[Request]):
    return SimpleNamespace(id=j, queue=queue, max_num_seqs=8, total_blocks=1000, adapter_slots=4, block_size=16)


def _cluster(queues: list[list[Request]], hosts: dict, n_adapters: int = 3):
    return SimpleNamespace(replicas=[_view(j, q) for j, q in enumerate(queues)], cost=COST, hosts=hosts,
                           adapters=[AdapterSpec(a, 16) for a in range(n_adapters)],
                           demand=[1 / n_adapters] * n_adapters, workload_demand=[1 / n_adapters] * n_adapters, now=0.0)


def req(i: int, adapter: int, out: int = 200, generated: int = 0, state: State = State.QUEUED) -> Request:
    r = Request(i, adapter, i, 100, out)
    r.generated, r.state = generated, state
    return r


def test_dispatch_counts_seconds_of_work_not_requests() -> None:
    """Replica 0 has more requests but nearly done; replica 1 has one long request: 0 is cheaper."""
    router = DLoRARouter()
    router.work.lengths = "oracle"
    q0 = [req(i, 0, out=200, generated=195, state=State.RESIDENT) for i in range(3)]
    q1 = [req(10, 0, out=500)]
    cl = _cluster([q0, q1], {0: (0, 1)})
    assert router.dispatch(req(20, 0), cl) == 0
    c0, c1 = router.replica_cost(0, req(21, 0), cl), router.replica_cost(1, req(21, 0), cl)
    assert 0 < c0 < c1   # light replicas do not tie at zero (seconds, no integer division)


def test_dispatch_only_to_hosts() -> None:
    router = DLoRARouter()
    cl = _cluster([[req(i, 1) for i in range(20)], []], {1: (0,)})
    assert router.dispatch(req(99, 1), cl) == 0


def test_merged_discount_follows_the_profile() -> None:
    router = DLoRARouter()
    router.work.bind(COST, 8)
    ratio = COST.decode_time(8, 512, merged=True) / COST.decode_time(8, 512, merged=False, distinct_adapters=1)
    assert router.work.merged_ratio == pytest.approx(ratio) and ratio < 1
    full = [req(i, 0) for i in range(8)]
    mixed = [req(i, i % 4) for i in range(8)]
    assert router.work.queue_s(full, 8) == pytest.approx(router.work.queue_s(mixed, 8) * ratio)


def test_proactive_substitutes_an_idle_replicated_adapter_paying_its_load() -> None:
    router = ProactiveRouter()
    router._hosts = [{0}, {0, 1}, {1}]       # adapter 1 replicated, idle on replica 1
    router.work.lengths = "oracle"
    busy = [req(i, 0, out=400) for i in range(16)]
    cl = _cluster([busy, []], {})
    assert router.dispatch(req(50, 0), cl) == 1
    assert 1 in router._hosts[0] and 1 not in router._hosts[1] and router.substitutions == 1
    # no idle replicated adapter left on replica 1 -> adapter 0's requests stay on its host (0)
    router2 = ProactiveRouter()
    router2._hosts = [{0}, {1}, {1}]
    assert router2.dispatch(req(51, 0), _cluster([busy, []], {})) == 0


def test_proactive_cost_includes_load_time() -> None:
    router = ProactiveRouter()
    router._hosts = [{0}, {0, 1}, {1}]
    router.work.lengths = "oracle"
    light = [req(0, 0, out=2)]
    cl = _cluster([light, []], {})
    load = COST.load_time(COST.profile.adapter_bytes(16))
    c0 = router.replica_cost(0, req(5, 0), cl)
    c1 = router.replica_cost(1, req(5, 0), cl)
    bar = min(c0 - router.min_gain_s, (1 - router.min_gain) * c0)   # it must clearly pay
    expected = 1 if c1 + load < bar else 0
    assert router.dispatch(req(5, 0), cl) == expected


def test_proactive_substitutes_only_when_it_clearly_pays_and_cools_down() -> None:
    router = ProactiveRouter(min_gain_s=0.0, min_gain=0.5, cooldown_s=5.0)
    router._hosts = [{0}, {0, 1}, {1, 2}, {2}]   # adapter -> hosts
    router.work.lengths = "oracle"
    # replica 0 a little busier than replica 1: not worth moving an adapter for
    slight = _cluster([[req(i, 0, out=30) for i in range(2)], [req(9, 1, out=10, state=State.RESIDENT)]], {},
                      n_adapters=4)
    assert router.dispatch(req(20, 0), slight) == 0 and router.substitutions == 0
    busy = [req(i, 0, out=400) for i in range(16)]
    cl = _cluster([busy, [], []], {}, n_adapters=4)
    assert router.dispatch(req(21, 0), cl) == 1 and router.substitutions == 1   # it pays: substitute
    assert router._hosts[0] == {0, 1} and router._hosts[1] == {0}   # adapter 1, idle there, made room
    # adapter 3 lives on a busy replica 2; idle replica 1 could take it (adapter 2 is idle there) but it
    # just changed: it cools down first
    cl = _cluster([busy, [], [req(i, 3, out=400) for i in range(30, 46)], []], {}, n_adapters=4)
    assert router.dispatch(req(23, 3), cl) == 2 and router.substitutions == 1
    cl.now = 6.0
    assert router.dispatch(req(24, 3), cl) == 1 and router.substitutions == 2


def test_more_adapters_than_gpu_slots_preload_within_slots() -> None:
    """64 adapters on 4 replicas of 8 slots: both routers host them all and preload only what fits."""
    from sim_helpers import run_cfg
    for router in ("dlora", "proactive"):
        sim, res = run_cfg("system=slora", f"router={router}", "workload.num_adapters=64",
                           "workload.num_requests=200")
        assert all(r.finish >= 0 for r in res.requests)
        assert all(len(rep.resident) <= rep.adapter_slots for rep in sim.cluster.replicas)


def test_placement_accepts_vanishing_demand() -> None:
    """Demands so small that d / hosts underflows (hypothesis found 5e-324) are valid input."""
    assert greedy_placement([5e-324], [100, 100], [2, 2]) == [[0, 1]]
    hosts = greedy_placement([5e-324, 5e-324, 0.0], [100, 100, 50], [2, 2, 2])
    assert sorted(j for h in hosts for j in h) == [0, 1, 1, 2, 2]


def _skewed_later(hot_later: int, n: int = 400) -> Workload:
    """Uniform traffic for 10 s, then nearly all of it on `hot_later`."""
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.exponential(1 / 20, n))
    ads = [int(a) if x < 10 else (hot_later if rng.random() < 0.9 else int(a))
           for x, a in zip(t, rng.integers(0, 8, n))]
    return Workload.from_requests([RequestSpec(float(x), a, 64, 32) for x, a in zip(t, ads)], 8)


@pytest.mark.parametrize("router", ["dlora", "proactive"])
def test_placement_at_t0_cannot_see_later_requests(router):
    def placed(hot: int, demand: str):
        sim = build_simulation(compose_cfg("cluster=eight", f"router={router}", f"router.demand={demand}"),
                               _skewed_later(hot))
        return sim.cluster.router.place(sim.cluster)

    a, b = placed(hot=0, demand="online"), placed(hot=7, demand="online")
    assert a.hosts == b.hosts and a.preload == b.preload      # the future differs, the placement does not
    # the look-ahead option does see it (and is only an explicitly labelled upper bound)
    oa, ob = placed(hot=0, demand="oracle"), placed(hot=7, demand="oracle")
    assert (oa.hosts, oa.preload) != (ob.hosts, ob.preload)


def test_cached_queue_prices_equal_fresh_ones_at_every_dispatch() -> None:
    """The router prices each replica from the sums it keeps, counting fast-forwarded iterations that are
    not applied yet, and each replica keeps its queue grouped by adapter; at every dispatch of a run with
    migration, both must equal what a fresh pass over the queue gives once every replica is brought up
    to now (a missed update of a sum or of the index would not)."""
    cfg = compose_cfg("system=dlora", "cluster=eight", "router.extra_placements=7", "workload.num_adapters=32",
                      "workload.rate=40", "workload.num_requests=600", "migration.always=true", "charts=false",
                      "progress=false")
    sim = build_simulation(cfg)
    router, checked, lagging = sim.cluster.router, [], []
    dispatch = router.dispatch

    def checking(request, cluster):
        work = router.work
        lazy = []
        for view in cluster.replicas:
            work.bind(cluster.cost, view.max_num_seqs)
            lazy.append(work.replica_ns(view))
            lagging.append(view.lag() > 0)
        sim.sync()   # now apply what fast-forward deferred: the prices must not change
        for view, price in zip(cluster.replicas, lazy):
            assert price == work.queue_ns(view.queue, view.max_num_seqs) == work.replica_ns(view)
            fresh: dict[int, list] = {}
            for r in view.queue:
                fresh.setdefault(r.adapter, []).append(r)
            kept = view.by_adapter()   # the index kept by enqueue and removal: same groups, same order
            assert list(kept) == list(fresh) and all(kept[a] == fresh[a] for a in fresh)
        checked.append(sum(bool(v.queue) for v in cluster.replicas))
        chosen = dispatch(request, cluster)   # its inlined loop picks the least replica_cost, ties to the lower index
        hosts = router.candidates(request, cluster)
        assert chosen == min(hosts, key=lambda j: (router.replica_cost(j, request, cluster), j))
        return chosen

    router.dispatch = checking
    res = sim.run()
    assert len(checked) == 600 and sum(checked) > 600   # busy replicas were compared, many times over
    assert sum(lagging) > 100   # ... many of them with fast-forwarded iterations not applied yet
    assert res.recorder.counters.get("migrations", 0) > 0


@settings(max_examples=80, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 900), st.integers(1, 600), st.integers(0, 599),
                               st.sampled_from([State.QUEUED, State.RESIDENT, State.SWAPPED]), st.integers(0, 899)),
                     max_size=40),
       leave=st.lists(st.integers(0, 39), max_size=15), flying=st.lists(st.integers(0, 39), max_size=20),
       lags=st.lists(st.integers(0, 700), min_size=1, max_size=4), seqs=st.integers(1, 12),
       lengths=st.sampled_from(["estimate", "oracle"]), learnt=st.lists(st.integers(1, 700), max_size=6))
def test_the_remembered_price_equals_the_recomputed_one_under_random_queues(reqs, leave, flying, lags, seqs, lengths,
                                                                            learnt) -> None:
    """A replica's remembered price, a function of its batch in flight's lag, equals the definition
    recomputed from its requests bit for bit: whatever joined and left, whatever they generated, with
    full adapters or none, at any lag (requests overrunning their expected length), in both length modes."""
    from dlora_util import make_replica
    from dlora_sim.policies.dlora import DLoRAScheduler
    from dlora_sim.policies.estimates import WorkModel
    rep = make_replica(DLoRAScheduler(), seqs=seqs, adapters=6)
    work = WorkModel(lengths=lengths)
    work.bind(COST, seqs)
    for i, out in enumerate(learnt):   # some adapters' lengths learnt, the others at the prior
        done = Request(1000 + i, i, 0, 10, out)
        done.state = State.FINISHED
        work.track([done])
    work.harvest()
    queue = []
    for i, (a, prompt, out, gen, state, prefilled) in enumerate(reqs):
        r = Request(i, a, i, prompt, out)
        r.generated, r.state = min(gen, out - 1), state
        r.prefilled = min(prefilled, prompt + r.generated - 1) if state == State.QUEUED else 0
        rep.enqueue(r)
        queue.append(r)
    for i in sorted(set(i for i in leave if i < len(queue))):
        rep.remove(queue[i])
    rep.running = [r for i, r in enumerate(rep.queue) if i in set(flying) and r.state == State.RESIDENT]
    rep.lag_until = lambda: -1   # its lag may move at any time: no price is reused
    for lag in lags:
        rep.lag = lambda: lag
        lazy = work.replica_ns(rep)
        assert lazy == work.queue_ns(rep.queue, seqs, lag, rep.running)
    for r in rep.running:   # apply the last lag: the same price, now read from the requests alone
        r.generated += lags[-1]
    rep.version += 1
    rep.lag = lambda: 0
    assert work.replica_ns(rep) == work.queue_ns(rep.queue, seqs) == lazy


@pytest.mark.parametrize("over", [("cluster.num_replicas=8", "workload.rate=40"),
                                  ("cluster.num_replicas=4", "workload.rate=30", "cluster.replica.max_num_batched_tokens=512")])
def test_dispatch_over_every_replica_from_the_index_is_the_loops_answer(over, monkeypatch):
    """Where every replica hosts the adapter the dLoRA router reads its answer from the index of remembered
    prices; at every such dispatch of a real run the loop over all hosts, priced afresh, gives the same one."""
    from dlora_sim.policies.estimates import WorkModel
    seen = {"index": 0}
    cheapest = WorkModel.cheapest

    def checked(self, views, candidates, request, cost):
        got = cheapest(self, views, candidates, request, cost)
        if len(candidates) == len(views):
            seen["index"] += 1
            self.bind(cost, views[0].max_num_seqs)
            versions = [v.version for v in views]
            prices = [WorkModel.queue_ns(self, v.queue, v.max_num_seqs, v.lag(), v.in_flight) for v in views]
            assert got == prices.index(min(prices))
            assert [v.version for v in views] == versions   # lag() here applied nothing: the index did it already
        return got

    monkeypatch.setattr(WorkModel, "cheapest", checked)
    sim = build_simulation(compose_cfg("system=dlora", "workload.num_adapters=4", "workload.num_requests=600", *over))
    res = sim.run()
    assert seen["index"] > 500 and all(r.state == State.FINISHED for r in res.requests)


def test_a_cold_start_loads_the_placed_adapters_on_demand():
    """cluster.preload=false: dLoRA's placement still decides the hosts, but no replica holds an adapter at t=0, so
    the first request of each (replica, adapter) pays its load; with the default every placed adapter is resident."""
    over = ("system=dlora", "cluster.num_replicas=2", "workload.num_adapters=4", "workload.num_requests=60",
            "workload.rate=4")
    warm = build_simulation(compose_cfg(*over))
    warm_res = warm.run()
    cold = build_simulation(compose_cfg(*over, "cluster.preload=false"))
    cold_res = cold.run()
    assert warm_res.recorder.counters.get("adapter_loads", 0) == 0
    pairs = {(r.replica, r.adapter) for r in cold_res.requests}
    assert cold_res.recorder.counters["adapter_loads"] >= len(pairs) > 0
    assert cold.cluster.hosts == warm.cluster.hosts
    assert all(r.state == State.FINISHED for r in cold_res.requests)
