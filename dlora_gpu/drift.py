"""The CPU's speed drift, measured by a fixed reference probe.

A shared CPU VM changes speed over seconds and more between runs (benchmarks/results/drift_probe.md). A fixed piece of work timed
just before a run of the model tells how fast the machine is at that moment; scaling the run's time by
(a reference probe time / this probe time) refers it to the speed of the reference. The
microbenchmarks scale every point this way (the reference: their session's median probe, written into
the fitted profile), and the runtime's `measured` clock scales every iteration to that same reference,
so a replay and the profile it is compared with are timed at one machine speed.

The probe is a real decode step of the runtime's own model on a scratch cache (`StepProbe`: eight
sequences at context 128, base weights, one cold run), so it is slowed by whatever slows the runtime's
steps. `benchmarks/drift_probe.py` compares it side by side with the earlier references (a warm chain of
small ops shaped like a batch-1 decode, `DispatchProbe`, and a 384x384 matmul) against merged batch-1,
merged batch-8 and unmerged batch-8 decode steps: it leaves less of their slow drift than those and moves
about as much as they do (benchmarks/results/drift_probe.md). A 2-sequence step probe tracks batch-1
steps best but the larger steps, which dominate a replay's time, less. Like the steps, it reads slower
right after a large prefill; the microbenchmarks and the measured clock both probe right before every
timed step, so that falls on both alike.
"""
from __future__ import annotations

import math
import time
from collections import deque
from statistics import median
from typing import Callable


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
    token, float32: its time is the per-op dispatch cost more than arithmetic. `warm` > 0 runs the chain
    once untimed and returns the fastest of `warm` more; 0 times one run (the previous reference,
    `benchmarks/drift_probe.py` compares it)."""

    def __init__(self, hidden: int = 256, intermediate: int = 688, layers: int = 2, seed: int = 0, warm: int = 0):
        import torch
        g = torch.Generator().manual_seed(seed + 1)
        self.hidden, self.intermediate, self.layers, self.warm = hidden, intermediate, layers, warm
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
        if not self.warm:
            return self._chain()
        self._chain()
        return min(self._chain() for _ in range(self.warm))

    def describe(self) -> str:
        how = f"fastest of {self.warm} after a warm-up run" if self.warm else "one run"
        return f"{self.layers}-layer 1x{self.hidden} float32 op chain (norm, projections, gated MLP), {how}"


class StepProbe:
    """A real decode step of the runtime's own model: `seqs` sequences at `context` tokens on a scratch
    KV cache of its own (the serving cache and the replica state are untouched), base weights, the
    batch laid out and run as the executor runs a step; calling it returns its wall seconds (one run,
    cold). Its time moves with whatever moves the runtime's steps (interpreter, op dispatch, memory)."""

    def __init__(self, model, *, seqs: int = 8, context: int = 128, backend: str = "torch"):
        import torch

        from dlora_gpu.kv_cache import PagedKVCache
        self.model, self.seqs, self.context, self.backend = model, seqs, context, backend
        self._torch = torch
        block = 16
        self._kv = PagedKVCache(seqs * -(-context // block), block, model.cfg, model.dtype, model.device)
        for i in range(seqs):
            self._kv.grow(i, self._kv.blocks_for(context))
        self._decodes = [(i, 1 + i, context, -1) for i in range(seqs)]

    def __call__(self) -> float:
        from dlora_gpu.batch import FlatBatch
        t0 = time.perf_counter()
        with self._torch.inference_mode():
            batch = FlatBatch.build([], self._decodes, kv=self._kv)
            self.model(batch, self._kv, None, attention_backend=self.backend).argmax(dim=-1).tolist()
        return time.perf_counter() - t0

    def describe(self) -> str:
        c = self.model.cfg
        return (f"runtime decode step of {self.seqs} sequence(s) at context {self.context}, base weights "
                f"({c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, {self.model.dtype}), one run")


def reference_probe(model, backend: str = "torch") -> StepProbe:
    """The probe the microbenchmarks and the measured clock scale by (the module doc says why)."""
    return StepProbe(model, backend=backend)


class DriftScale:
    """Factors that refer timings to `reference_s`: each call probes once and divides the reference by
    the median of the last `window` probes (one probe is noisy; the drift changes slowly, over several
    iterations). The microbenchmarks and the measured clock both scale this way, so a profile and a
    replay are referred to the reference alike. `times` keeps every probe and `factors` every factor
    applied, for the summaries."""

    def __init__(self, reference_s: float, probe: Callable[[], float], window: int = 9):
        if not reference_s > 0:
            raise ValueError(f"the reference probe time must be > 0, got {reference_s!r}")
        self.reference_s = reference_s
        self.probe = probe
        self._recent: deque[float] = deque(maxlen=window)
        self.times: list[float] = []
        self.factors: list[float] = []

    def factor(self) -> float:
        t = self.probe()
        self.times.append(t)
        self._recent.append(t)
        k = self.reference_s / median(self._recent)
        self.factors.append(k)
        return k

    def summary(self) -> dict:
        f = sorted(self.factors)
        return {"scaled": True, "probe": self.probe.describe(), "reference_probe_s": self.reference_s,
                "window": self._recent.maxlen, "factors": len(f),
                "factor_median": round(median(f), 4) if f else None,
                "factor_min": round(f[0], 4) if f else None, "factor_max": round(f[-1], 4) if f else None}


def calibrated_probe(model, profile, backend: str = "torch") -> tuple[StepProbe | None, str]:
    """The reference probe of `model` if the profile's calibration recorded this same probe (then timings
    can be referred to the calibration's machine speed), else None and why not."""
    ref, desc = profile.provenance.reference_probe_s, profile.provenance.reference_probe
    if getattr(getattr(model, "device", None), "type", "cpu") != "cpu":
        return None, "a GPU's speed does not drift like a shared CPU's"
    if not ref > 0:
        return None, f"profile {profile.name} records no reference probe (provenance.reference_probe_s)"
    probe = reference_probe(model, backend)
    if desc != probe.describe():
        return None, (f"profile {profile.name}'s reference probe is of {desc or 'an unnamed probe'!r} "
                      f"(provenance.reference_probe), this runtime probes with {probe.describe()!r}: "
                      "re-run dlora-calibrate to scale to it")
    return probe, ""


def machine_factor(model, profile, backend: str = "torch", runs: int = 30) -> tuple[float | None, str]:
    """This machine's speed now against the profile's calibration: the reference probe's median now over
    its median then (> 1: slower now), or None and why it cannot be told (`calibrated_probe`)."""
    import statistics

    probe, why = calibrated_probe(model, profile, backend)
    if probe is None:
        return None, why
    ref = profile.provenance.reference_probe_s
    for _ in range(10):
        probe()
    now = statistics.median(probe() for _ in range(runs))
    return now / ref, f"reference probe {now * 1e3:.2f} ms now, {ref * 1e3:.2f} ms at the calibration"
