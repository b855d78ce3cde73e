"""Azure Functions traces, the arrival source of the dLoRA paper.

- 2019 (Shahrad et al., ATC'20): `invocations_per_function_md.anon.dNN.csv`, one row per
  (owner, app, function, trigger) with columns HashOwner,HashApp,HashFunction,Trigger,1..1440:
  invocations in each minute of the day. Rows of the same HashFunction are summed.
- 2021 (Zhang et al., SOSP'21): `AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt`, one row per
  invocation with columns app,func,end_timestamp,duration (seconds); arrival = end - duration.
The function (HashFunction / func) is the request's key, which adapter mappings group by.
Per-minute counts become arrivals with Gamma gaps (CV 1 by default, as dLoRA) rescaled to the minute.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dlora_sim.traces._parse import csv_rows, to_float, to_int
from dlora_sim.traces.arrivals import cumulative_round, gamma_gaps, spread_in_windows
from dlora_sim.core.errors import TraceFormatError
from dlora_sim.traces.raw import RawRequests

MINUTES = 1440
META_2019 = ("HashOwner", "HashApp", "HashFunction", "Trigger")
COLUMNS_2021 = ("app", "func", "end_timestamp", "duration")


def read_maf2019(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(function keys, counts[function, minute]) from one 2019 daily file."""
    path = Path(path)
    minute_cols = [str(m) for m in range(1, MINUTES + 1)]
    rows: dict[str, np.ndarray] = {}
    for line, f, ix in csv_rows(path, META_2019 + tuple(minute_cols)):
        key = f[ix["HashFunction"]].strip()
        if not key:
            raise TraceFormatError(path, line, "empty function hash", "HashFunction")
        counts = np.empty(MINUTES, dtype=np.int64)
        for m, col in enumerate(minute_cols):
            counts[m] = to_int(path, line, col, f[ix[col]])
        rows[key] = rows[key] + counts if key in rows else counts
    keys = np.array(list(rows), dtype=object)
    mat = np.stack(list(rows.values())) if rows else np.zeros((0, MINUTES), dtype=np.int64)
    return keys, mat


def generate_maf2019(path: str | Path, seed: int, start_s: float = 0.0, end_s: float = 86400.0,
                     rate_scale: float = 1.0, cv: float = 1.0, top_functions: int | None = None) -> RawRequests:
    """Arrivals in [start_s, end_s) from per-minute counts; each function on its own RNG stream.

    `top_functions` keeps only the most-invoked functions (dLoRA maps a few hundred of them).
    """
    keys, mat = read_maf2019(path)
    order = np.lexsort((keys.astype(str), -mat.sum(axis=1)))
    if top_functions is not None:
        order = order[:top_functions]
    starts = np.arange(MINUTES, dtype=np.float64) * 60.0
    in_range = (starts + 60.0 > start_s) & (starts < end_s)
    times, fkeys = [], []
    for fi in order:
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(fi)]))
        counts = cumulative_round(mat[fi, in_range] * rate_scale, rng)
        n = int(counts.sum() + (counts > 0).sum())
        t = spread_in_windows(counts, starts[in_range], 60.0, gamma_gaps(n, cv, rng))
        t = t[(t >= start_s) & (t < end_s)]
        times.append(t)
        fkeys.append(np.full(t.size, keys[fi], dtype=object))
    arrival = np.concatenate(times) if times else np.zeros(0)
    key = np.concatenate(fkeys) if fkeys else np.zeros(0, dtype=object)
    return RawRequests(arrival, key=key).sorted()


def load_maf2021(path: str | Path) -> RawRequests:
    """Per-invocation arrivals (end_timestamp - duration), relative to the earliest, keyed by func."""
    path = Path(path)
    arrival, keys = [], []
    for line, f, ix in csv_rows(path, COLUMNS_2021):
        end = to_float(path, line, "end_timestamp", f[ix["end_timestamp"]], minimum=0.0)
        dur = to_float(path, line, "duration", f[ix["duration"]], minimum=0.0)
        func = f[ix["func"]].strip()
        if not func:
            raise TraceFormatError(path, line, "empty function id", "func")
        arrival.append(end - dur)
        keys.append(func)
    a = np.asarray(arrival, dtype=np.float64)
    if a.size:
        a -= a.min()
    return RawRequests(a, key=np.asarray(keys, dtype=object)).sorted()
