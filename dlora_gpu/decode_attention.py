"""Decode attention over a paged KV cache: one query token per sequence against its cached context.

``decode_attention(q, k_cache, v_cache, block_tables, context_lens, backend=...)``:
- q: [S, H, D] (one token per sequence; its own K/V must already be in the cache);
- k_cache, v_cache: one layer's blocks, [num_blocks, block_size, H_kv, D];
- block_tables: int32 [S, max_blocks], row s lists sequence s's blocks in order, padded with -1;
- context_lens: int32 [S], positions 0..context_len-1 are attended (GQA: q head h reads kv head
  h // (H // H_kv)).

Backends: ``triton`` (`dlora_gpu.kernels.paged_attention`, online softmax in fp32), ``torch``
(each sequence's own blocks, fp32 softmax -- for CPUs and as the readable second opinion),
``auto`` = triton on CUDA, torch otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dlora_gpu.lora_ops import Backend, resolve_backend


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                     context_lens: Tensor, *, backend: Backend = "auto") -> Tensor:
    """Attention output [S, H, D] in q's dtype (see module docstring)."""
    s, h, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != d or h % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}")
    if block_tables.shape[0] != s or context_lens.shape != (s,):
        raise ValueError(f"{s} queries but block_tables {tuple(block_tables.shape)} and "
                         f"context_lens {tuple(context_lens.shape)}")
    if resolve_backend(backend, q) == "triton":
        from dlora_gpu.kernels.paged_attention import paged_attention
        return paged_attention(q, k_cache, v_cache, block_tables, context_lens)
    return decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens)


def decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor) -> Tensor:
    """Each sequence against exactly its own context, one at a time. Padding every sequence to the
    batch's longest context (one batched einsum) made the cost follow batch x longest context, not
    the sum of contexts that the paged kernel and the simulator's cost model charge: on the CPU
    runtime it made a fitted profile price decode batches of mixed lengths too low."""
    s, h, d = q.shape
    h_kv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(s, h, d, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for i, n in enumerate(context_lens.tolist()):
        blocks = block_tables[i, :-(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, h_kv, d)[:n].float()   # [n, H_kv, D]: no stale slot is read
        v = v_cache[blocks].reshape(-1, h_kv, d)[:n].float()
        qg = q[i].float().reshape(h_kv, h // h_kv, d)          # q heads grouped by the kv head they read
        scores = torch.einsum("kgd,nkd->kgn", qg, k) * scale
        out[i] = torch.einsum("kgn,nkd->kgd", torch.softmax(scores, dim=-1), v).reshape(h, d)
    return out.to(q.dtype)
