"""Paged decode attention: one query token per sequence against its KV blocks, online softmax in fp32.

One program per (sequence, query head). It walks the sequence's block table one KV block at a time
(a block is a [block_size, D] tile of one kv head), so memory traffic is exactly the context's K/V
and nothing is gathered into a contiguous copy first. Scores, the running max/sum and the output
accumulator stay in fp32 (flash-decoding without the split over the context: a decode batch
already gives sequences x heads programs). Under GQA the query heads of one kv head re-read the
same blocks, which then come from L2.

Loop bounds are runtime values (the number of blocks of each sequence), so one compiled kernel per
dtype, head dim and block size serves every batch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dlora_gpu.kernels._common import check_device, next_pow2


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, ctx_ptr,
    stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_os, stride_oh, stride_ts,
    GROUP, BLOCK_SIZE, D, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    ctx = tl.load(ctx_ptr + seq)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    t = tl.arange(0, BLOCK_T)
    t_ok = t < BLOCK_SIZE
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + head * stride_qh + d, mask=d_ok,
                other=0.0).to(tl.float32) * scale
    m = tl.full([1], float("-inf"), tl.float32)
    l_sum = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    kv_off = kv_head * stride_kh + t[:, None] * stride_kt + d[None, :]
    for j in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
        block = tl.load(table_ptr + seq.to(tl.int64) * stride_ts + j).to(tl.int64)
        valid = t_ok & (j * BLOCK_SIZE + t < ctx)
        mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + block * stride_kb + kv_off, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + block * stride_kb + kv_off, mask=mask, other=0.0).to(tl.float32)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = acc / l_sum
    tl.store(out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                    num_warps: int = 4) -> torch.Tensor:
    """q [S, H, D], caches [blocks, block_size, H_kv, D] -> out [S, H, D] (q's dtype).

    Every context_len must be >= 1 and covered by its row of `block_tables` (int32, -1 padded).
    """
    check_device(q, k_cache, v_cache, block_tables, context_lens)
    s, h, d = q.shape
    _, block_size, h_kv, _ = k_cache.shape
    if q.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("q's head dim and the caches must be contiguous")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    out = torch.empty_like(q)
    if s == 0:
        return out
    _paged_decode_kernel[(s, h)](
        q, k_cache, v_cache, out, block_tables, context_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        h // h_kv, block_size, d, 1.0 / math.sqrt(d),
        BLOCK_T=next_pow2(block_size), BLOCK_D=next_pow2(d), num_warps=num_warps,
    )
    return out
