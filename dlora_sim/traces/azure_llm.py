"""Azure LLM inference trace 2023 (Splitwise, ISCA'24): one row per request.

Columns: TIMESTAMP (wall clock, 100 ns resolution), ContextTokens, GeneratedTokens. Arrivals are
made relative to the earliest timestamp. The trace names no tenant, so requests carry no key and
adapters must come from a popularity model.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np

from dlora_sim.traces._parse import csv_rows, to_int
from dlora_sim.core.errors import TraceFormatError
from dlora_sim.traces.raw import RawRequests

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def parse_timestamp(path: Path, line: int, text: str) -> float:
    """Seconds since the epoch (naive wall clock) from 'YYYY-mm-dd HH:MM:SS[.fffffff]'.

    The trace has 7 fractional digits, more than datetime takes, so the fraction is parsed apart.
    """
    base, _, frac = text.strip().partition(".")
    try:
        whole = datetime.strptime(base, "%Y-%m-%d %H:%M:%S")
        fraction = float("0." + frac) if frac else 0.0
        if frac and not frac.isdigit():
            raise ValueError(frac)
    except ValueError:
        raise TraceFormatError(path, line, f"bad timestamp {text!r} (want 'YYYY-mm-dd HH:MM:SS.fffffff')",
                               "TIMESTAMP") from None
    return (whole - datetime(1970, 1, 1)).total_seconds() + fraction


def load_azure_llm(path: str | Path) -> RawRequests:
    """Read one Azure LLM inference CSV (code or conv); arrivals start at 0 s."""
    path = Path(path)
    ts: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    for line, f, ix in csv_rows(path, COLUMNS):
        ts.append(parse_timestamp(path, line, f[ix["TIMESTAMP"]]))
        prompts.append(to_int(path, line, "ContextTokens", f[ix["ContextTokens"]]))
        outputs.append(to_int(path, line, "GeneratedTokens", f[ix["GeneratedTokens"]]))
    arrival = np.asarray(ts, dtype=np.float64)
    if len(arrival):
        arrival -= arrival.min()
    raw = RawRequests(arrival, np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64))
    return raw.sorted()
