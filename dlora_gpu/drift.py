"""The CPU's speed drift, measured by a fixed reference probe.

A shared CPU VM changes speed by 10-30% over seconds and more between runs. A fixed piece of work timed
just before a run of the model tells how fast the machine is at that moment; scaling the run's time by
(a reference probe time / this probe time) refers it to the speed of the reference. The
microbenchmarks scale every point this way (the reference: their session's median probe, written into
the fitted profile), and the runtime's `measured` clock scales every iteration to that same reference,
so a replay and the profile it is compared with are timed at one machine speed.

The probe is a chain of small ops shaped like a batch-1 decode of the tiny model (`DispatchProbe`):
its time is interpreter and op-dispatch speed, which dominates the CPU runtime's steps. A BLAS matmul
(the earlier probe) moves 2-3x more than the steps do, so it over-corrects; measured side by side over
5 minutes (`benchmarks/drift_probe.py`, results in benchmarks/results/drift_probe.md), the dispatch
probe moves in step with batch-1 and batch-8 decodes (slope 0.9-1.0) and leaves 14-26% of their slow
drift between 200-step blocks, where the matmul left 60%.
"""
from __future__ import annotations

import math
import time
from collections import deque
from statistics import median


class MatmulProbe:
    """An n x n float32 matmul on seeded random inputs; calling it returns its wall seconds."""

    def __init__(self, size: int = 384, seed: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed)
        self.size = size
        self._a, self._b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)

    def __call__(self) -> float:
        import torch
        t0 = time.perf_counter()
        torch.mm(self._a, self._b)
        return time.perf_counter() - t0

    def describe(self) -> str:
        return f"{self.size}x{self.size} float32 matmul"


class DispatchProbe:
    """Two decoder layers' worth of small ops (RMS norm, projections, gated MLP) on one 1 x `hidden`
    token, float32: its time is the per-op dispatch cost more than arithmetic."""

    def __init__(self, hidden: int = 256, intermediate: int = 688, layers: int = 2, seed: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed + 1)
        self.hidden, self.intermediate, self.layers = hidden, intermediate, layers
        self._x = torch.randn(1, hidden, generator=g)
        self._attn = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
        self._up = torch.randn(hidden, intermediate, generator=g) / math.sqrt(hidden)
        self._down = torch.randn(intermediate, hidden, generator=g) / math.sqrt(intermediate)

    def __call__(self) -> float:
        import torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = self._x
            for _ in range(self.layers):
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
                q, k, v = y @ self._attn, y @ self._attn, y @ self._attn
                x = x + (torch.softmax(q * k, -1) * v) @ self._attn
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
                x = x + (torch.nn.functional.silu(y @ self._up) * (y @ self._up)) @ self._down
        return time.perf_counter() - t0

    def describe(self) -> str:
        return f"{self.layers}-layer 1x{self.hidden} float32 op chain (norm, projections, gated MLP)"


# the probe the microbenchmarks and the measured clock scale by (the module doc says why)
ReferenceProbe = DispatchProbe


class DriftScale:
    """Factors that refer timings to `reference_s`: each call probes once and divides the reference by
    the median of the last `window` probes (one probe is noisy; the drift is correlated over ~10
    iterations). `factors` keeps every factor applied, for the run's summary."""

    def __init__(self, reference_s: float, probe: ReferenceProbe | None = None, window: int = 9):
        if not reference_s > 0:
            raise ValueError(f"the reference probe time must be > 0, got {reference_s!r}")
        self.reference_s = reference_s
        self.probe = probe or ReferenceProbe()
        self._recent: deque[float] = deque(maxlen=window)
        self.factors: list[float] = []

    def factor(self) -> float:
        self._recent.append(self.probe())
        k = self.reference_s / median(self._recent)
        self.factors.append(k)
        return k

    def summary(self) -> dict:
        f = sorted(self.factors)
        return {"scaled": True, "probe": self.probe.describe(), "reference_probe_s": self.reference_s,
                "window": self._recent.maxlen, "factors": len(f),
                "factor_median": round(median(f), 4) if f else None,
                "factor_min": round(f[0], 4) if f else None, "factor_max": round(f[-1], 4) if f else None}
