"""Shared by the kernel tests: random adapter stacks with poisoned padding, and a float64 reference."""

from __future__ import annotations

import torch

from dlora_gpu.lora_stack import LoRAStack

# Relative Frobenius error bounds: fp32 and fp16 from the acceptance criteria; bf16 keeps 8 bits of
# mantissa, so its own output rounding is ~1e-3 rms and it gets 4e-3 (one bf16 epsilon).
TOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 4e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_stack(ranks: list[int], in_features: int, slice_sizes: tuple[int, ...], max_rank: int,
               dtype: torch.dtype, device: str, seed: int = 0) -> LoRAStack:
    """Random adapters of the given ranks; a rank of 0 leaves the slot empty."""
    g = torch.Generator().manual_seed(seed)
    stack = LoRAStack.empty(len(ranks), in_features, slice_sizes, max_rank, dtype, device)
    # NaN in the padding: any unmasked read of it would poison the output.
    stack.A.fill_(float("nan"))
    stack.B.fill_(float("nan"))
    for slot, r in enumerate(ranks):
        if r == 0:
            continue
        a = [torch.randn(r, in_features, generator=g) / in_features ** 0.5 for _ in slice_sizes]
        b = [torch.randn(n, r, generator=g) / r ** 0.5 for n in slice_sizes]
        stack.load(slot, [t.to(dtype) for t in a], [t.to(dtype) for t in b], scale=2.0 / r)
        stack.A[slot, :, r:] = float("nan")
        stack.B[slot, :, r:] = float("nan")
    return stack


def reference(y0: torch.Tensor, x: torch.Tensor, stack: LoRAStack, slot_ids: list[int]) -> torch.Tensor:
    y = y0.double().cpu().clone()
    for t, slot in enumerate(slot_ids):
        if slot < 0:
            continue
        for (a, b), off, n in zip(stack.slot_weights(slot), stack.slice_offsets, stack.slice_sizes):
            v = x[t].double().cpu() @ a.double().cpu().T
            y[t, off:off + n] += stack.scales_host[slot] * (v @ b.double().cpu().T)
    return y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double().cpu() - ref).norm() / ref.norm())
