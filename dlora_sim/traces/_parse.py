"""Shared row readers: CSV with a header, and field converters that raise TraceFormatError.

Every loader goes through these so "file:line (column)" messages look the same everywhere.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Sequence

from dlora_sim.core.errors import TraceFormatError


def open_text(path: Path):
    """Open a trace for reading; a missing file raises FileNotFoundError naming it (not a format error)."""
    return open(path, "r", newline="", encoding="utf-8")


def csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, list[str], dict[str, int]]]:
    """Yield (line number, fields, column index) for each data row of a headed CSV.

    Raises TraceFormatError for a missing header, a missing required column, or a row with fewer
    fields than the header (what a truncated file looks like).
    """
    with open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise TraceFormatError(path, 1, "empty file: expected a header row") from None
        header = [h.strip() for h in header]
        index = {name: i for i, name in enumerate(header)}
        missing = [c for c in required if c not in index]
        if missing:
            raise TraceFormatError(path, 1, f"missing column(s) {missing}; header is {header}")
        width = len(header)
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if len(fields) < width:
                raise TraceFormatError(path, reader.line_num,
                                       f"row has {len(fields)} fields, header has {width} (truncated row?)")
            yield reader.line_num, fields, index


def to_int(path: Path, line: int, column: str, text: str, minimum: int | None = 0) -> int:
    """Parse a non-negative integer count (token counts, invocation counts)."""
    try:
        value = int(text.strip())
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            raise TraceFormatError(path, line, f"not an integer: {text!r}", column) from None
        if not f.is_integer():
            raise TraceFormatError(path, line, f"not an integer: {text!r}", column) from None
        value = int(f)
    if minimum is not None and value < minimum:
        raise TraceFormatError(path, line, f"must be >= {minimum}, got {value}", column)
    return value


def to_float(path: Path, line: int, column: str, text: str, minimum: float | None = None) -> float:
    """Parse a finite float (timestamps, rates, distribution parameters)."""
    try:
        value = float(text)
    except ValueError:
        raise TraceFormatError(path, line, f"not a number: {text!r}", column) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise TraceFormatError(path, line, f"not a finite number: {text!r}", column)
    if minimum is not None and value < minimum:
        raise TraceFormatError(path, line, f"must be >= {minimum}, got {value}", column)
    return value
