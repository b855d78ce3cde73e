"""Resident adapter slots and token->adapter layouts shared by every LoRA backend.

Layout (one `LoRAStack` per projection group of a layer, e.g. fused qkv, o, gate_up, down):

- ``A``: ``[slots, S, R, K]`` -- S fused slices (3 for qkv, 2 for gate_up, 1 otherwise), R = the
  stack's maximum rank, K = in features. Viewed as ``[slots, S*R, K]`` the shrink of all slices is one
  skinny GEMM per token, so fused slices cost one launch.
- ``B``: ``[slots, N_total, R]`` with the slices' out features concatenated (q|k|v may differ in size
  under GQA); slice ``s`` owns rows ``offsets[s] : offsets[s] + sizes[s]``, which are exactly the
  columns it adds into ``y``.
- ``ranks[slot]`` (int32) and ``scales[slot]`` (fp32, alpha/r).

Heterogeneous ranks are handled by padding every slot to R and masking rows/columns ``>= ranks[slot]``
in the kernels, so one launch serves any mix of ranks. The price is memory: a rank-8 adapter in a
rank-64 stack occupies 8x its bytes (S-LoRA avoids this by paging adapters per rank row in a unified
pool, at the cost of an indirection per rank row in every kernel). Bandwidth is mostly not wasted:
masked lanes issue no loads, though sector granularity (32 B) still fetches some padding for small
ranks. Kernels never read the padding values, but `load` zero-fills them so the dense torch baselines
(einsum, gather+bmm), which do read them, stay correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LoRAStack:
    """Adapter slots for one projection group on one device (see module docstring for layout)."""

    A: Tensor
    B: Tensor
    ranks: Tensor
    scales: Tensor
    slice_sizes: tuple[int, ...]
    slice_offsets_t: Tensor = field(init=False)
    slice_sizes_t: Tensor = field(init=False)
    slice_offsets: tuple[int, ...] = field(init=False)
    ranks_host: list[int] = field(init=False)
    scales_host: list[float] = field(init=False)

    def __post_init__(self) -> None:
        slots, s, _, _ = self.A.shape
        if s != len(self.slice_sizes):
            raise ValueError(f"A has {s} slices but slice_sizes={self.slice_sizes}")
        if self.B.shape != (slots, sum(self.slice_sizes), self.A.shape[2]):
            raise ValueError(f"B shape {tuple(self.B.shape)} does not match A {tuple(self.A.shape)} "
                             f"and slice_sizes {self.slice_sizes}")
        if self.A.dtype != self.B.dtype:
            raise ValueError(f"A and B dtypes differ: {self.A.dtype} vs {self.B.dtype}")
        dev = self.A.device
        offs = [0]
        for n in self.slice_sizes[:-1]:
            offs.append(offs[-1] + n)
        self.slice_offsets = tuple(offs)
        # Device copies made once here: per-call host<->device copies would break CUDA-graph capture.
        self.slice_offsets_t = torch.tensor(offs, dtype=torch.int32, device=dev)
        self.slice_sizes_t = torch.tensor(self.slice_sizes, dtype=torch.int32, device=dev)
        self.ranks = self.ranks.to(device=dev, dtype=torch.int32)
        self.scales = self.scales.to(device=dev, dtype=torch.float32)
        self.ranks_host = [int(r) for r in self.ranks.tolist()]
        self.scales_host = [float(s) for s in self.scales.tolist()]

    @classmethod
    def empty(cls, num_slots: int, in_features: int, slice_sizes: tuple[int, ...] | list[int],
              max_rank: int, dtype: torch.dtype = torch.float16,
              device: torch.device | str = "cpu") -> "LoRAStack":
        """All slots empty (rank 0): kernels treat them as no-ops until `load`."""
        sizes = tuple(int(n) for n in slice_sizes)
        a = torch.zeros(num_slots, len(sizes), max_rank, in_features, dtype=dtype, device=device)
        b = torch.zeros(num_slots, sum(sizes), max_rank, dtype=dtype, device=device)
        return cls(a, b, torch.zeros(num_slots, dtype=torch.int32),
                   torch.zeros(num_slots, dtype=torch.float32), sizes)

    @property
    def num_slots(self) -> int:
        return self.A.shape[0]

    @property
    def num_slices(self) -> int:
        return self.A.shape[1]

    @property
    def max_rank(self) -> int:
        return self.A.shape[2]

    @property
    def in_features(self) -> int:
        return self.A.shape[3]

    @property
    def out_features(self) -> int:
        return self.B.shape[1]

    def load(self, slot: int, a: list[Tensor | None], b: list[Tensor | None], scale: float) -> None:
        """Copy one adapter into `slot`: a[s] is [r, K], b[s] is [N_s, r]; padding zero-filled.

        A slice given as None (a projection the adapter does not target) stays zero: a no-op.
        """
        if len(a) != self.num_slices or len(b) != self.num_slices:
            raise ValueError(f"expected {self.num_slices} slices, got {len(a)} A and {len(b)} B")
        if any((a_s is None) != (b_s is None) for a_s, b_s in zip(a, b)):
            raise ValueError("a slice must give both A and B, or neither")
        given = [a_s for a_s in a if a_s is not None]
        if not given:
            raise ValueError("no slice given; use clear() to empty a slot")
        r = given[0].shape[0]
        if not 0 < r <= self.max_rank:
            raise ValueError(f"rank {r} outside 1..{self.max_rank}")
        self.A[slot].zero_()
        self.B[slot].zero_()
        for s, (a_s, b_s, off, n) in enumerate(zip(a, b, self.slice_offsets, self.slice_sizes)):
            if a_s is None or b_s is None:
                continue
            if a_s.shape != (r, self.in_features) or b_s.shape != (n, r):
                raise ValueError(f"slice {s}: A {tuple(a_s.shape)} / B {tuple(b_s.shape)} do not fit "
                                 f"rank {r}, in {self.in_features}, out {n}")
            self.A[slot, s, :r].copy_(a_s)
            self.B[slot, off:off + n, :r].copy_(b_s)
        self._set(slot, r, scale)

    def clear(self, slot: int) -> None:
        """Empty `slot` (rank 0: kernels skip it); zero-filled for the dense baselines."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        self._set(slot, 0, 0.0)

    def _set(self, slot: int, rank: int, scale: float) -> None:
        self.ranks[slot] = rank
        self.scales[slot] = scale
        self.ranks_host[slot] = rank
        self.scales_host[slot] = float(scale)

    def slot_weights(self, slot: int) -> list[tuple[Tensor, Tensor]]:
        """Per slice (A [r, K], B [N_s, r]) views of one slot, without padding."""
        r = self.ranks_host[slot]
        return [(self.A[slot, s, :r], self.B[slot, off:off + n, :r])
                for s, (off, n) in enumerate(zip(self.slice_offsets, self.slice_sizes))]


@dataclass(frozen=True)
class Segments:
    """Prefill layout: tokens sorted so each adapter's tokens are contiguous.

    ``starts``/``lengths``/``slots`` are int32 device tensors (one entry per segment; empty segments
    and slot -1 are allowed and skipped); ``max_len`` is kept on the host because it sizes the launch
    grid. The ``*_host`` lists serve the torch backend without device->host syncs.
    """

    starts: Tensor
    lengths: Tensor
    slots: Tensor
    max_len: int
    starts_host: tuple[int, ...]
    lengths_host: tuple[int, ...]
    slots_host: tuple[int, ...]

    @classmethod
    def from_lengths(cls, lengths: list[int], slots: list[int],
                     device: torch.device | str = "cpu") -> "Segments":
        if len(lengths) != len(slots):
            raise ValueError(f"{len(lengths)} lengths but {len(slots)} slots")
        if any(n < 0 for n in lengths):
            raise ValueError(f"negative segment length in {lengths}")
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        starts = starts[:len(lengths)]

        def dev(v: list[int]) -> Tensor:
            return torch.tensor(v, dtype=torch.int32, device=device)

        return cls(dev(starts), dev(lengths), dev(slots), max(lengths, default=0),
                   tuple(starts), tuple(int(n) for n in lengths), tuple(int(s) for s in slots))

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths_host)


def group_by_slot(slot_ids: Tensor) -> tuple[Tensor, Segments]:
    """Sort per-token slot ids into segments: returns (order, segments) with x[order] contiguous.

    Syncs with the host (segment sizes decide the grid); meant for prefill batch construction.
    """
    order = torch.argsort(slot_ids, stable=True)
    uniq, counts = torch.unique_consecutive(slot_ids[order], return_counts=True)
    return order, Segments.from_lengths(counts.tolist(), uniq.tolist(), slot_ids.device)
