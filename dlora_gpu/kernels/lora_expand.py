"""LoRA expand, y[:, slice] += scale[slot] * v_slice @ B[slot, slice]^T, in place, all slices at once.

Why in place: the base GEMM already wrote y = x @ W^T; adding the LoRA delta where y lives avoids a
second output buffer and an extra pass. The sum y + delta is formed in fp32 and rounded once to y's
dtype, so a LoRA op costs exactly one rounding of y.

Fused slices (qkv: 3, gate_up: 2) are one launch: grid axis 2 is (slice x N-block); slices may have
different widths (GQA), programs past a slice's width exit early, so the grid is sized from the widest
slice. The stack's B is [slots, N_total, R] with the slices concatenated, so slice s's rows are also
its columns in y.

Decode: per-token slot ids, fp32 broadcast-multiply + row sum (a token is a vector). Prefill: per
adapter segments, `tl.dot` on [BLOCK_M, BLOCK_R] x [BLOCK_R, BLOCK_N] tiles; v is rounded to the
adapter dtype before the dot (tensor cores need matching inputs; the error is one half-ulp of v),
except for fp32 inputs, which use IEEE fp32 dots. Rank masking: columns r >= ranks[slot] of v and B
are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlora_gpu.kernels._common import (bf16_bits_mode, bf16_bits_to_f32, check_device, dot_in_fp32,
                                       f32_to_bf16_bits_rne, next_pow2)
from dlora_gpu.kernels import tuning
from dlora_gpu.lora_stack import LoRAStack, Segments


@triton.jit
def _add_into_y(y_ptrs, delta, mask, BF16_BITS: tl.constexpr):
    """y += delta with one rounding; BF16_BITS: y is an int16 view of bf16 (interpreter RNE path)."""
    if BF16_BITS:
        y = bf16_bits_to_f32(tl.load(y_ptrs, mask=mask, other=0))
        tl.store(y_ptrs, f32_to_bf16_bits_rne(y + delta), mask=mask)
    else:
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + delta).to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _expand_decode_kernel(
    v_ptr, b_ptr, y_ptr, slot_ptr, rank_ptr, scale_ptr, slice_off_ptr, slice_size_ptr,
    stride_vt, stride_vk, V_SPLITS, stride_bs, stride_bn, stride_yt, R, N_BLOCKS,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS_P2: tl.constexpr, ALIGN: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    t = tl.program_id(0)
    nb = tl.program_id(1) % N_BLOCKS
    s = tl.program_id(1) // N_BLOCKS
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    n_size = tl.load(slice_size_ptr + s)
    off = tl.load(slice_off_ptr + s)
    if ALIGN > 1:  # every slice size/offset is a multiple of ALIGN: y loads/stores can be vectors
        n_size = tl.multiple_of(n_size, ALIGN)
        off = tl.multiple_of(off, ALIGN)
    if nb * BLOCK_N >= n_size:
        return
    rank = tl.load(rank_ptr + slot)
    scale = tl.load(scale_ptr + slot)
    r = tl.arange(0, BLOCK_R)
    r_in = r < R  # R (the stack's padded rank) is a launch constant: keeps B loads vectorised
    # v columns >= rank are zero (shrink writes them), so v needs only the R mask; split-K partial
    # slabs (V_SPLITS > 1) are summed here, one 2-D load.
    sp = tl.arange(0, SPLITS_P2)
    vs = tl.load(v_ptr + sp[:, None].to(tl.int64) * stride_vk + t.to(tl.int64) * stride_vt
                 + s * R + r[None, :], mask=(sp < V_SPLITS)[:, None] & r_in[None, :], other=0.0)
    vv = tl.sum(vs, axis=0)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_size
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + (off + n)[:, None] * stride_bn + r[None, :],
                mask=n_ok[:, None] & r_in[None, :], other=0.0)
    # Padding columns (rank <= r < R) are loaded but never used: they may hold anything (NaN too).
    b = tl.where((r < rank)[None, :], b.to(tl.float32), 0.0)
    delta = tl.sum(b * vv[None, :], axis=1) * scale
    _add_into_y(y_ptr + t.to(tl.int64) * stride_yt + off + n, delta, n_ok, BF16_BITS)


@triton.jit
def _expand_segment_kernel(
    v_ptr, b_ptr, y_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, rank_ptr, scale_ptr,
    slice_off_ptr, slice_size_ptr,
    stride_vt, stride_bs, stride_bn, stride_yt, R, N_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, BF16_BITS: tl.constexpr,
):
    seg = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2) % N_BLOCKS
    s = tl.program_id(2) // N_BLOCKS
    slot = tl.load(seg_slot_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    if (slot < 0) | (mb * BLOCK_M >= length):
        return
    n_size = tl.load(slice_size_ptr + s)
    if nb * BLOCK_N >= n_size:
        return
    start = tl.load(seg_start_ptr + seg)
    off = tl.load(slice_off_ptr + s)
    rank = tl.load(rank_ptr + slot)
    scale = tl.load(scale_ptr + slot)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < length
    first = start.to(tl.int64)  # 64-bit scalar bases, 32-bit tile offsets: fewer registers
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    vv = tl.load(v_ptr + first * stride_vt + m[:, None] * stride_vt + s * R + r[None, :],
                 mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_size
    bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + (off + n)[None, :] * stride_bn + r[:, None],
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    if DOT_FP32:
        delta = tl.dot(vv, bt.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(vv.to(bt.dtype), bt)
    _add_into_y(y_ptr + first * stride_yt + m[:, None] * stride_yt + off + n[None, :], delta * scale,
                m_ok[:, None] & n_ok[None, :], BF16_BITS)


def _check(y: torch.Tensor, v: torch.Tensor, stack: LoRAStack) -> torch.Tensor:
    """Validate and return the y argument to pass (an int16 view for interpreter bf16)."""
    check_device(y, v, stack.B, stack.ranks)
    T = y.shape[0]
    if y.dim() != 2 or y.shape[1] != stack.out_features or y.stride(1) != 1:
        raise ValueError(f"y must be [T, {stack.out_features}] with contiguous rows, "
                         f"got {tuple(y.shape)} strides {y.stride()}")
    if v.shape != (T, stack.num_slices * stack.max_rank) or v.dtype != torch.float32:
        raise ValueError(f"v must be fp32 [{T}, {stack.num_slices * stack.max_rank}], got "
                         f"{v.dtype} {tuple(v.shape)}")
    if not stack.B.is_contiguous() or not v.is_contiguous():
        raise ValueError("the B stack and v must be contiguous")
    return y.view(torch.int16) if bf16_bits_mode(y) else y


def slice_align(sizes: tuple[int, ...], cap: int = 16) -> int:
    """Largest power of two <= cap dividing every slice size (hence every offset): a vector width."""
    a = cap
    while a > 1 and any(n % a for n in sizes):
        a //= 2
    return a


def expand_decode(y: torch.Tensor, v: torch.Tensor, stack: LoRAStack, slot_ids: torch.Tensor, *,
                  block_n: int | None = None, num_warps: int | None = None) -> None:
    """y[t, slice s] += scale * v[t, s*R:(s+1)*R] @ B[slot, slice s]^T for every token with slot >= 0.

    v is [T, S*R] fp32, or split-K partials [splits, T, S*R] from ``shrink_decode(partials=True)``.
    Arguments left None come from `dlora_gpu.kernels.tuning.EXPAND_DECODE`.
    """
    if v.dim() not in (2, 3) or not v.is_contiguous():
        raise ValueError(f"v must be contiguous [T, S*R] or [splits, T, S*R], got {tuple(v.shape)}")
    splits = v.shape[0] if v.dim() == 3 else 1
    y_arg = _check(y, v[0] if v.dim() == 3 else v, stack)
    T = y.shape[0]
    if T == 0:
        return
    cfg = tuning.pick(tuning.EXPAND_DECODE, T, stack.max_rank)
    block_n = cfg["block_n"] if block_n is None else block_n
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    block_n = min(block_n, next_pow2(max(stack.slice_sizes)))
    n_blocks = triton.cdiv(max(stack.slice_sizes), block_n)
    _expand_decode_kernel[(T, n_blocks * stack.num_slices)](
        v, stack.B, y_arg, slot_ids, stack.ranks, stack.scales,
        stack.slice_offsets_t, stack.slice_sizes_t,
        v.stride(-2), v.stride(0) if v.dim() == 3 else 0, splits,
        stack.B.stride(0), stack.B.stride(1), y.stride(0),
        stack.max_rank, n_blocks, BLOCK_N=block_n,
        BLOCK_R=max(16, next_pow2(stack.max_rank)), SPLITS_P2=next_pow2(splits),
        ALIGN=slice_align(stack.slice_sizes), BF16_BITS=bf16_bits_mode(y), num_warps=num_warps,
    )


def expand_segments(y: torch.Tensor, v: torch.Tensor, stack: LoRAStack, segs: Segments, *,
                    block_m: int = 32, block_n: int = 64) -> None:
    """Segment (prefill) expand: same effect as `expand_decode` for tokens grouped by adapter."""
    y_arg = _check(y, v, stack)
    n_seg = len(segs.lengths_host)
    if y.shape[0] == 0 or n_seg == 0 or segs.max_len == 0:
        return
    block_m = max(16, min(block_m, next_pow2(segs.max_len)))
    block_n = max(16, min(block_n, next_pow2(max(stack.slice_sizes))))
    n_blocks = triton.cdiv(max(stack.slice_sizes), block_n)
    grid = (n_seg, triton.cdiv(segs.max_len, block_m), n_blocks * stack.num_slices)
    _expand_segment_kernel[grid](
        v, stack.B, y_arg, segs.starts, segs.lengths, segs.slots, stack.ranks, stack.scales,
        stack.slice_offsets_t, stack.slice_sizes_t,
        v.stride(0), stack.B.stride(0), stack.B.stride(1), y.stride(0),
        stack.max_rank, n_blocks, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_R=max(16, next_pow2(stack.max_rank)), DOT_FP32=dot_in_fp32(y.dtype),
        BF16_BITS=bf16_bits_mode(y),
    )
