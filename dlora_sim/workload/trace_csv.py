"""Replay of the canonical trace CSV: arrival_s, adapter, prompt_tokens, output_tokens (one row per request).

Every other trace format is converted into this stream; errors name the file and line.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dlora_sim.core.errors import TraceFormatError, TraceNotFoundError
from dlora_sim.core.workload import RequestSpec, Workload

COLUMNS = ("arrival_s", "adapter", "prompt_tokens", "output_tokens")
TraceError = TraceFormatError   # one error type for every malformed trace, canonical or not


def read_canonical_csv(path: str | Path) -> list[RequestSpec]:
    path = Path(path)
    if not path.exists():
        raise TraceNotFoundError(f"trace file not found: {path}")
    out: list[RequestSpec] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(path, 1, f"empty file (expected header {','.join(COLUMNS)})")
        header = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise TraceError(path, 1, f"missing column(s) {missing}; header is {header}")
        idx = [header.index(c) for c in COLUMNS]
        for line, row in enumerate(reader, start=2):
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) < len(header):
                raise TraceError(path, line, f"expected {len(header)} fields, got {len(row)} (truncated row?)")
            try:
                arrival = float(row[idx[0]])
                adapter, prompt, output = (int(row[i]) for i in idx[1:])
            except ValueError:
                raise TraceError(path, line, f"not a number in {dict(zip(COLUMNS, (row[i] for i in idx)))}") from None
            try:
                out.append(RequestSpec(arrival, adapter, prompt, output))
            except ValueError as e:
                raise TraceError(path, line, str(e)) from None
    return out


@dataclass
class CsvTraceWorkload:
    path: str
    num_adapters: int | None = None    # default: max adapter id + 1
    rank: int = 16

    def build(self, seed: int) -> Workload:
        reqs = read_canonical_csv(self.path)
        n = max((r.adapter for r in reqs), default=-1) + 1
        if self.num_adapters is not None and n > self.num_adapters:
            raise TraceError(self.path, None, f"uses adapter {n - 1} but num_adapters is {self.num_adapters}")
        return Workload.from_requests(reqs, self.num_adapters or n, self.rank, name=Path(self.path).stem)
