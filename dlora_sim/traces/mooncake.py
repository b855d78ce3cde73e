"""Mooncake FAST'25 traces: JSONL, one request per line.

Fields: timestamp (ms, relative), input_length, output_length, hash_ids (512-token prefix blocks: equal ids at
equal positions are equal tokens). hash_ids become the workload's prefixes (prefix caching matches on them); the
first block is the same for every request in the released traces, so it is no use as a tenant key.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dlora_sim.traces._parse import open_text
from dlora_sim.core.errors import TraceFormatError
from dlora_sim.traces.raw import RawRequests

FIELDS = ("timestamp", "input_length", "output_length")


def load_mooncake(path: str | Path) -> RawRequests:
    """Read a Mooncake JSONL trace; arrivals in seconds from the earliest timestamp."""
    path = Path(path)
    ts: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    prefixes: list[tuple[int, ...]] = []
    with open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(path, line_no, f"invalid JSON ({e.msg}; truncated line?)") from None
            if not isinstance(rec, dict):
                raise TraceFormatError(path, line_no, f"expected a JSON object, got {type(rec).__name__}")
            for key in FIELDS:
                if key not in rec:
                    raise TraceFormatError(path, line_no, "missing key", key)
            t = rec["timestamp"]
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t < 0:
                raise TraceFormatError(path, line_no, f"bad timestamp {t!r} (want ms >= 0)", "timestamp")
            vals = []
            for key in ("input_length", "output_length"):
                v = rec[key]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise TraceFormatError(path, line_no, f"must be an integer >= 0, got {v!r}", key)
                vals.append(v)
            hashes = rec.get("hash_ids", [])
            if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
                raise TraceFormatError(path, line_no, f"must be a list of integers, got {hashes!r:.80}", "hash_ids")
            ts.append(float(t) / 1000.0)
            prompts.append(vals[0])
            outputs.append(vals[1])
            prefixes.append(tuple(hashes))
    arrival = np.asarray(ts, dtype=np.float64)
    if len(arrival):
        arrival -= arrival.min()
    prefix = np.empty(len(prefixes), dtype=object)
    prefix[:] = prefixes
    return RawRequests(arrival, np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64),
                       prefix=prefix).sorted()
