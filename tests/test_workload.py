"""Synthetic workloads: deterministic, independent per-adapter streams, the popularity asked for."""
from __future__ import annotations

import numpy as np
import pytest

from dlora_sim.workload.lengths import LengthDist
from dlora_sim.workload.popularity import popularity_weights, powerlaw_weights, zipf_weights
from dlora_sim.core.workload import RequestSpec, Workload
from dlora_sim.workload.synthetic import SyntheticWorkload


def test_same_seed_same_workload_other_seed_other():
    a, b = SyntheticWorkload().build(3), SyntheticWorkload().build(3)
    assert a.requests == b.requests
    assert SyntheticWorkload().build(4).requests != a.requests


@pytest.mark.parametrize("kind,param", [("uniform", 0), ("zipf", 1.0), ("zipf", 2.0), ("powerlaw", 0.3)])
def test_adapter_shares_follow_popularity(kind, param):
    wl = SyntheticWorkload(num_adapters=8, num_requests=20000, rate=50, popularity=kind,
                           popularity_param=param).build(0)
    counts = np.bincount([r.adapter for r in wl.requests], minlength=8) / len(wl.requests)
    np.testing.assert_allclose(counts, popularity_weights(kind, 8, param), atol=0.02)


def test_rate_and_cv():
    wl = SyntheticWorkload(num_adapters=1, num_requests=20000, rate=10, cv=2.0).build(1)
    gaps = np.diff([r.arrival_s for r in wl.requests])
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)


def test_powerlaw_matches_numpy_power():
    rng = np.random.default_rng(0)
    idx = np.floor(rng.power(0.4, 200000) * 10).astype(int)
    np.testing.assert_allclose(np.bincount(idx, minlength=10) / idx.size, powerlaw_weights(10, 0.4), atol=0.005)


def test_zipf_weights():
    w = zipf_weights(4, 1.0)
    np.testing.assert_allclose(w, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))


def test_lengths_and_validation():
    rng = np.random.default_rng(0)
    assert set(LengthDist("fixed", value=7).sample(rng, 5)) == {7}
    u = LengthDist("uniform", low=8, high=12).sample(rng, 1000)
    assert u.min() >= 8 and u.max() < 12
    with pytest.raises(ValueError, match="low < high"):
        LengthDist("uniform", low=5, high=5)
    with pytest.raises(ValueError, match="workload.popularity: unknown"):
        popularity_weights("pareto", 4)
    with pytest.raises(ValueError, match="sorted by arrival"):
        Workload(requests=(RequestSpec(1.0, 0, 1, 1), RequestSpec(0.5, 0, 1, 1)),
                 adapters=Workload.from_requests([], 1).adapters)
