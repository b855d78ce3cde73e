"""The CPU's speed drift, measured by a fixed reference probe.

A shared CPU VM changes speed by 10-30% over seconds and more between runs. A fixed piece of work timed
just before a run of the model tells how fast the machine is at that moment; scaling the run's time by
(a reference probe time / this probe time) refers it to the speed of the reference. The
microbenchmarks scale every point this way (the reference: their session's median probe, written into
the fitted profile), and the runtime's `measured` clock scales every iteration to that same reference,
so a replay and the profile it is compared with are timed at one machine speed.

The probe is a chain of small ops shaped like a batch-1 decode of the tiny model (`DispatchProbe`),
timed warm (the fastest of 2 after one untimed run): its time is interpreter and op-dispatch speed,
which dominates the CPU runtime's steps, and not the cache state the last step left. Measured side by
side (`benchmarks/drift_probe.py`; benchmarks/results/drift_probe.md, 3140 rounds): the 384x384 matmul
(the earlier probe) moves 2.2-2.7x as much as batch-1 and batch-8 decode steps, so it over-corrects;
the chain timed cold tracks the steps best but runs 13% slower after a large prefill than after a
small step, so it scales by what ran before (a serving run's steps are smaller than the
microbenchmarks': a replay's factors came out 1.43 where its real clock said the machine was not
faster); timed warm it is as fast after either (1.02-1.04), moves 0.7-0.9x as much as the steps and
leaves about half of their slow drift (block sd 0.064 / 0.060 against 0.115 / 0.135 unscaled; the
matmul: 0.066 / 0.087).
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
    token, float32: its time is the per-op dispatch cost more than arithmetic. `settle` > 0 first runs a
    `settle` x `settle` matmul untimed, so the chain always starts from the cache state that leaves, not
    the one the model's last step left. `warm` > 0 runs the chain once untimed and returns the fastest of
    `warm` more; 0 times one run."""

    def __init__(self, hidden: int = 256, intermediate: int = 688, layers: int = 2, seed: int = 0, warm: int = 0,
                 settle: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed + 1)
        self.hidden, self.intermediate, self.layers, self.warm = hidden, intermediate, layers, warm
        self._settle = MatmulProbe(settle, seed) if settle else None
        self._x = torch.randn(1, hidden, generator=g)
        self._attn = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
        self._up = torch.randn(hidden, intermediate, generator=g) / math.sqrt(hidden)
        self._down = torch.randn(intermediate, hidden, generator=g) / math.sqrt(intermediate)

    def _chain(self) -> float:
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

    def __call__(self) -> float:
        if self._settle is not None:
            self._settle()
        if not self.warm:
            return self._chain()
        self._chain()
        return min(self._chain() for _ in range(self.warm))

    def describe(self) -> str:
        how = f"fastest of {self.warm} after a warm-up run" if self.warm else "one run"
        after = f" after an untimed {self._settle.describe()}" if self._settle is not None else ""
        return f"{self.layers}-layer 1x{self.hidden} float32 op chain (norm, projections, gated MLP), {how}{after}"


def reference_probe(seed: int = 0) -> DispatchProbe:
    """The probe the microbenchmarks and the measured clock scale by (the module doc says why)."""
    return DispatchProbe(seed=seed, warm=2)


class DriftScale:
    """Factors that refer timings to `reference_s`: each call probes once and divides the reference by
    the median of the last `window` probes (one probe is noisy; the drift is correlated over ~10
    iterations). `factors` keeps every factor applied, for the run's summary."""

    def __init__(self, reference_s: float, probe: DispatchProbe | None = None, window: int = 9):
        if not reference_s > 0:
            raise ValueError(f"the reference probe time must be > 0, got {reference_s!r}")
        self.reference_s = reference_s
        self.probe = probe or reference_probe()
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
