"""One iteration's flat mixed batch, laid out as Punica does, and the LoRA metadata built from it.

Token layout: every prefill's tokens first, the prefills ordered by adapter slot (stable, so equal
slots are contiguous and form one `Segments` entry each, as the per-segment kernel wants), then one
token per decoding sequence in the order given (per-token slot ids, as the per-token kernel
wants). A prefill always covers positions 0..len-1 (it is also how a preempted sequence is
recomputed: prompt plus generated tokens from scratch); a decode token sits at ``context_len - 1``.

Sequences -- and so the logits `Llama.forward` returns -- are in input order: the prefills as
given, then the decodes as given. Everything here is built once per iteration on the host and
copied to the device once; every layer reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dlora_gpu.adapters import AdapterPool, LayerStacks
from dlora_gpu.kv_cache import PagedKVCache, SeqId
from dlora_gpu.lora_ops import Backend
from dlora_gpu.lora_stack import Segments

Prefill = tuple[SeqId, Sequence[int], int]  # (seq id, token ids, adapter slot or -1)
Decode = tuple[SeqId, int, int, int]  # (seq id, last token id, context len incl. it, slot or -1)


@dataclass(frozen=True)
class SeqRecord:
    """Where one sequence sits in the flat batch."""

    seq_id: SeqId
    is_prefill: bool
    start: int  # offset of its first token in the flat batch
    length: int  # tokens it has in this batch (1 for a decode)
    context_len: int  # tokens in its KV cache after this iteration
    slot: int  # adapter slot, -1 = none


@dataclass(frozen=True)
class FlatBatch:
    token_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64
    slot_mapping: Tensor  # [T] int64: block * block_size + offset where each token's K/V goes
    seqs: tuple[SeqRecord, ...]  # input order: prefills, then decodes
    num_prefill_tokens: int
    prefill_spans: tuple[tuple[int, int], ...]  # (start, length) of each prefill, in token order
    segments: Segments  # the prefill tokens, one segment per run of equal slots
    decode_slot_ids: Tensor  # [num_decodes] int32
    block_tables: Tensor  # [num_decodes, max_blocks] int32, padded with -1
    context_lens: Tensor  # [num_decodes] int32
    last_token_index: Tensor  # [num_seqs] int64, in `seqs` order

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_decodes(self) -> int:
        return self.context_lens.shape[0]

    @classmethod
    def build(cls, prefills: Sequence[Prefill] = (), decodes: Sequence[Decode] = (), *,
              kv: PagedKVCache, device: torch.device | str | None = None) -> "FlatBatch":
        """Lay out one iteration. Every sequence must already own the KV blocks for its
        context (``kv.grow(seq_id, kv.blocks_for(context_len))``)."""
        device = kv.device if device is None else device
        bs = kv.block_size
        ids = [p[0] for p in prefills] + [d[0] for d in decodes]
        if not ids:
            raise ValueError("an empty batch: nothing to run")
        if len(set(ids)) != len(ids):
            raise ValueError(f"a sequence appears twice in one batch: {ids}")

        def table(seq_id: SeqId, context_len: int) -> list[int]:
            blocks = kv.block_table(seq_id)
            if len(blocks) * bs < context_len:
                raise ValueError(f"sequence {seq_id!r} owns {len(blocks)} blocks of {bs}, needs "
                                 f"{kv.blocks_for(context_len)} for {context_len} tokens; grow it first")
            return blocks

        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        records: dict[int, SeqRecord] = {}
        spans, seg_lengths, seg_slots = [], [], []
        for i in sorted(range(len(prefills)), key=lambda i: prefills[i][2]):
            seq_id, toks, slot = prefills[i]
            n = len(toks)
            if n == 0:
                raise ValueError(f"prefill of sequence {seq_id!r} has no tokens")
            blocks = table(seq_id, n)
            records[i] = SeqRecord(seq_id, True, len(tokens), n, n, slot)
            spans.append((len(tokens), n))
            if seg_slots and seg_slots[-1] == slot:
                seg_lengths[-1] += n
            else:
                seg_lengths.append(n)
                seg_slots.append(slot)
            tokens.extend(int(t) for t in toks)
            positions.extend(range(n))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(n))
        n_pre = len(tokens)
        tables, ctx_lens, dec_slots = [], [], []
        for j, (seq_id, token, context_len, slot) in enumerate(decodes):
            if context_len < 1:
                raise ValueError(f"decode of sequence {seq_id!r} has context_len {context_len}")
            blocks = table(seq_id, context_len)[:kv.blocks_for(context_len)]
            records[len(prefills) + j] = SeqRecord(seq_id, False, len(tokens), 1, context_len, slot)
            p = context_len - 1
            tokens.append(int(token))
            positions.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            tables.append(blocks)
            ctx_lens.append(context_len)
            dec_slots.append(slot)
        if any(r.slot < -1 for r in records.values()):
            raise ValueError(f"adapter slots must be >= -1: {[r.slot for r in records.values()]}")
        width = max((len(t) for t in tables), default=0)
        padded = [t + [-1] * (width - len(t)) for t in tables]
        seqs = tuple(records[i] for i in range(len(records)))

        def dev(values: list, dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype).to(device)

        return cls(
            token_ids=dev(tokens, torch.long), positions=dev(positions, torch.long),
            slot_mapping=dev(slots, torch.long), seqs=seqs, num_prefill_tokens=n_pre,
            prefill_spans=tuple(spans), segments=Segments.from_lengths(seg_lengths, seg_slots, device),
            decode_slot_ids=dev(dec_slots, torch.int32),
            block_tables=dev(padded, torch.int32).reshape(len(tables), width),
            context_lens=dev(ctx_lens, torch.int32),
            last_token_index=dev([r.start + r.length - 1 for r in seqs], torch.long))


@dataclass(frozen=True)
class LoRABatch:
    """What every layer needs for unmerged LoRA: the resident slots and each token's slot.

    ``prefill_segments`` / ``decode_slot_ids`` are None when no token of that kind uses an
    adapter, so those launches are skipped.
    """

    layers: Sequence[LayerStacks]
    prefill_segments: Segments | None
    decode_slot_ids: Tensor | None
    backend: Backend = "auto"

    @classmethod
    def build(cls, batch: FlatBatch, pool: AdapterPool, backend: Backend = "auto") -> "LoRABatch":
        used = {r.slot for r in batch.seqs if r.slot >= 0}
        empty = sorted(used - set(pool.resident()))
        if empty:
            raise ValueError(f"batch uses adapter slots {empty}, which hold no adapter")
        pre = any(r.slot >= 0 for r in batch.seqs if r.is_prefill)
        dec = any(r.slot >= 0 for r in batch.seqs if not r.is_prefill)
        return cls(pool.layers, batch.segments if pre else None,
                   batch.decode_slot_ids if dec else None, backend)
