"""Each branch of dlora's decision on constructed queues, and the credit ledger's zero-sum property."""
from __future__ import annotations

import random

import pytest

from dlora_util import add, make_replica, set_time
from dlora_sim.policies.credits import RESOLUTION, CreditLedger
from dlora_sim.policies.dlora import DLoRAScheduler
from dlora_sim.core.request import Request


def sched(**kw) -> DLoRAScheduler:
    return DLoRAScheduler(**{"theta_left": 0.5, "theta_right": 1.0, **kw})


def adapters(d) -> list[int]:
    return [r.adapter for r in d.batch]


def test_unmerged_fcfs_when_no_adapter_dominates():
    s = sched()
    rep = make_replica(s)
    reqs = add(rep, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    d = s.schedule(rep)
    assert d.merged is None and not d.forced
    assert d.batch == reqs[:8]                      # F: the first B in arrival order
    assert d.stable and s.ledger.total() == 0 and s.ledger.max_credit() == 0   # nobody displaced
    assert set(d.load) == {0, 1, 2, 3}


def test_switch_to_merged_on_most_queued_adapter_and_pay_displaced():
    s = sched()
    rep = make_replica(s)
    add(rep, [0, 2] + [1] * 10)                     # F = [0, 2, 1 x 6]; |R_1| = 10 >= 1.0 * 8
    d = s.schedule(rep)
    assert d.merged == 1 and adapters(d) == [1] * 8 and d.load == (1,)
    assert not d.stable                             # credit moved
    assert s.ledger.value(0) == 1 and s.ledger.value(2) == 1 and s.ledger.value(1) == -2
    assert s.ledger.total() == 0


def test_stay_merged_above_theta_left_but_not_merge_from_unmerged():
    queue = [0, 1, 1, 2, 1, 1, 3, 1]                # |R_1| = 5 of |F| = 8: 0.5 <= 0.625 < 1.0
    s = sched()
    rep = make_replica(s)
    add(rep, queue)
    rep.preload([1])
    rep.merged = 1                                  # the replica is merged on adapter 1
    d = s.schedule(rep)
    assert d.merged == 1 and adapters(d) == [1] * 5
    fresh = sched()
    rep2 = make_replica(fresh)
    add(rep2, queue)
    d2 = fresh.schedule(rep2)
    assert d2.merged is None and len(d2.batch) == 8


def test_leave_merged_below_theta_left():
    s = sched()
    rep = make_replica(s)
    add(rep, [0, 1, 2, 3, 0, 2, 3, 1])              # |R_1| = 2 < 0.5 * 8
    rep.preload([1])
    rep.merged = 1
    d = s.schedule(rep)
    assert d.merged is None and len(d.batch) == 8


def _rich(s: DLoRAScheduler, adapter: int, payer: int, credit: float) -> None:
    units = round(credit * RESOLUTION)
    s.ledger.credit[adapter] = units                # moved there by earlier (zero-sum) transfers
    s.ledger.credit[payer] = -units


def test_forced_adapter_that_fills_the_batch_runs_merged_on_it():
    s = sched()
    rep = make_replica(s)
    add(rep, [1] * 10 + [0] * 9)                    # the decision would merge on 1
    _rich(s, 0, 1, s.c_right)
    d = s.schedule(rep)
    assert d.forced and d.merged == 0 and s.episode
    assert adapters(d) == [0] * 8                   # its requests alone fill a batch as large as F
    # it spent 1 per request it ran (8) and paid for adapter 1's 8 displaced requests
    assert s.ledger.value(0) == s.c_right - 16 and s.ledger.value(1) == -s.c_right + 16
    assert s.ledger.total() == 0


def test_forced_then_fcfs_fill():
    s = sched()
    rep = make_replica(s)
    reqs = add(rep, [1] * 10 + [0] * 2)             # adapter 0's two requests are the newest
    _rich(s, 0, 1, s.c_right)
    d = s.schedule(rep)
    assert d.forced and d.merged is None
    assert d.batch[:2] == reqs[10:] and d.batch[2:] == reqs[:6]   # forced first, then FCFS
    assert not d.stable


def test_forced_adapter_spends_even_when_its_batch_displaces_nobody():
    """The latch: a forced batch equal to F moves no displacement credit; spending still ends it."""
    s = sched()
    rep = make_replica(s)
    add(rep, [0, 1, 1, 1, 2])                       # F is the whole queue; nobody dominates
    _rich(s, 0, 1, s.c_right)
    seen = []
    for _ in range(100):
        d = s.schedule(rep)
        assert d.merged is None and len(d.batch) == 5
        assert not d.forced                         # the guard did not change the batch: not "forced"
        seen.append(s.ledger.value(0))
        assert s.ledger.total() == 0
        if 0 not in s.ledger.forced:
            break
    spent = int(s.c_right - s.c_left)
    # 1 per iteration its one request ran, down to c_left; released at the next decision (not forced)
    assert seen == [s.c_right - k for k in range(1, spent + 1)] + [s.c_left]
    assert 0 not in s.ledger.forced and not s.episode


def test_guard_waits_a_dwell_after_a_mode_change():
    s = sched()
    rep = make_replica(s)
    add(rep, [1] * 10 + [0] * 2)
    assert s.schedule(rep).merged == 1              # a merge: the guard waits merge_s / switch_budget
    dwell = s.dwell_s(rep, None, 1)
    assert dwell == rep.cost.profile.switch.merge_s / s.switch_budget
    _rich(s, 0, 1, s.c_right)
    rep.merged = 1
    assert not s.schedule(rep).forced               # credit at c_right, but the merge is not amortised
    set_time(rep, round(dwell * 1e9))
    d = s.schedule(rep)
    assert d.forced and d.merged is None


def test_hysteresis_and_guard_off():
    s = sched()
    rep = make_replica(s)
    add(rep, [1] * 10 + [0] * 2)
    _rich(s, 0, 1, (s.c_left + s.c_right) / 2)     # between c_left and c_right, never forced yet
    assert not s.schedule(rep).forced
    rep.merged = 1
    set_time(rep, 10 * 10**9)                      # long after that merge
    assert not s.schedule(rep).forced
    s.ledger.forced.add(0)                          # ... but inside an episode it stays forced
    assert s.schedule(rep).forced
    off = sched(guard=False)
    rep2 = make_replica(off)
    add(rep2, [1] * 10 + [0] * 2)
    _rich(off, 0, 1, 10 * off.c_right)
    d = off.schedule(rep2)
    assert not d.forced and d.merged == 1


def test_merged_adapter_is_loaded_with_eviction():
    s = sched()
    rep = make_replica(s, slots=2)
    rep.preload([2, 3])
    add(rep, [1] * 9 + [2])
    d = s.schedule(rep)
    assert d.merged == 1 and d.load == (1,) and len(d.evict) == 1 and d.evict[0] in (2, 3)
    assert d.evict == (3,)                          # fewest outstanding requests


def test_ledger_is_zero_sum_on_random_settlements():
    rng = random.Random(7)
    led = CreditLedger(c_right=4, c_left=1)
    for it in range(3000):
        reqs = [Request(i, rng.randrange(6), i, 10, 10) for i in range(rng.randrange(1, 20))]
        fcfs = rng.sample(reqs, rng.randrange(len(reqs) + 1))
        chosen = rng.sample(reqs, rng.randrange(len(reqs) + 1))
        led.settle(fcfs, chosen, float(it))
        led.release()
        led.enter()
        assert led.total() == 0
        assert all(c >= 0 for a, c in led.credit.items() if a in led.forced)
    assert led.max_credit() > 0 and led.max_wait_s


def test_bad_constants_name_the_key():
    with pytest.raises(ValueError, match="c_left"):
        DLoRAScheduler(c_right=4, c_left=8)
    with pytest.raises(ValueError, match="aimd_factor"):
        DLoRAScheduler(aimd_factor=1.0)
    with pytest.raises(ValueError, match="theta_left"):
        DLoRAScheduler(theta_left=1.5)
    with pytest.raises(ValueError, match="switch_budget"):
        DLoRAScheduler(switch_budget=0)
