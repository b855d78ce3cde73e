"""Fused merge pass: out = round_rne(pristine + scale * B @ A), one read of W and one write.

Why this shape: merge, unmerge and adapter-to-adapter switch all become a pure function of (pristine
weights, target adapter), so no rounding error can accumulate however many switches happen, and a
switch a->b costs one pass instead of unmerge(a) + merge(b). Each program owns a [BLOCK_N, BLOCK_K]
tile of W: it computes the B@A tile with one `tl.dot` over the (padded, masked) rank in fp32, adds the
fp32-upcast pristine tile and rounds once to W's dtype (native RNE on GPU; the manual bit-pattern RNE
under the interpreter, whose bf16 stores truncate). The pass is memory-bound: 2 bytes read + 2 written
per weight for fp16/bf16; A and B are < 2% of that at rank <= 64.

fp16 x fp16 products are exact in fp32, so only the fp32 sum over the rank (at most r-1 roundings) and
the final round-to-nearest separate this from the float64 result (half an ulp plus ~r fp32
roundings of the operands; the tests check exactly that bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlora_gpu.kernels._common import (bf16_bits_mode, check_device, dot_in_fp32,
                                       f32_to_bf16_bits_rne, next_pow2)


@triton.jit
def _fused_merge_kernel(
    out_ptr, w_ptr, a_ptr, b_ptr, scale, N, K, rank,
    stride_on, stride_wn, stride_ar, stride_bn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, BF16_BITS: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_N
    ln = tl.arange(0, BLOCK_N)
    n = row0 + ln
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    base = row0.to(tl.int64)  # 64-bit scalar row bases, 32-bit tile offsets: fewer registers
    r = tl.arange(0, BLOCK_R)
    n_ok = n < N
    k_ok = k < K
    r_ok = r < rank
    b = tl.load(b_ptr + base * stride_bn + ln[:, None] * stride_bn + r[None, :],
                mask=n_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(a_ptr + r[:, None] * stride_ar + k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                other=0.0)
    if DOT_FP32:
        ba = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    else:
        ba = tl.dot(b, a)
    mask = n_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + base * stride_wn + ln[:, None] * stride_wn + k[None, :], mask=mask,
                other=0.0).to(tl.float32)
    out_ptrs = out_ptr + base * stride_on + ln[:, None] * stride_on + k[None, :]
    merged = w + scale * ba
    if BF16_BITS:
        tl.store(out_ptrs, f32_to_bf16_bits_rne(merged), mask=mask)
    else:
        tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=mask)


def fused_merge(out: torch.Tensor, pristine: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float, *, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """out[N, K] = round(pristine + scale * b[N, r] @ a[r, K]); out may alias pristine."""
    check_device(out, pristine, a, b)
    N, K = pristine.shape
    r = a.shape[0]
    if out.shape != (N, K) or a.shape != (r, K) or b.shape != (N, r):
        raise ValueError(f"shapes do not fit: out {tuple(out.shape)}, W {tuple(pristine.shape)}, "
                         f"A {tuple(a.shape)}, B {tuple(b.shape)}")
    if len({out.dtype, pristine.dtype, a.dtype, b.dtype}) != 1:
        raise ValueError("out, pristine, A and B must share a dtype")
    if min(out.stride(1), pristine.stride(1), a.stride(1), b.stride(1)) != 1:
        raise ValueError("rows of out, pristine, A and B must be contiguous")
    block_n = max(16, min(block_n, next_pow2(N)))
    block_k = max(16, min(block_k, next_pow2(K)))
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    bits = bf16_bits_mode(out)
    _fused_merge_kernel[grid](
        out.view(torch.int16) if bits else out, pristine, a, b, float(scale), N, K, r,
        out.stride(0), pristine.stride(0), a.stride(0), b.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, next_pow2(r)),
        DOT_FP32=dot_in_fp32(out.dtype), BF16_BITS=bits,
        num_warps=8,  # 64x128 fp32 tile: ~100 registers a thread at 8 warps, no spills (sm_90)
    )
    return out
