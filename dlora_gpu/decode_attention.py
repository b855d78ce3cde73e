"""Decode attention over a paged KV cache: one query token per sequence against its cached context.

``decode_attention(q, k_cache, v_cache, block_tables, context_lens, backend=...)``:
- q: [S, H, D] (one token per sequence; its own K/V must already be in the cache);
- k_cache, v_cache: one layer's blocks, [num_blocks, block_size, H_kv, D];
- block_tables: int32 [S, max_blocks], row s lists sequence s's blocks in order, padded with -1;
- context_lens: int32 [S], positions 0..context_len-1 are attended (GQA: q head h reads kv head
  h // (H // H_kv)).

Backends: ``triton`` (`dlora_gpu.kernels.paged_attention`, online softmax in fp32), ``torch``
(gather every sequence's blocks, masked fp32 softmax -- for CPUs and as the readable second
opinion), ``auto`` = triton on CUDA, torch otherwise.
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
    """Gather each sequence's blocks into a padded [S, max_blocks*block_size] context, mask, softmax."""
    s, h, d = q.shape
    h_kv = k_cache.shape[2]
    tables = block_tables.long().clamp(min=0)  # padding reads block 0; masked below
    past = torch.arange(tables.shape[1] * k_cache.shape[1], device=q.device)[None, :] >= \
        context_lens.to(q.device).long()[:, None]  # [S, N]: positions past each context
    # Zero K/V past the context, not just the scores: stale slots may hold inf/NaN, and 0 * NaN = NaN.
    k = k_cache[tables].reshape(s, -1, h_kv, d).float().masked_fill(past[..., None, None], 0.0)
    v = v_cache[tables].reshape(s, -1, h_kv, d).float().masked_fill(past[..., None, None], 0.0)
    qg = q.float().reshape(s, h_kv, h // h_kv, d)  # q heads grouped by the kv head they read
    scores = torch.einsum("skgd,snkd->skgn", qg, k) / math.sqrt(d)
    scores = scores.masked_fill(past[:, None, None, :], float("-inf"))
    out = torch.einsum("skgn,snkd->skgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(s, h, d).to(q.dtype)
