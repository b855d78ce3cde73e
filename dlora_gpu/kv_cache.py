"""Paged KV cache: fixed-size blocks on the device, a host pool to swap them to, per-sequence tables.

Layout: ``k`` and ``v`` are [layers, num_blocks, block_size, kv_heads, head_dim] on the device, so
one layer's cache (``layer(i)``) is what `decode_attention` reads, and a swap moves a sequence's
blocks of every layer in one gather. The host pool has the same layout with ``host_blocks`` blocks
(pinned when CUDA is available, so copies can overlap compute).

The cache keeps each sequence's block table: `grow` before a forward that needs more positions,
`release` when a sequence finishes or is preempted for recompute, `swap_out` / `swap_in` to preempt
by swapping, `export` / `install` to move a sequence to another replica's cache (co-migration): its
blocks' contents travel, the target builds a new block table. Every operation either completes or
raises `OutOfBlocks` with nothing changed.
Blocks are handed out lowest id first and reused last-freed first, so runs are reproducible.
The two free lists (`gpu_blocks`, `host_blocks`) are public for inspection; taking blocks from them
directly, rather than through `grow`, leaves blocks without an owner and fails `check`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from dlora_gpu.model import LlamaConfig

SeqId = Hashable


@dataclass(frozen=True)
class KVPayload:
    """One sequence's KV of every layer as it leaves a replica, on the host: K and V are
    [layers, blocks, block_size, kv_heads, head_dim], blocks in the sequence's order."""

    k: Tensor
    v: Tensor

    @property
    def blocks(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def __reduce__(self):
        # as raw bytes in NumPy arrays: pickle protocol 5 (Ray's object store) ships them without a copy,
        # and any dtype (bfloat16 included) survives the trip
        raw = [t.contiguous().view(torch.uint8).numpy() for t in (self.k, self.v)]
        return (_payload, (str(self.k.dtype).removeprefix("torch."), tuple(self.k.shape), *raw))


def _payload(dtype: str, shape: tuple, k, v) -> KVPayload:
    dt = getattr(torch, dtype)
    return KVPayload(torch.from_numpy(k).view(dt).reshape(shape), torch.from_numpy(v).view(dt).reshape(shape))


class OutOfBlocks(RuntimeError):
    """Not enough free blocks for the request; the cache is unchanged."""


class BlockAllocator:
    """Free list over block ids 0..n-1."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: lowest id first
        self._is_free = [True] * num_blocks

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks requested, {len(self._free)} of {self.num_blocks} free")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._is_free[i] = False
        return ids

    def free(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.num_blocks or self._is_free[i]]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"freeing blocks that are not allocated (or twice): {bad or ids}")
        for i in reversed(ids):
            self._is_free[i] = True
            self._free.append(i)

    def num_free(self) -> int:
        return len(self._free)

    def allocated(self) -> set[int]:
        return {i for i, free in enumerate(self._is_free) if not free}


class PagedKVCache:
    """Device KV blocks + host swap pool + block tables (see module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, cfg: LlamaConfig,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 host_blocks: int = 0) -> None:
        if num_blocks <= 0 or block_size <= 0 or host_blocks < 0:
            raise ValueError(f"bad cache size: {num_blocks} blocks of {block_size}, {host_blocks} host")
        self.block_size = block_size
        self.cfg = cfg
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        pin = torch.cuda.is_available()
        host_shape = (cfg.num_layers, host_blocks, *shape[2:])
        self.host_k = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
        self.host_v = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
        self.gpu_blocks = BlockAllocator(num_blocks)
        self.host_blocks = BlockAllocator(host_blocks)
        self._tables: dict[SeqId, list[int]] = {}   # sequences whose KV is on the device
        self._swapped: dict[SeqId, list[int]] = {}  # sequences whose KV is in host blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    def num_free(self) -> int:
        return self.gpu_blocks.num_free()

    def host_free(self) -> int:
        return self.host_blocks.num_free()

    # ---- sequences --------------------------------------------------------------------------------

    def grow(self, seq_id: SeqId, n_blocks: int) -> list[int]:
        """Make `seq_id` own exactly `n_blocks` device blocks (adding only); returns its table."""
        if seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out; swap_in first")
        table = self._tables.get(seq_id, [])
        if n_blocks < len(table):
            raise ValueError(f"sequence {seq_id!r} owns {len(table)} blocks; cannot shrink to {n_blocks}")
        self._tables[seq_id] = table + self.gpu_blocks.allocate(n_blocks - len(table))
        return list(self._tables[seq_id])

    def release(self, seq_id: SeqId) -> None:
        """Free the sequence's blocks, on the device or in the host pool."""
        if seq_id in self._tables:
            self.gpu_blocks.free(self._tables.pop(seq_id))
        elif seq_id in self._swapped:
            self.host_blocks.free(self._swapped.pop(seq_id))
        else:
            raise KeyError(f"sequence {seq_id!r} owns no blocks")

    def swap_out(self, seq_id: SeqId) -> None:
        """Copy the sequence's blocks (every layer) into host blocks and free the device blocks."""
        table = self._resident(seq_id)
        host = self.host_blocks.allocate(len(table))
        src = torch.tensor(table, dtype=torch.long, device=self.device)
        dst = torch.tensor(host, dtype=torch.long)
        self.host_k.index_copy_(1, dst, self.k.index_select(1, src).cpu())
        self.host_v.index_copy_(1, dst, self.v.index_select(1, src).cpu())
        self.gpu_blocks.free(self._tables.pop(seq_id))
        self._swapped[seq_id] = host

    def swap_in(self, seq_id: SeqId) -> list[int]:
        """Copy a swapped sequence back into newly allocated device blocks; returns its table."""
        if seq_id not in self._swapped:
            raise KeyError(f"sequence {seq_id!r} is not swapped out")
        host = self._swapped[seq_id]
        table = self.gpu_blocks.allocate(len(host))
        src = torch.tensor(host, dtype=torch.long)
        dst = torch.tensor(table, dtype=torch.long, device=self.device)
        self.k.index_copy_(1, dst, self.host_k.index_select(1, src).to(self.device))
        self.v.index_copy_(1, dst, self.host_v.index_select(1, src).to(self.device))
        self.host_blocks.free(self._swapped.pop(seq_id))
        self._tables[seq_id] = table
        return list(table)

    def export(self, seq_id: SeqId) -> KVPayload:
        """A copy of the sequence's blocks (on the device or swapped), in table order, on the host."""
        if seq_id in self._swapped:
            idx = torch.tensor(self._swapped[seq_id], dtype=torch.long)
            return KVPayload(self.host_k.index_select(1, idx), self.host_v.index_select(1, idx))
        idx = torch.tensor(self._resident(seq_id), dtype=torch.long, device=self.device)
        return KVPayload(self.k.index_select(1, idx).cpu(), self.v.index_select(1, idx).cpu())

    def install(self, seq_id: SeqId, payload: KVPayload, swapped: bool = False, blocks: int | None = None) -> list[int]:
        """Give a new sequence `payload`'s blocks: on the device, or in the host pool when `swapped`
        (as if swapped out here), and `blocks` in all (at least the payload's: the target may also
        reserve the block its next token needs). Returns the new table; the shapes must match this cache's."""
        if seq_id in self._tables or seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} already owns blocks here")
        if payload.k.shape[0] != self.k.shape[0] or payload.k.shape[2:] != self.k.shape[2:]:
            raise ValueError(f"KV of shape {tuple(payload.k.shape)} does not fit this cache's blocks "
                             f"{tuple(self.k.shape)}")
        pool, k, v = (self.host_blocks, self.host_k, self.host_v) if swapped else (self.gpu_blocks, self.k, self.v)
        table = pool.allocate(max(payload.blocks, blocks or 0))
        idx = torch.tensor(table[:payload.blocks], dtype=torch.long, device=k.device)
        k.index_copy_(1, idx, payload.k.to(k.device, k.dtype))
        v.index_copy_(1, idx, payload.v.to(v.device, v.dtype))
        (self._swapped if swapped else self._tables)[seq_id] = table
        return list(table)

    def block_table(self, seq_id: SeqId) -> list[int]:
        return list(self._resident(seq_id))

    def is_swapped(self, seq_id: SeqId) -> bool:
        return seq_id in self._swapped

    def sequences(self) -> list[SeqId]:
        """Sequences holding device blocks."""
        return list(self._tables)

    def _resident(self, seq_id: SeqId) -> list[int]:
        if seq_id in self._swapped:
            raise ValueError(f"sequence {seq_id!r} is swapped out; swap_in first")
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id!r} owns no device blocks; grow it first")
        return self._tables[seq_id]

    # ---- data -------------------------------------------------------------------------------------

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's (K, V) blocks, [num_blocks, block_size, kv_heads, head_dim] views."""
        return self.k[i], self.v[i]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store K/V [T, kv_heads, head_dim] at flat positions ``block * block_size + offset``."""
        shape = (-1, *self.k.shape[3:])
        self.k[layer].view(shape).index_copy_(0, slots, k)
        self.v[layer].view(shape).index_copy_(0, slots, v)

    # ---- invariants -------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError unless every allocated block has exactly one owning sequence."""
        for pool, tables, allocator in (("device", self._tables, self.gpu_blocks),
                                        ("host", self._swapped, self.host_blocks)):
            owned = [b for table in tables.values() for b in table]
            if len(owned) != len(set(owned)):
                raise AssertionError(f"a {pool} block is owned by two sequences: {tables}")
            if set(owned) != allocator.allocated():
                raise AssertionError(f"{pool} blocks owned {sorted(owned)} != allocated "
                                     f"{sorted(allocator.allocated())}")
            if len(owned) + allocator.num_free() != allocator.num_blocks:
                raise AssertionError(f"{pool}: {len(owned)} owned + {allocator.num_free()} free != "
                                     f"{allocator.num_blocks}")
        both = set(self._tables) & set(self._swapped)
        if both:
            raise AssertionError(f"sequences both resident and swapped: {sorted(map(str, both))}")
