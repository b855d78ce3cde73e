"""The intermediate every loader returns before adapters and lengths are assigned.

Loaders only parse; mapping (which adapter), length filling and windowing are separate steps so
every source shares them. Arrays rather than objects keep a 100k-request trace cheap.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RawRequests:
    """Arrivals (seconds from the trace start), optional lengths, and an optional source key per request.

    `key` identifies what the trace says issued the request (an Azure function, a ServeGen client);
    it is what adapter mappings such as map_stride group by. None when the trace has no such notion.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray | None = None
    output_tokens: np.ndarray | None = None
    key: np.ndarray | None = None
    prefix: np.ndarray | None = None   # per request, a tuple of its prompt's prefix-block hashes (object array)

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        for name in ("prompt_tokens", "output_tokens", "key", "prefix"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} entries for {n} arrivals")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def has_lengths(self) -> bool:
        return self.prompt_tokens is not None and self.output_tokens is not None

    def take(self, idx: np.ndarray) -> "RawRequests":
        """A subset (or reordering) of the requests by index or boolean mask."""
        pick = (lambda a: None if a is None else a[idx])
        return RawRequests(self.arrival_s[idx], pick(self.prompt_tokens), pick(self.output_tokens), pick(self.key),
                           pick(self.prefix))

    def sorted(self) -> "RawRequests":
        """Stable sort by arrival, so equal timestamps keep file order (determinism)."""
        return self.take(np.argsort(self.arrival_s, kind="stable"))
