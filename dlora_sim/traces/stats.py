"""What a trace looks like: request rate, length percentiles, per-source skew, and charts.

Request-level traces are summarised from their requests. Rate-series traces are summarised from
their recorded counts (ServeGen: rate x 600 s per window; Azure Functions 2019: per-minute counts),
so the numbers are the trace's own, not a sample; ServeGen m-small lengths are percentiles of the
per-client distributions weighted by each client's requests in each 6-hour window (sampled).
Skew is over the trace's sources (functions, clients); traces without one (Azure LLM, Mooncake)
have no per-adapter skew of their own: it comes from the adapter mapping chosen.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dlora_sim.traces import registry
from dlora_sim.traces.raw import RawRequests

PERCENTILES = (50, 90, 99)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of per-source request counts (0 = all equal, -> 1 = one source has all)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = x.size
    if n == 0 or x.sum() == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


def top_share(counts: np.ndarray, fraction: float = 0.1) -> float:
    """Share of requests from the most popular `fraction` of sources (at least one source)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    if x.size == 0 or x.sum() == 0:
        return 0.0
    k = max(1, int(np.ceil(fraction * x.size)))
    return float(x[:k].sum() / x.sum())


@dataclass
class TraceStats:
    name: str
    requests: float
    duration_s: float
    mean_rate: float
    peak_rate: float
    rate_bin_s: float
    prompt: dict | None = None
    output: dict | None = None
    sources: int | None = None
    top10_share: float | None = None
    gini: float | None = None
    note: str = ""
    # chart data, not printed
    rate_series: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    prompt_sample: np.ndarray | None = field(default=None, repr=False)
    output_sample: np.ndarray | None = field(default=None, repr=False)
    source_counts: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("rate_series", "prompt_sample", "output_sample", "source_counts"):
            d.pop(k)
        return d


def _pct(x: np.ndarray) -> dict:
    return {"mean": float(np.mean(x)), **{f"p{q}": float(np.percentile(x, q)) for q in PERCENTILES}}


def _from_counts(name, series, bin_s, counts=None, prompt=None, output=None, note="") -> TraceStats:
    total = float(series.sum())
    duration = series.size * bin_s
    s = TraceStats(name=name, requests=total, duration_s=duration, mean_rate=total / duration if duration else 0.0,
                   peak_rate=float(series.max() / bin_s) if series.size else 0.0, rate_bin_s=bin_s,
                   rate_series=series / bin_s, note=note)
    if prompt is not None:
        s.prompt, s.output, s.prompt_sample, s.output_sample = _pct(prompt), _pct(output), prompt, output
    if counts is not None:
        counts = np.asarray(counts, dtype=np.float64)
        counts = counts[counts > 0]
        s.sources, s.top10_share, s.gini, s.source_counts = int(counts.size), top_share(counts), gini(counts), counts
    return s


def stats_from_requests(name: str, raw: RawRequests, bin_s: float = 60.0) -> TraceStats:
    """Stats of a request-level trace; rate is requests per second in `bin_s` bins."""
    dur = float(raw.arrival_s.max()) if len(raw) else 0.0
    nbins = max(1, int(np.ceil((dur + 1e-9) / bin_s)))
    series = np.bincount(np.minimum((raw.arrival_s // bin_s).astype(np.int64), nbins - 1), minlength=nbins)
    counts = None
    if raw.key is not None:
        _, counts = np.unique(raw.key.astype(str), return_counts=True)
    s = _from_counts(name, series.astype(np.float64), bin_s, counts,
                     raw.prompt_tokens if raw.has_lengths else None, raw.output_tokens if raw.has_lengths else None,
                     "" if raw.key is not None else "no per-request source: adapter skew comes from the mapping")
    s.duration_s = dur  # first to last arrival, not rounded to bins
    s.mean_rate = len(raw) / dur if dur > 0 else 0.0
    return s


def stats_servegen(name: str, folder: Path, length_samples: int = 20000, seed: int = 0) -> TraceStats:
    from dlora_sim.traces import servegen

    series = servegen.read_folder(str(folder))
    nwin = max(s.start_s.size for s in series)
    per_window = np.zeros(nwin)
    counts = np.zeros(len(series))
    for i, s in enumerate(series):
        c = s.rate * servegen.WINDOW_S
        per_window[: c.size] += c
        counts[i] = c.sum()
    prompt = output = None
    # lengths: mixture over (client, 6-h window) weighted by the requests recorded there
    comps, weights = [], []
    for s in series:
        path = Path(folder) / f"chunk-{s.client}-dataset.json"
        if not path.exists():
            continue
        dists = servegen.read_lengths(str(path))
        if not dists:
            continue
        keys = np.array(sorted(dists))
        for k in keys:
            m = (s.start_s >= k) & (s.start_s < k + servegen.LENGTH_WINDOW_S)
            wgt = float((s.rate[m] * servegen.WINDOW_S).sum())
            if wgt > 0:
                comps.append(dists[float(k)])
                weights.append(wgt)
    note = f"{len(series)} clients; counts are the recorded rate x 600 s"
    if comps:
        rng = np.random.default_rng(seed)
        w = np.asarray(weights) / np.sum(weights)
        pick = rng.choice(len(comps), size=length_samples, p=w)
        prompt = np.empty(length_samples, dtype=np.int64)
        output = np.empty(length_samples, dtype=np.int64)
        u = rng.random((length_samples, 2))
        for j in np.unique(pick):
            sel = pick == j
            (ti, ci), (to, co) = comps[j]
            prompt[sel] = ti[np.minimum(np.searchsorted(ci, u[sel, 0], side="right"), ti.size - 1)]
            output[sel] = to[np.minimum(np.searchsorted(co, u[sel, 1], side="right"), to.size - 1)]
        note += f"; lengths: {length_samples} samples of the per-client distributions, weighted by requests"
    else:
        note += "; no length distributions in this folder"
    return _from_counts(name, per_window, servegen.WINDOW_S, counts, prompt, output, note)


def stats_maf2019(name: str, path: Path) -> TraceStats:
    from dlora_sim.traces.azure_functions import read_maf2019

    _, mat = read_maf2019(path)
    return _from_counts(name, mat.sum(axis=0).astype(np.float64), 60.0, mat.sum(axis=1),
                        note="per-minute invocation counts; no token lengths")


def trace_stats(name: str, path: str | None = None) -> TraceStats:
    """Stats of a registered trace by name (files found via the registry unless `path`)."""
    entry = registry.get_entry(name)
    if entry.format == "servegen":
        return stats_servegen(name, registry.resolve(name, relpath=entry.root, path=path))
    if entry.format == "maf2019":
        p = registry.resolve(name, relpath="invocations_per_function_md.anon.d01.csv", path=path)
        return stats_maf2019(name, p)
    if entry.format == "maf2021":
        from dlora_sim.traces.azure_functions import load_maf2021
        p = registry.resolve(name, relpath="AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt", path=path)
        return stats_from_requests(name, load_maf2021(p))
    from dlora_sim.traces.lengths import load_registered
    return stats_from_requests(name, load_registered(name, path))


def format_stats(s: TraceStats) -> str:
    lines = [f"{s.name}: {s.requests:,.0f} requests over {s.duration_s / 3600:.2f} h; "
             f"rate mean {s.mean_rate:.3f} req/s, peak {s.peak_rate:.3f} req/s ({s.rate_bin_s:.0f} s bins)"]
    for label, d in (("prompt", s.prompt), ("output", s.output)):
        if d:
            lines.append(f"  {label} tokens: mean {d['mean']:.1f}, p50 {d['p50']:.0f}, p90 {d['p90']:.0f}, p99 {d['p99']:.0f}")
    if s.sources is not None:
        lines.append(f"  sources: {s.sources}; top-10% share {s.top10_share:.3f}; Gini {s.gini:.3f}")
    if s.note:
        lines.append(f"  note: {s.note}")
    return "\n".join(lines)


def save_charts(s: TraceStats, out_dir: Path) -> list[Path]:
    """Rate over time, length CDFs and popularity (rank vs. requests) as PNGs in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 3))
    t = np.arange(s.rate_series.size) * s.rate_bin_s / 3600.0
    ax.plot(t, s.rate_series, lw=0.8)
    ax.set(xlabel="time (h)", ylabel="requests/s", title=f"{s.name}: rate ({s.rate_bin_s:.0f} s bins)")
    paths.append(_save(fig, out_dir / f"{s.name}-rate.png"))

    if s.prompt_sample is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, x in (("prompt", s.prompt_sample), ("output", s.output_sample)):
            xs = np.sort(np.maximum(x, 1))
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label)
        ax.set(xscale="log", xlabel="tokens", ylabel="CDF", title=f"{s.name}: lengths")
        ax.legend()
        paths.append(_save(fig, out_dir / f"{s.name}-lengths.png"))

    if s.source_counts is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        c = np.sort(s.source_counts)[::-1]
        ax.loglog(np.arange(1, c.size + 1), c, marker=".", lw=0.8)
        ax.set(xlabel="source rank", ylabel="requests",
               title=f"{s.name}: popularity (top-10% {s.top10_share:.2f}, Gini {s.gini:.2f})")
        paths.append(_save(fig, out_dir / f"{s.name}-popularity.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write_json(s: TraceStats, out_dir: Path) -> Path:
    p = Path(out_dir) / f"{s.name}-stats.json"
    p.write_text(json.dumps(s.summary(), indent=2))
    return p
