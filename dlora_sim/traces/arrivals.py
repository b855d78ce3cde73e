"""Placing a known number of arrivals inside each time window, keeping the window's burstiness.

Rate-series traces (ServeGen's 10-minute windows, Azure Functions' per-minute counts) give how many
requests fall in a window and the shape of the inter-arrival distribution, not the timestamps. We
draw n+1 gaps from that distribution and rescale them to span the window exactly (the approach
ServeGen's own generator takes), so counts are exact and the shape (CV) is kept. Counts themselves
come from `cumulative_round`, which keeps each source's total within one request of its expectation
at any rate scale: that is what keeps per-adapter shares right when the rate is scaled down.
"""
from __future__ import annotations

import numpy as np


def cumulative_round(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts per window whose running sum tracks the expected running sum within 1.

    Systematic rounding with one random phase: unbiased per window, and exact integers stay exact.
    """
    expected = np.asarray(expected, dtype=np.float64)
    if expected.size == 0:
        return np.zeros(0, dtype=np.int64)
    cum = np.round(np.cumsum(expected), 9)  # absorb float noise so integral rates stay integral
    phase = 0.0 if np.allclose(expected, np.round(expected), atol=1e-9) else rng.random()
    totals = np.floor(cum + phase).astype(np.int64)
    counts = np.diff(np.concatenate([[int(np.floor(phase))], totals]))
    return counts


def spread_in_windows(counts: np.ndarray, starts: np.ndarray, length: float, gaps: np.ndarray) -> np.ndarray:
    """Arrival times: counts[i] points in [starts[i], starts[i] + length) from pre-drawn gaps.

    `gaps` must hold counts.sum() + (number of windows with counts > 0) positive draws, laid out
    window by window (n+1 per active window); the last gap of each window is dropped after scaling.
    """
    counts = np.asarray(counts, dtype=np.int64)
    active = counts > 0
    c = counts[active]
    s = np.asarray(starts, dtype=np.float64)[active]
    if c.size == 0:
        return np.zeros(0)
    sizes = c + 1
    if gaps.size != sizes.sum():
        raise ValueError(f"need {sizes.sum()} gaps, got {gaps.size}")
    ends = np.cumsum(sizes)
    begins = ends - sizes
    group = np.repeat(np.arange(c.size), sizes)
    # Heavy-tailed fits (Weibull shape << 1) overflow to inf and underflow to 0: clip, then divide
    # by each window's largest gap so the running sum below stays finite and precise.
    g = np.clip(np.nan_to_num(np.asarray(gaps, dtype=np.float64), nan=1.0, posinf=1e300), 1e-300, 1e300)
    g = g / np.maximum.reduceat(g, begins)[group]
    cs = np.cumsum(g)
    before = np.concatenate([[0.0], cs])[begins]
    total = cs[ends - 1] - before
    pos = (cs - before[group]) / total[group]
    keep = np.ones(cs.size, dtype=bool)
    keep[ends - 1] = False
    start = s[group[keep]]
    return np.minimum(start + pos[keep] * length, np.nextafter(start + length, -np.inf))


def gamma_gaps(n: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma gaps with the given coefficient of variation (shape 1/cv^2; cv = 1 is Poisson); scale is irrelevant."""
    if cv <= 0:
        return np.ones(n)
    return rng.gamma(1.0 / cv**2, 1.0, size=n)
