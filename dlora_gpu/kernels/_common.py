"""Helpers shared by the LoRA kernels: bf16 bit tricks for the interpreter, and launch checks.

The Triton interpreter (TRITON_INTERPRET=1) has two bf16 gaps that matter for exact tests:
fp32->bf16 stores truncate instead of rounding to nearest even, and bf16 `tl.dot` returns garbage.
Launchers therefore pass bf16 outputs as int16 bit views with ``BF16_BITS=True`` and do dots in fp32
when interpreting; on a GPU the native (rounding, tensor-core) paths are used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_device(*tensors: torch.Tensor) -> None:
    """Fail early and clearly instead of inside a kernel launch."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"tensors on different devices: {t.device} vs {dev}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError("triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                           "importing triton to run on CPU; use backend='torch' otherwise")


def bf16_bits_mode(t: torch.Tensor) -> bool:
    """True when a bf16 output must go through the manual-RNE int16 path (interpreter only)."""
    return t.dtype == torch.bfloat16 and interpreting()


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs use exact IEEE dots (not TF32); bf16 under the interpreter must be upcast."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


@triton.jit
def bf16_bits_to_f32(bits):
    """int16 holding a bf16 bit pattern -> fp32 (exact)."""
    return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits_rne(x):
    """fp32 -> bf16 bit pattern in an int16, rounding to nearest even (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
