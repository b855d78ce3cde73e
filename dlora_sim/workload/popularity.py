"""Adapter popularity: how a request stream is split over N adapters.

One module for every skew model so synthetic generators and trace mappings agree:
- uniform and Zipf(s) give per-adapter probabilities;
- S-LoRA's power law draws an adapter index as floor(N * x), x ~ numpy's power(alpha) with CDF x**alpha
  (alpha < 1 skews towards adapter 0; alpha = 1 is uniform).
"""
from __future__ import annotations

import numpy as np


def uniform_weights(n: int) -> np.ndarray:
    _check_n(n)
    return np.full(n, 1.0 / n)


def zipf_weights(n: int, s: float) -> np.ndarray:
    """P(adapter k) proportional to 1/(k+1)**s; s=0 is uniform."""
    _check_n(n)
    if s < 0:
        raise ValueError(f"zipf exponent s must be >= 0, got {s}")
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


def powerlaw_weights(n: int, alpha: float) -> np.ndarray:
    """Exact probabilities of S-LoRA's index = floor(N * power(alpha)), P(x <= t) = t**alpha."""
    _check_n(n)
    if alpha <= 0:
        raise ValueError(f"power-law alpha must be > 0, got {alpha}")
    edges = (np.arange(n + 1, dtype=np.float64) / n) ** alpha
    return np.diff(edges)


def popularity_weights(kind: str, n: int, param: float = 1.0) -> np.ndarray:
    """Weights by name: 'uniform', 'zipf' (param = s) or 'powerlaw' (param = alpha)."""
    table = {"uniform": lambda: uniform_weights(n), "zipf": lambda: zipf_weights(n, param),
             "powerlaw": lambda: powerlaw_weights(n, param)}
    if kind not in table:
        raise ValueError(f"workload.popularity: unknown {kind!r}; valid: {sorted(table)}")
    return table[kind]()


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"number of adapters must be >= 1, got {n}")
