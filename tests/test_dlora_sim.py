"""dlora in whole simulations: fast-forward exactness, the starvation guard, threshold tuning."""
from __future__ import annotations

import numpy as np

from dlora_util import iterations_csv, requests_csv, run
from dlora_sim.core.workload import RequestSpec, Workload

# The dLoRA artifact's unmerged cost (einsum over resident adapters) makes merging worth ~12 ms an
# iteration: the regime in which the scheduler's mode changes, forcing and tuning are exercised.
EINSUM = "profile.lora=einsum"
SKEWED = ["system=dlora", "cluster=single", "workload.num_adapters=8", "workload.num_requests=250",
          "workload.rate=4.5", "workload.popularity_param=2.0", "charts=false", EINSUM]


def test_fast_forward_on_and_off_give_identical_runs():
    sim_on, on = run(*SKEWED, "cluster.replica.fast_forward=true")
    sim_off, off = run(*SKEWED, "cluster.replica.fast_forward=false")
    assert requests_csv(on) == requests_csv(off)
    assert iterations_csv(on) == iterations_csv(off)
    s_on, s_off = sim_on.cluster.schedulers[0], sim_off.cluster.schedulers[0]
    assert s_on.tuner.evaluations == s_off.tuner.evaluations and s_on.tuner.evaluations
    # in-phase window evaluations land on the same iterations: stable runs stop at a window's end
    assert s_on.tuner.window_evaluations == s_off.tuner.window_evaluations > 0
    assert on.recorder.counters["switches"] > 2     # the run did switch modes and force batches
    assert any(row.forced for row in on.recorder.rows)
    assert s_on.ledger.total() == 0                 # zero-sum over a whole run


def _hot_cold(n: int = 400, rate: float = 5.0, seed: int = 1) -> Workload:
    """One adapter with 95% of the traffic, one with 5%; Poisson arrivals, lengths uniform in [8, 512)."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    cold = rng.random(n) < 0.05
    return Workload.from_requests(
        [RequestSpec(float(x - t[0]), int(c), int(p), int(o))
         for x, c, p, o in zip(t, cold, rng.integers(8, 512, n), rng.integers(8, 512, n))], 2)


def test_starvation_guard_meets_its_documented_bound_at_5_req_s():
    """95/5 traffic at 5 req/s (beyond unmerged capacity): the cold adapter is never displaced longer
    than starvation_bound(view); without the guard it is displaced for tens of seconds."""
    waits = {}
    for guard in (True, False):
        sim, res = run("system=dlora", "cluster=single", f"scheduler.guard={str(guard).lower()}", "charts=false",
                       EINSUM, workload=_hot_cold())
        assert all(r.finish > 0 for r in res.requests)
        rep, scheduler = sim.cluster.replicas[0], sim.cluster.schedulers[0]
        waits[guard] = scheduler.ledger.max_wait_s[1]
        iters, bound_s = scheduler.starvation_bound(rep)
    assert iters == 48 and 3.0 < bound_s < 4.0        # 48 iterations + a 2 s dwell on A100 / Llama-2-7B
    assert waits[True] <= bound_s, waits
    assert waits[False] > 5 * bound_s, waits


def test_guard_episodes_end_and_do_not_thrash_under_overload():
    """Uniform traffic over 8 adapters at twice the replica's capacity: the guard runs episodes (merged
    on a backlogged adapter, or unmerged), each released, and switching stays a small share of busy time."""
    sim, res = run("system=dlora", "cluster=single", "workload.num_adapters=8", "workload.popularity_param=0",
                   "workload.num_requests=300", "workload.rate=8", "cluster.replica.max_num_seqs=16", "charts=false",
                   EINSUM)
    rows = res.recorder.rows
    busy = sum(r.duration for r in rows)
    switching = sum(r.switch for r in rows) * 1e9
    forced = [r.forced for r in rows]
    assert any(forced) and not all(forced[len(forced) // 2:])     # episodes happen, and they end
    assert switching / busy < 0.03, switching / busy
    sched = sim.cluster.schedulers[0]
    assert sched.ledger.total() == 0


def test_thresholds_are_tuned_at_every_mode_change_and_tuning_changes_outcomes():
    args = ["system=dlora", "cluster=single", "workload.num_adapters=8", "workload.popularity_param=1",
            "workload.num_requests=300", "workload.rate=2.5", "cluster.replica.max_num_seqs=16", "charts=false",
            EINSUM]
    sim, on = run(*args)
    _, off = run(*args, "scheduler.tune=false")
    tuner = sim.cluster.schedulers[0].tuner
    changes = sum(1 for a, b in zip(on.recorder.rows, on.recorder.rows[1:]) if a.merged != b.merged)
    assert changes > 10 and len(tuner.evaluations) == changes   # one evaluation per transition
    assert requests_csv(on) != requests_csv(off)
    first, last = on.recorder.rows[0].info, on.recorder.rows[-1].info
    assert (first["theta_left"], first["theta_right"]) != (last["theta_left"], last["theta_right"])
    assert {r.info["theta_right"] for r in off.recorder.rows} == {1.0}


def test_thresholds_move_as_documented_from_one_adapter_to_uniform():
    """Documented direction: one adapter -> merged phases beat unmerged-only, theta_right falls (merge
    sooner); uniform over eight -> unmerged phases beat merged-only, theta_left rises (unmerge sooner)."""
    rng = np.random.default_rng(3)
    n1, n2, rate = 250, 350, 4.0
    t = np.cumsum(rng.exponential(1 / rate, n1 + n2))
    ads = np.concatenate([np.zeros(n1, int), rng.integers(0, 8, n2)])
    wl = Workload.from_requests([RequestSpec(float(x - t[0]), int(a), int(p), int(o)) for x, a, p, o in
                                 zip(t, ads, rng.integers(8, 512, n1 + n2), rng.integers(8, 512, n1 + n2))], 8)
    sim, res = run("system=dlora", "cluster=single", "charts=false", workload=wl)
    sched = sim.cluster.schedulers[0]
    tuner = sched.tuner
    first = res.recorder.rows[0].info
    evals = tuner.evaluations
    # the single-adapter phase ran merged on adapter 0 and beat unmerged-only: theta_right fell ...
    assert evals[0][0] == 0 and evals[0][1] > evals[0][2]
    assert tuner.theta_right < first["theta_right"]
    # ... and the uniform traffic's unmerged phase beat merged-only: theta_left rose
    unmerged = [e for e in evals if e[0] is None]
    assert unmerged and all(x_u > x_m for _, x_m, x_u in unmerged)
    assert tuner.theta_left > first["theta_left"]
    assert tuner.theta_left < tuner.theta_right
    last = res.recorder.rows[-1].info                # iterations.csv shows the same values
    assert (last["theta_left"], last["theta_right"]) == (round(tuner.theta_left, 6), round(tuner.theta_right, 6))
