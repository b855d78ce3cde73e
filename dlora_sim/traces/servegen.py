"""ServeGen per-client rate series (Alibaba Model Studio, arXiv:2505.09999).

Files, one client per chunk: `chunk-<id>-trace.csv` (no header; one row per 600 s window:
window_start_s, rate req/s, inter-arrival CV, fitted family Gamma|Weibull|'' when idle, shape, scale)
and, for some clients, `chunk-<id>-dataset.json` ({6-hour window start: {"input_tokens": "<python
dict token -> prob>", "output_tokens": ...}}). Requests are generated per window with the window's
count (rate x 600, the real count) and fitted family, each client on its own RNG stream derived
from (seed, client id), so adding or dropping a client never changes another's arrivals.
Input and output lengths are drawn independently from their marginals (the data gives no joint).
"""
from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from dlora_sim.traces._parse import open_text, to_float
from dlora_sim.traces.arrivals import cumulative_round, spread_in_windows
from dlora_sim.core.errors import TraceFormatError
from dlora_sim.traces.lengths import LengthSource
from dlora_sim.traces.raw import RawRequests

WINDOW_S = 600.0
LENGTH_WINDOW_S = 21600.0
FAMILIES = ("Gamma", "Weibull", "")
_CHUNK = re.compile(r"chunk-(\d+)-trace\.csv$")


@dataclass(frozen=True)
class ClientSeries:
    """One client's windows: start (s), rate (req/s), CV, fitted family and its (shape, scale)."""

    client: str
    start_s: np.ndarray
    rate: np.ndarray
    cv: np.ndarray
    family: np.ndarray
    shape: np.ndarray

    def expected_counts(self, start_s: float = 0.0, end_s: float = float("inf")) -> float:
        """Requests the trace records for windows starting in [start_s, end_s)."""
        m = (self.start_s >= start_s) & (self.start_s < end_s)
        return float((self.rate[m] * WINDOW_S).sum())


def client_files(folder: Path) -> dict[str, Path]:
    """Client id -> trace CSV, sorted numerically."""
    found = {}
    for p in Path(folder).iterdir():
        m = _CHUNK.search(p.name)
        if m:
            found[m.group(1)] = p
    if not found:
        raise FileNotFoundError(f"{folder}: no chunk-<id>-trace.csv files (is this a ServeGen model folder?)")
    return dict(sorted(found.items(), key=lambda kv: int(kv[0])))


def read_client(path: Path, client: str, end_s: float = float("inf")) -> ClientSeries:
    """Parse one client's CSV up to `end_s` (rows are time-ordered), validating every field.

    A vectorised pass reads well-formed files; anything it rejects is re-read row by row, which
    raises the TraceFormatError naming the line.
    """
    fast = _read_client_fast(Path(path), client, end_s)
    return fast if fast is not None else _read_client_rows(Path(path), client, end_s)


def _read_client_fast(path: Path, client: str, end_s: float) -> ClientSeries | None:
    with open_text(path) as fh:
        rows = [line.rstrip("\r\n").split(",") for line in fh if line.strip()]
    if any(len(r) != 6 for r in rows):
        return None
    try:
        num = np.array([[r[0], r[1], r[2]] for r in rows], dtype=np.float64).reshape(-1, 3)
        shape = np.array([r[4].strip() or "0" for r in rows], dtype=np.float64)
        np.array([r[5].strip() or "0" for r in rows], dtype=np.float64)
    except ValueError:
        return None
    fam = np.array([r[3].strip() for r in rows], dtype=object)
    t, rate, cv = num[:, 0], num[:, 1], num[:, 2]
    ok = (np.isfinite(num).all() and np.isfinite(shape).all() and (t >= 0).all() and (np.diff(t) > 0).all()
          and (rate >= 0).all() and (cv >= 0).all() and set(fam) <= set(FAMILIES)
          and not ((fam != "") & (rate > 0) & (shape <= 0)).any())
    if not ok:
        return None
    m = t < end_s
    return ClientSeries(client, t[m], rate[m], cv[m], fam[m], shape[m])


def _read_client_rows(path: Path, client: str, end_s: float) -> ClientSeries:
    starts, rates, cvs, fams, shapes = [], [], [], [], []
    last = -np.inf
    with open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            f = line.rstrip("\r\n").split(",")
            if len(f) < 6:
                raise TraceFormatError(path, line_no, f"row has {len(f)} fields, expected 6 "
                                       "(window_start_s,rate,cv,family,shape,scale; truncated row?)")
            t = to_float(path, line_no, "window_start_s", f[0], minimum=0.0)
            if t <= last:
                raise TraceFormatError(path, line_no, f"window start {t} not after previous {last}", "window_start_s")
            last = t
            if t >= end_s:
                break
            rate = to_float(path, line_no, "rate", f[1], minimum=0.0)
            cv = to_float(path, line_no, "cv", f[2], minimum=0.0)
            fam = f[3].strip()
            if fam not in FAMILIES:
                raise TraceFormatError(path, line_no, f"unknown inter-arrival family {fam!r}; want Gamma or Weibull", "family")
            shape = to_float(path, line_no, "shape", f[4]) if f[4].strip() else 0.0
            if fam and rate > 0 and shape <= 0:
                raise TraceFormatError(path, line_no, f"{fam} shape must be > 0, got {shape}", "shape")
            to_float(path, line_no, "scale", f[5]) if f[5].strip() else 0.0
            starts.append(t); rates.append(rate); cvs.append(cv); fams.append(fam); shapes.append(shape)
    return ClientSeries(client, np.asarray(starts), np.asarray(rates), np.asarray(cvs), np.asarray(fams, dtype=object),
                        np.asarray(shapes))


@lru_cache(maxsize=16)
def read_folder(folder: str, end_s: float = float("inf")) -> tuple[ClientSeries, ...]:
    """Every client of a ServeGen model folder (cached: m-large is 12 MB of CSV)."""
    return tuple(read_client(p, c, end_s) for c, p in client_files(Path(folder)).items())


def client_stream(seed: int, client: str, purpose: int) -> np.random.Generator:
    """An RNG stream that depends only on (seed, client, purpose)."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(client.encode()), purpose]))


def generate_arrivals(series: ClientSeries, seed: int, start_s: float, end_s: float,
                      rate_scale: float = 1.0, iat: str = "fitted") -> np.ndarray:
    """Arrival times of one client for windows starting in [start_s, end_s), cut to [start_s, end_s).

    iat: "fitted" uses each window's Gamma/Weibull fit; "cv" uses Gamma with the window's CV.
    """
    if iat not in ("fitted", "cv"):
        raise ValueError(f"iat must be 'fitted' or 'cv', got {iat!r}")
    rng = client_stream(seed, series.client, 0)
    m = (series.start_s + WINDOW_S > start_s) & (series.start_s < end_s)
    counts = cumulative_round(series.rate[m] * WINDOW_S * rate_scale, rng)
    fam, shape, cv = series.family[m], series.shape[m], series.cv[m]
    active = counts > 0
    reps = counts[active] + 1
    fam_e = np.repeat(fam[active] if iat == "fitted" else np.full(fam.shape, "", dtype=object)[active], reps)
    shape_e = np.repeat(shape[active], reps)
    cv_e = np.repeat(cv[active], reps)
    gaps = np.empty(int(reps.sum()))
    g = fam_e == "Gamma"
    w = fam_e == "Weibull"
    o = ~(g | w)  # active window without a fit: Gamma with the window's CV (Poisson if CV is 0)
    gaps[g] = rng.gamma(shape_e[g])
    gaps[w] = rng.weibull(shape_e[w])
    other_shape = np.where(cv_e[o] > 0, 1.0 / np.maximum(cv_e[o], 1e-6) ** 2, 1.0)
    gaps[o] = rng.gamma(other_shape)
    t = spread_in_windows(counts, series.start_s[m], WINDOW_S, gaps)
    t = t[(t >= start_s) & (t < end_s)]
    return np.sort(t)


def generate(folder: str | Path, seed: int, start_s: float = 0.0, end_s: float = float("inf"),
             rate_scale: float = 1.0, clients: list[str] | None = None, iat: str = "fitted") -> RawRequests:
    """All clients' arrivals in [start_s, end_s) (trace time), keyed by client id; no lengths yet."""
    series = read_folder(str(folder), end_s if np.isfinite(end_s) else float("inf"))
    if clients is not None:
        series = tuple(s for s in series if s.client in set(map(str, clients)))
    times, keys = [], []
    for s in series:
        t = generate_arrivals(s, seed, start_s, end_s, rate_scale, iat)
        times.append(t)
        keys.append(np.full(t.size, s.client, dtype=object))
    arrival = np.concatenate(times) if times else np.zeros(0)
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=object)
    return RawRequests(arrival, key=key).sorted()


# ---- per-client length distributions (m-small) ----

_PAIR = re.compile(r"(-?\d+)\s*:\s*([-+0-9.eE]+)")


def parse_pmf(path: Path, window: str, field: str, text: str) -> tuple[np.ndarray, np.ndarray] | None:
    """'{token: prob, ...}' -> (tokens, cumulative probs); None for an empty window."""
    pairs = _PAIR.findall(text)
    if not pairs:
        if text.strip() not in ("{}", ""):
            raise TraceFormatError(path, None, f"window {window}: cannot parse distribution", field)
        return None
    arr = np.asarray(pairs, dtype=np.float64)
    tokens, probs = arr[:, 0].astype(np.int64), arr[:, 1]
    if (tokens < 0).any() or (probs < 0).any() or probs.sum() <= 0:
        raise TraceFormatError(path, None, f"window {window}: negative token count or probability", field)
    return tokens, np.cumsum(probs) / probs.sum()


@lru_cache(maxsize=64)
def read_lengths(path: str) -> dict[float, tuple]:
    """6-hour window start -> (input pmf, output pmf), only windows with data."""
    p = Path(path)
    try:
        with open_text(p) as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as e:
        raise TraceFormatError(p, e.lineno, f"invalid JSON ({e.msg}; truncated file?)") from None
    out = {}
    for window, d in doc.items():
        for key in ("input_tokens", "output_tokens"):
            if key not in d:
                raise TraceFormatError(p, None, f"window {window} lacks {key!r}", key)
        inp = parse_pmf(p, window, "input_tokens", d["input_tokens"])
        outp = parse_pmf(p, window, "output_tokens", d["output_tokens"])
        if inp is not None and outp is not None:
            out[float(window)] = (inp, outp)
    return out


def sample_client_lengths(folder: Path, client: str, arrival_s: np.ndarray, seed: int,
                          fallback: LengthSource | None, start_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Lengths for one client's requests from its 6-hour distribution (nearest window with data).

    `arrival_s` is in trace time minus start_s. Clients without a dataset file use `fallback`.
    """
    rng = client_stream(seed, client, 1)
    path = Path(folder) / f"chunk-{client}-dataset.json"
    dists = read_lengths(str(path)) if path.exists() else {}
    if not dists:
        if fallback is None:
            raise ValueError(f"ServeGen client {client} has no length distribution ({path}) and no fallback lengths")
        return fallback.sample(arrival_s.size, rng)
    keys = np.array(sorted(dists))
    win = np.floor((arrival_s + start_s) / LENGTH_WINDOW_S) * LENGTH_WINDOW_S
    nearest = keys[np.abs(win[:, None] - keys[None, :]).argmin(axis=1)] if arrival_s.size else win
    prompts = np.empty(arrival_s.size, dtype=np.int64)
    outputs = np.empty(arrival_s.size, dtype=np.int64)
    u = rng.random((arrival_s.size, 2))
    for k in np.unique(nearest):
        sel = nearest == k
        (ti, ci), (to, co) = dists[float(k)]
        prompts[sel] = ti[np.minimum(np.searchsorted(ci, u[sel, 0], side="right"), ti.size - 1)]
        outputs[sel] = to[np.minimum(np.searchsorted(co, u[sel, 1], side="right"), to.size - 1)]
    return prompts, outputs
