"""The CPU's speed drift, measured by a fixed reference matmul.

A shared CPU VM changes speed by 10-25% over seconds and more between runs. A fixed float32 matmul
timed just before a run of the model tells how fast the machine is at that moment; scaling the run's
time by (a reference probe time / this probe time) refers it to the speed of the reference. The
microbenchmarks scale every point this way (the reference: their session's median probe, written into
the fitted profile), and the runtime's `measured` clock scales every iteration to that same reference,
so a replay and the profile it is compared with are timed at one machine speed.
"""
from __future__ import annotations

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


class DriftScale:
    """Factors that refer timings to `reference_s`: each call probes once and divides the reference by
    the median of the last `window` probes (one probe is noisy; the drift is correlated over ~10
    iterations). `factors` keeps every factor applied, for the run's summary."""

    def __init__(self, reference_s: float, probe: MatmulProbe | None = None, window: int = 9):
        if not reference_s > 0:
            raise ValueError(f"the reference probe time must be > 0, got {reference_s!r}")
        self.reference_s = reference_s
        self.probe = probe or MatmulProbe()
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
