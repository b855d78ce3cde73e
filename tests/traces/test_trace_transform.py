"""Window, time scaling and rate scaling invariants."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dlora_sim.traces.arrivals import cumulative_round
from dlora_sim.traces.transform import scale_rate, time_scale, window
from dlora_sim.core.workload import RequestSpec, Workload


def _workload(seed: int, n: int = 400, adapters: int = 5) -> Workload:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.exponential(1.0, n).cumsum())
    a = rng.choice(adapters, size=n, p=np.arange(adapters, 0, -1) / np.arange(adapters, 0, -1).sum())
    return Workload.from_requests([RequestSpec(float(x), int(y), 10 + i % 7, 1 + i % 5) for i, (x, y) in enumerate(zip(t, a))],
                                  num_adapters=adapters)


def _counts(w):
    return np.bincount([r.adapter for r in w.requests], minlength=len(w.adapters))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 20.0))
def test_time_scale_divides_interarrivals(seed, speedup):
    w = _workload(seed)
    s = time_scale(w, 1.0 / speedup)
    gaps = np.diff([r.arrival_s for r in w.requests])
    np.testing.assert_allclose(np.diff([r.arrival_s for r in s.requests]), gaps / speedup, rtol=1e-9, atol=1e-9)
    assert [(r.adapter, r.prompt_tokens) for r in s.requests] == [(r.adapter, r.prompt_tokens) for r in w.requests]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 5.0))
def test_rate_scale_keeps_each_adapters_share(seed, factor):
    w = _workload(seed)
    s = scale_rate(w, factor, seed=seed)
    before, after = _counts(w), _counts(s)
    assert np.all(np.abs(after - factor * before) <= 1.0)  # within one request per adapter
    assert s.duration_s <= w.duration_s  # same time axis: more or fewer requests, not longer
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(s.requests, s.requests[1:]))


def test_window_slices_and_rebases():
    w = _workload(3)
    s = window(w, 100.0, 200.0)
    inside = [r for r in w.requests if 100.0 <= r.arrival_s < 200.0]
    assert len(s.requests) == len(inside)
    assert [r.arrival_s for r in s.requests] == pytest.approx([r.arrival_s - 100.0 for r in inside])


@given(st.lists(st.floats(0, 50), min_size=1, max_size=50), st.integers(0, 100))
def test_cumulative_round_tracks_expectation(expected, seed):
    c = cumulative_round(np.array(expected), np.random.default_rng(seed))
    assert np.all(c >= 0)
    assert np.all(np.abs(np.cumsum(c) - np.cumsum(expected)) <= 1.0 + 1e-6)


def test_cumulative_round_is_exact_on_integers():
    e = np.array([3.0, 0.0, 7.0, 1.0])
    assert cumulative_round(e, np.random.default_rng(0)).tolist() == [3, 0, 7, 1]


def test_spread_handles_overflowing_and_vanishing_gaps():
    from dlora_sim.traces.arrivals import spread_in_windows

    gaps = np.array([np.inf, 1.0, 0.0, 1e-320, 2.0, np.inf, np.inf, 3.0])  # windows of 3+1 and 3+1 gaps
    t = spread_in_windows(np.array([3, 3]), np.array([0.0, 60.0]), 60.0, gaps)
    assert np.all(np.isfinite(t)) and t.size == 6
    assert np.all((t[:3] >= 0) & (t[:3] < 60)) and np.all((t[3:] >= 60) & (t[3:] < 120))


def test_servegen_cv_mode_matches_window_cv(tmp_path):
    import trace_files as tf
    from dlora_sim.traces import servegen

    p = tf.servegen_csv(tmp_path / "chunk-0-trace.csv", [(0, 20.0, 2.0, "Weibull", 0.9, 1.0)])
    s = servegen.read_client(p, "0")
    gaps = np.diff(servegen.generate_arrivals(s, seed=0, start_s=0, end_s=600, iat="cv"))
    assert gaps.size == 11999
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)
