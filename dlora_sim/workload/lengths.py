"""Token-length distributions for synthetic workloads: fixed, uniform, or drawn from a file."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LengthDist:
    """`fixed` (value), `uniform` in [low, high) (S-LoRA's convention), or `file`: values sampled with
    replacement from column `column` of a CSV (e.g. ShareGPT lengths)."""

    kind: str = "uniform"
    value: int = 128
    low: int = 8
    high: int = 512
    path: str | None = None
    column: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "file"):
            raise ValueError(f"length kind must be fixed, uniform or file, got {self.kind!r}")
        if self.kind == "fixed" and self.value < 1:
            raise ValueError(f"fixed length must be >= 1, got {self.value}")
        if self.kind == "uniform" and not 1 <= self.low < self.high:
            raise ValueError(f"uniform lengths need 1 <= low < high, got [{self.low}, {self.high})")
        if self.kind == "file" and not (self.path and self.column):
            raise ValueError("file lengths need 'path' and 'column'")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high, size=n, dtype=np.int64)
        values = _read_column(Path(self.path), self.column)
        return rng.choice(values, size=n, replace=True)


def _read_column(path: Path, column: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"length distribution file not found: {path}")
    out = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ValueError(f"{path}: missing column {column!r} (columns: {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                v = int(float(row[column]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: {column}={row[column]!r} is not a number") from None
            if v < 1:
                raise ValueError(f"{path}:{line}: {column}={v} must be >= 1")
            out.append(v)
    if not out:
        raise ValueError(f"{path}: no rows")
    return np.asarray(out, dtype=np.int64)
