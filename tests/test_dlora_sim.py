"""dlora in whole simulations: fast-forward exactness, the starvation guard, threshold tuning."""
from __future__ import annotations

import numpy as np

from dlora_util import iterations_csv, requests_csv, run
from dlora_sim.workload.spec import RequestSpec, Workload

SKEWED = ["system=dlora", "cluster=single", "workload.num_adapters=8", "workload.num_requests=250",
          "workload.rate=4.5", "workload.popularity_param=2.0", "charts=false"]


def test_fast_forward_on_and_off_give_identical_runs():
    sim_on, on = run(*SKEWED, "cluster.replica.fast_forward=true")
    sim_off, off = run(*SKEWED, "cluster.replica.fast_forward=false")
    assert requests_csv(on) == requests_csv(off)
    assert iterations_csv(on) == iterations_csv(off)
    s_on, s_off = sim_on.replicas[0].scheduler, sim_off.replicas[0].scheduler
    assert s_on.tuner.evaluations == s_off.tuner.evaluations and s_on.tuner.evaluations
    assert on.recorder.counters["switches"] > 2     # the run did switch modes and force batches
    assert any(row[10] for row in on.recorder.rows)
    assert s_on.ledger.total() == 0                 # zero-sum over a whole run


def _hot_cold(n: int = 400, rate: float = 3.5, seed: int = 1) -> Workload:
    """One adapter with 95% of the traffic, one with 5%; Poisson arrivals, lengths uniform in [8, 512)."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    cold = rng.random(n) < 0.05
    return Workload.from_requests(
        [RequestSpec(float(x - t[0]), int(c), int(p), int(o))
         for x, c, p, o in zip(t, cold, rng.integers(8, 512, n), rng.integers(8, 512, n))], 2)


def test_starvation_guard_bounds_the_cold_adapters_queueing_delay():
    wl = _hot_cold()
    delays = {}
    for guard in (True, False):
        sim, res = run("system=dlora", "cluster=single", f"scheduler.guard={str(guard).lower()}", "charts=false",
                       workload=wl)
        cold = [r for r in res.requests if r.adapter == 1]
        assert cold and all(r.finish > 0 for r in cold)
        delays[guard] = [((r.finish - r.arrival - r.exec_ns) / 1e9, r.output_tokens) for r in cold]
        rep = sim.replicas[0]
        w_iters, w_s = rep.scheduler.starvation_bound(rep)
    per_iteration_s = w_s / w_iters
    # documented: a lone cold request waits at most (its output tokens + W) iterations
    for q, out in delays[True]:
        assert q <= (out + w_iters) * per_iteration_s, (q, out)
    worst_on, worst_off = max(q for q, _ in delays[True]), max(q for q, _ in delays[False])
    assert worst_off > 3 * worst_on, (worst_on, worst_off)
    assert any(q > (out + w_iters) * per_iteration_s for q, out in delays[False])   # without it: beyond the bound


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
    sched = sim.replicas[0].scheduler
    tuner = sched.tuner
    first = res.recorder.rows[0][11]
    evals = tuner.evaluations
    # the single-adapter phase ran merged on adapter 0 and beat unmerged-only: theta_right fell ...
    assert evals[0][0] == 0 and evals[0][1] > evals[0][2]
    assert tuner.theta_right < first["theta_right"]
    # ... and the uniform traffic's unmerged phase beat merged-only: theta_left rose
    unmerged = [e for e in evals if e[0] is None]
    assert unmerged and all(x_u > x_m for _, x_m, x_u in unmerged)
    assert tuner.theta_left > first["theta_left"]
    assert tuner.theta_left < tuner.theta_right
    last = res.recorder.rows[-1][11]                # iterations.csv shows the same values
    assert (last["theta_left"], last["theta_right"]) == (round(tuner.theta_left, 6), round(tuner.theta_right, 6))
