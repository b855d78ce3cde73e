"""Errors raised while reading traces.

A bad trace must fail loudly with enough context to fix it: the file, the 1-based line and the
column or key that is wrong. `TraceFormatError` is a ValueError so callers that validate input
generically still catch it.
"""
from __future__ import annotations

from os import PathLike

from dlora_sim.errors import UserError


class TraceFormatError(ValueError, UserError):
    """A malformed trace row or file; the message names the file, the line and the column/key."""

    def __init__(self, path: str | PathLike, line: int | None, message: str, column: str | None = None):
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" (column {column!r})" if column is not None else ""
        super().__init__(f"{where}{what}: {message}")


class TraceNotFoundError(FileNotFoundError, UserError):
    """A trace file that is in none of the places we look; the message lists them and how to fetch it."""
