"""Replay of the canonical trace CSV: arrival_s, adapter, prompt_tokens, output_tokens (one row per request).

Every other trace format is converted into this stream; errors name the file and line.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dlora_sim.core.errors import TraceFormatError, TraceNotFoundError
from dlora_sim.core.workload import RequestArrays, RequestSpec, Workload

COLUMNS = ("arrival_s", "adapter", "prompt_tokens", "output_tokens")
TraceError = TraceFormatError   # one error type for every malformed trace, canonical or not


def _first_error(path: Path) -> None:
    """Read row by row and raise the first row's error, naming its line (the fast reader found one)."""
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
            if len(row) > len(header):
                raise TraceError(path, line, f"expected {len(header)} fields, got {len(row)}")
            try:
                arrival = float(row[idx[0]])
                adapter, prompt, output = (int(row[i]) for i in idx[1:])
            except ValueError:
                raise TraceError(path, line, f"not a number in {dict(zip(COLUMNS, (row[i] for i in idx)))}") from None
            try:
                RequestSpec(arrival, adapter, prompt, output)
            except ValueError as e:
                raise TraceError(path, line, str(e)) from None


def read_canonical_table(path: str | Path):
    """The canonical CSV as four typed columns (a pandas DataFrame, in file order). pandas' C reader takes
    the whole file at once; when it finds anything wrong, a row-by-row pass words the first bad row's
    error with its line, so errors read as before and a good file costs one vectorised read."""
    import numpy as np
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise TraceNotFoundError(f"trace file not found: {path}")
    types = {"arrival_s": np.float64, "adapter": np.int64, "prompt_tokens": np.int64, "output_tokens": np.int64}
    try:
        df = pd.read_csv(path, usecols=lambda c: c.strip() in COLUMNS, skipinitialspace=True,
                         dtype=str)
        df.columns = [c.strip() for c in df.columns]
        if sorted(df.columns) == sorted(COLUMNS) and not df.isna().to_numpy().any():
            out = pd.DataFrame({c: df[c].astype(types[c]) for c in COLUMNS})   # int() / float() of each cell
            a, d, p, o = (out[c].to_numpy() for c in COLUMNS)
            if (a >= 0).all() and (d >= 0).all() and (p >= 1).all() and (o >= 1).all():
                return out
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        pass
    _first_error(path)
    raise TraceError(path, None, "malformed (no single row to blame)")


def read_canonical_csv(path: str | Path) -> list[RequestSpec]:
    """The canonical CSV's requests, in file order (`read_canonical_table` as RequestSpecs)."""
    df = read_canonical_table(path)
    return [RequestSpec(float(a), int(d), int(p), int(o)) for a, d, p, o in
            zip(df["arrival_s"], df["adapter"], df["prompt_tokens"], df["output_tokens"])]


@dataclass
class CsvTraceWorkload:
    path: str
    num_adapters: int | None = None    # default: max adapter id + 1
    rank: int = 16

    def build(self, seed: int) -> Workload:
        df = read_canonical_table(self.path)
        n = int(df["adapter"].max()) + 1 if len(df) else 0
        if self.num_adapters is not None and n > self.num_adapters:
            raise TraceError(self.path, None, f"uses adapter {n - 1} but num_adapters is {self.num_adapters}")
        df = df.sort_values("arrival_s", kind="stable")   # as Workload.from_requests sorts
        cols = RequestArrays(df["arrival_s"], df["adapter"], df["prompt_tokens"], df["output_tokens"])
        return Workload.from_arrays(cols, self.num_adapters or n, self.rank, name=Path(self.path).stem)
