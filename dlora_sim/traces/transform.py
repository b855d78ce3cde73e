"""Reshaping a workload in time: replay a slice, compress/stretch time, scale the total rate.

- `window`: the requests arriving in [start_s, end_s), shifted so the slice starts at 0;
- `time_scale`: every arrival multiplied by a factor (0.5 replays twice as fast: the rate doubles,
  every inter-arrival halves, nothing else changes);
- `scale_rate`: keeps the time axis and changes how many requests there are, adapter by adapter,
  so each adapter's share of requests stays what it was (within one request per adapter).
  Down-scaling keeps a random subset; up-scaling adds copies of random requests of the same
  adapter placed between that request and the adapter's next one, so bursts stay where they were.
"""
from __future__ import annotations

import numpy as np

from dlora_sim.core.workload import RequestSpec, Workload


def _arrays(w: Workload) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = w.requests
    return (np.fromiter((x.arrival_s for x in r), np.float64, len(r)), np.fromiter((x.adapter for x in r), np.int64, len(r)),
            np.fromiter((x.prompt_tokens for x in r), np.int64, len(r)), np.fromiter((x.output_tokens for x in r), np.int64, len(r)))


def _rebuild(w: Workload, arrival, adapter, prompt, output, picked=None, clone=None, **meta) -> Workload:
    """The workload of these columns, sorted by arrival; `picked`: the original request of each row (None: the
    same rows), which carries each request's prefix along; `clone`: rows that copy another request's lengths,
    which get no prefix (the same hashes would make a copy's prompt identical to its original's)."""
    order = np.argsort(arrival, kind="stable")
    reqs = tuple(RequestSpec(float(arrival[i]), int(adapter[i]), int(prompt[i]), int(output[i])) for i in order)
    prefixes = None
    if w.prefixes is not None:
        source = np.arange(len(arrival)) if picked is None else np.asarray(picked)
        prefixes = tuple(() if clone is not None and clone[i] else w.prefixes[int(source[i])] for i in order)
    return Workload(requests=reqs, adapters=w.adapters, name=w.name, meta={**w.meta, **meta}, prefixes=prefixes,
                    prefix_block_tokens=w.prefix_block_tokens)


def window(w: Workload, start_s: float = 0.0, end_s: float | None = None) -> Workload:
    """Requests with start_s <= arrival < end_s, re-based to start at 0."""
    a, ad, p, o = _arrays(w)
    end = np.inf if end_s is None else end_s
    if end <= start_s:
        raise ValueError(f"window end {end_s} must be after start {start_s}")
    m = (a >= start_s) & (a < end)
    return _rebuild(w, a[m] - start_s, ad[m], p[m], o[m], np.flatnonzero(m), window_s=[start_s, end_s])


def time_scale(w: Workload, factor: float) -> Workload:
    """Multiply every arrival by `factor` (< 1 compresses time, > 1 stretches it)."""
    if not factor > 0:
        raise ValueError(f"time_scale must be > 0, got {factor}")
    a, ad, p, o = _arrays(w)
    return _rebuild(w, a * factor, ad, p, o, time_scale=factor * w.meta.get("time_scale", 1.0))


def scale_rate(w: Workload, factor: float, seed: int = 0) -> Workload:
    """Scale the number of requests by `factor`, adapter by adapter (shares kept within 1 request)."""
    if not factor > 0:
        raise ValueError(f"rate_scale must be > 0, got {factor}")
    if factor == 1.0:
        return w
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5CA1E]))
    a, ad, p, o = _arrays(w)
    end = float(a.max()) if a.size else 0.0
    pick, new_t, cloned = [], [], []
    for adapter in np.unique(ad):
        idx = np.flatnonzero(ad == adapter)
        target = int(np.floor(factor * idx.size + rng.random()))
        if target <= idx.size:
            chosen = np.sort(rng.choice(idx, size=target, replace=False))
            pick.append(chosen); new_t.append(a[chosen]); cloned.append(np.zeros(chosen.size, dtype=bool))
            continue
        extra = rng.integers(0, idx.size, size=target - idx.size)
        t = a[idx]
        gaps = np.diff(t, append=end)  # clones of an adapter's last request stay before the workload's end
        pick += [idx, idx[extra]]
        new_t += [t, t[extra] + rng.random(extra.size) * gaps[extra]]
        cloned += [np.zeros(idx.size, dtype=bool), np.ones(extra.size, dtype=bool)]
    sel = np.concatenate(pick) if pick else np.zeros(0, dtype=np.int64)
    t = np.concatenate(new_t) if new_t else np.zeros(0)
    clone = np.concatenate(cloned) if cloned else np.zeros(0, dtype=bool)
    return _rebuild(w, t, ad[sel], p[sel], o[sel], sel, clone, rate_scale=factor * w.meta.get("rate_scale", 1.0))
