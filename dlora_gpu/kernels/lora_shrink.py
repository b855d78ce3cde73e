"""LoRA shrink, v = x @ A[slot]^T for every fused slice at once, accumulated in fp32.

Why two kernels:
- decode (BGMV-like): one token per program row, each token names its own slot. A decode token is a
  matrix-vector product against a [S*R, K] adapter, so the kernel is a broadcast-multiply + row sum in
  fp32 (no `tl.dot`, which needs 16 rows); tokens sharing an adapter re-read it from L2.
- prefill (SGMV-like): tokens sorted into contiguous per-adapter segments; each program does a
  [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_R] tile GEMM with `tl.dot`, reading each adapter once per
  M-tile.

Both grid over (tokens or segment x M-tile, row blocks of the S*R output rows, split-K). Rank, row
counts and split-K are runtime arguments, not constexprs, so one compiled kernel per dtype/tile
serves every rank and batch (compiles cost seconds each on a fresh GPU machine). With split-K
> 1 partial sums either meet by fp32 `atomic_add` into a zeroed buffer (Triton has no bf16 atomics,
and fp32 is what expand wants anyway), or, in decode "partials" mode (what `lora_apply` uses, by the
tuning table in `tuning.py`), are stored to one slab per split and summed by expand: no memset launch,
no atomics, reproducible bits. Rows whose in-slice index is >= ranks[slot] are masked: that is how
heterogeneous ranks share one padded stack. Slot -1 (no adapter) and empty segments exit at once, so
grids can be sized from host-known bounds and stay CUDA-graph friendly.

Output v is [T, S*R] fp32: columns at or past a slot's rank are zero, slot -1 rows are left
unwritten (expand skips them). With split-K the fp32 atomics make v's last bits depend on arrival
order (run to run); merge, which must be bit-reproducible, uses no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlora_gpu.kernels import tuning
from dlora_gpu.kernels._common import check_device, dot_in_fp32, next_pow2
from dlora_gpu.lora_stack import LoRAStack, Segments


@triton.jit
def _shrink_decode_kernel(
    x_ptr, a_ptr, v_ptr, slot_ptr, rank_ptr,
    K, stride_xt, stride_as, stride_ar, stride_vt, stride_vk, R, NR, SPLIT_K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, LATE_SUM: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    t = tl.program_id(0)
    rb = tl.program_id(1)
    ks = tl.program_id(2)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    rank = tl.load(rank_ptr + slot)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < NR) & ((rows % R) < rank)
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + rows[:, None] * stride_ar
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = ks * k_span
    if LATE_SUM:  # elementwise fp32 accumulation, one reduction at the end: no barrier in the loop
        acc2 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, k_span, BLOCK_K):
            k = k_lo + k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            # x read as a full tile in A's layout (repeats hit L1): no layout shuffle via shared
            # memory, hence no barrier, inside the loop.
            xt = tl.load(x_ptr + t.to(tl.int64) * stride_xt + k[None, :] + 0 * rows[:, None],
                         mask=k_ok[None, :] & (rows >= 0)[:, None], other=0.0)
            a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc2 += a.to(tl.float32) * xt.to(tl.float32)
        acc = tl.sum(acc2, axis=1)
    else:
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, k_span, BLOCK_K):
            k = k_lo + k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            xv = tl.load(x_ptr + t.to(tl.int64) * stride_xt + k, mask=k_ok, other=0.0)
            a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
    # Partials mode (ATOMIC=False): split ks owns slab ks (stride_vk apart); expand sums the slabs.
    out = v_ptr + ks.to(tl.int64) * stride_vk + t.to(tl.int64) * stride_vt + rows
    if ATOMIC and SPLIT_K > 1:
        tl.atomic_add(out, acc, mask=rows < NR, sem="relaxed")
    else:
        tl.store(out, acc, mask=rows < NR)


@triton.jit
def _shrink_segment_kernel(
    x_ptr, a_ptr, v_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, rank_ptr,
    K, stride_xt, stride_as, stride_ar, stride_vt, R, NR, ROW_BLOCKS, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seg = tl.program_id(0)
    mb = tl.program_id(1)
    rb = tl.program_id(2) % ROW_BLOCKS
    ks = tl.program_id(2) // ROW_BLOCKS
    slot = tl.load(seg_slot_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    if (slot < 0) | (mb * BLOCK_M >= length):
        return
    start = tl.load(seg_start_ptr + seg)
    rank = tl.load(rank_ptr + slot)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < length
    first = start.to(tl.int64)  # 64-bit scalar bases, 32-bit tile offsets: fewer registers
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = (rows < NR) & ((rows % R) < rank)
    a_cols = a_ptr + slot.to(tl.int64) * stride_as + rows[None, :] * stride_ar
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = ks * k_span
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, k_span, BLOCK_K):
        k = k_lo + k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x_ptr + first * stride_xt + m[:, None] * stride_xt + k[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_cols + k[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    out = v_ptr + first * stride_vt + m[:, None] * stride_vt + rows[None, :]
    mask = m_ok[:, None] & (rows < NR)[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def _check(x: torch.Tensor, stack: LoRAStack) -> None:
    check_device(x, stack.A, stack.ranks)
    if x.dim() != 2 or x.shape[1] != stack.in_features:
        raise ValueError(f"x must be [T, {stack.in_features}], got {tuple(x.shape)}")
    if x.dtype != stack.A.dtype:
        raise ValueError(f"x dtype {x.dtype} != adapter dtype {stack.A.dtype}")
    if x.stride(1) != 1 or not stack.A.is_contiguous():
        raise ValueError("x rows and the A stack must be contiguous")


def _alloc_v(x: torch.Tensor, nr: int, split_k: int) -> torch.Tensor:
    alloc = torch.zeros if split_k > 1 else torch.empty
    return alloc(x.shape[0], nr, dtype=torch.float32, device=x.device)


def decode_split_k(tokens: int, row_blocks: int, k: int, block_k: int, target_programs: int) -> int:
    """Split-K so that tokens x row blocks x splits reaches about `target_programs` (>= 1 K-tile each)."""
    return max(1, min(triton.cdiv(k, block_k), target_programs // max(1, tokens * row_blocks)))


def shrink_decode(x: torch.Tensor, stack: LoRAStack, slot_ids: torch.Tensor, *,
                  split_k: int | None = None, block_k: int | None = None,
                  block_r: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, target_programs: int | None = None,
                  late_sum: bool | None = None, partials: bool | None = None) -> torch.Tensor:
    """v[t] = x[t] @ A[slot_ids[t]]^T for all slices -> [T, S*R] fp32 (rows of slot -1 undefined).

    With ``partials`` the split-K partial sums come back unreduced as [split_k, T, S*R] (their sum is
    v; `expand_decode` accepts that form): no zeroed buffer, no atomics, bit-reproducible; default
    off, `lora_apply` turns it on as the tuning table says. Other arguments left None come from
    `dlora_gpu.kernels.tuning.SHRINK_DECODE` for this batch and rank.
    """
    _check(x, stack)
    T, K = x.shape
    R, NR = stack.max_rank, stack.num_slices * stack.max_rank
    cfg = tuning.pick(tuning.SHRINK_DECODE, T, R)
    block_k = cfg["block_k"] if block_k is None else block_k
    block_r = cfg["block_r"] if block_r is None else block_r
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    late_sum = cfg["late_sum"] if late_sum is None else late_sum
    partials = bool(partials)  # the table's choice is applied by lora_apply: v stays 2-D here
    block_r = min(next_pow2(NR), block_r)
    row_blocks = triton.cdiv(NR, block_r)
    block_k = min(block_k, next_pow2(K))
    if split_k is None:
        split_k = decode_split_k(T, row_blocks, K, block_k,
                                 cfg["target_programs"] if target_programs is None
                                 else target_programs)
    if partials:
        v = torch.empty(split_k, T, NR, dtype=torch.float32, device=x.device)
    else:
        v = _alloc_v(x, NR, split_k)
    if T == 0:
        return v
    _shrink_decode_kernel[(T, row_blocks, split_k)](
        x, stack.A, v, slot_ids, stack.ranks,
        K, x.stride(0), stack.A.stride(0), stack.A.stride(2), NR, T * NR if partials else 0,
        R, NR, split_k, BLOCK_R=block_r, BLOCK_K=block_k, LATE_SUM=bool(late_sum),
        ATOMIC=not partials, num_warps=num_warps, num_stages=num_stages,
    )
    return v


def shrink_segments(x: torch.Tensor, stack: LoRAStack, segs: Segments, *,
                    split_k: int = 1, block_m: int = 32, block_k: int = 64) -> torch.Tensor:
    """Segment (prefill) shrink: same output as `shrink_decode` for tokens grouped by adapter."""
    _check(x, stack)
    T, K = x.shape
    R, NR = stack.max_rank, stack.num_slices * stack.max_rank
    block_r = max(16, min(next_pow2(NR), 64))
    row_blocks = triton.cdiv(NR, block_r)
    block_m = max(16, min(block_m, next_pow2(max(segs.max_len, 1))))
    block_k = max(16, min(block_k, next_pow2(K)))
    v = _alloc_v(x, NR, split_k)
    n_seg = len(segs.lengths_host)
    if T == 0 or n_seg == 0 or segs.max_len == 0:
        return v
    grid = (n_seg, triton.cdiv(segs.max_len, block_m), row_blocks * split_k)
    _shrink_segment_kernel[grid](
        x, stack.A, v, segs.starts, segs.lengths, segs.slots, stack.ranks,
        K, x.stride(0), stack.A.stride(0), stack.A.stride(2), v.stride(0),
        R, NR, row_blocks, split_k,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, DOT_FP32=dot_in_fp32(x.dtype),
    )
    return v
