"""Which adapter each request uses.

Traces name no adapters, so a mapping decides:
- `identity`: one source key (function, client) = one adapter, ids by popularity rank;
- `map_stride`: dLoRA's mapping: keys sorted by popularity, chunks of `map_stride` consecutive keys
  go round-robin over `num_adapters` (key rank r -> adapter (r // map_stride) % N); a larger stride
  puts more of the hot keys on the same adapter, so more skew;
- `uniform` / `zipf` (skew = s) / `powerlaw` (skew = alpha, S-LoRA): each request draws its adapter
  independently from `dlora_sim.workload.popularity`, ignoring keys;
- `explicit`: a CSV file `key,adapter` naming the adapter of every key.
Popularity ties are broken by the key's text so the result never depends on file order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlora_sim.traces._parse import csv_rows, to_int
from dlora_sim.core.errors import TraceFormatError
from dlora_sim.workload.popularity import popularity_weights

KEYED = ("identity", "map_stride", "explicit")
RANDOM = ("uniform", "zipf", "powerlaw")


@dataclass(frozen=True)
class AdapterMapping:
    """How requests are assigned to adapters; see the module docstring for the kinds."""

    kind: str = "map_stride"
    num_adapters: int | None = None
    map_stride: int = 1
    skew: float = 1.0
    file: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KEYED + RANDOM:
            raise ValueError(f"unknown mapping {self.kind!r}; valid: {list(KEYED + RANDOM)}")
        if self.kind in ("map_stride",) + RANDOM and (self.num_adapters is None or self.num_adapters < 1):
            raise ValueError(f"mapping {self.kind!r} needs num_adapters >= 1, got {self.num_adapters}")
        if self.map_stride < 1:
            raise ValueError(f"map_stride must be >= 1, got {self.map_stride}")
        if self.kind == "explicit" and not self.file:
            raise ValueError("mapping 'explicit' needs file: a CSV with columns key,adapter")

    def assign(self, keys: np.ndarray | None, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Adapter id per request, and the number of adapters the workload has."""
        if self.kind in RANDOM:
            k = int(self.num_adapters)
            w = popularity_weights(self.kind, k, self.skew)
            return rng.choice(k, size=n, p=w).astype(np.int64), k
        if keys is None:
            raise ValueError(f"mapping {self.kind!r} groups requests by source key (function/client), "
                             f"but this trace has none; use uniform, zipf or powerlaw")
        ranked, inverse = rank_keys(keys)
        if self.kind == "identity":
            k = len(ranked) if self.num_adapters is None else int(self.num_adapters)
            if k < len(ranked):
                raise ValueError(f"identity mapping: {len(ranked)} keys but num_adapters={k}")
            return inverse.astype(np.int64), k
        if self.kind == "map_stride":
            k = int(self.num_adapters)
            per_key = map_stride(len(ranked), k, self.map_stride)
            return per_key[inverse], k
        table = read_mapping_file(Path(self.file))
        missing = [str(key) for key in ranked if str(key) not in table]
        if missing:
            raise ValueError(f"{self.file}: no adapter for key(s) {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing)")
        per_key = np.array([table[str(key)] for key in ranked], dtype=np.int64)
        k = max(table.values()) + 1 if self.num_adapters is None else int(self.num_adapters)
        if per_key.size and per_key.max() >= k:
            raise ValueError(f"{self.file}: adapter {per_key.max()} >= num_adapters={k}")
        return per_key[inverse], k


def rank_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys sorted by request count (descending, ties by key text) and each request's rank."""
    uniq, inverse, counts = np.unique(keys.astype(str), return_inverse=True, return_counts=True)
    order = np.lexsort((uniq, -counts))  # primary: -count, secondary: key text
    rank_of = np.empty(len(uniq), dtype=np.int64)
    rank_of[order] = np.arange(len(uniq))
    return uniq[order], rank_of[inverse]


def map_stride(num_keys: int, num_adapters: int, stride: int) -> np.ndarray:
    """Adapter of each popularity-ranked key: chunks of `stride` keys dealt round-robin to adapters."""
    return (np.arange(num_keys, dtype=np.int64) // stride) % num_adapters


def read_mapping_file(path: Path) -> dict[str, int]:
    """Read `key,adapter` rows; duplicate keys and bad adapter ids are errors naming the line."""
    table: dict[str, int] = {}
    for line, f, ix in csv_rows(path, ("key", "adapter")):
        key = f[ix["key"]].strip()
        if key in table:
            raise TraceFormatError(path, line, f"duplicate key {key!r}", "key")
        table[key] = to_int(path, line, "adapter", f[ix["adapter"]])
    return table
