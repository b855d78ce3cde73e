"""One entry point for unmerged multi-adapter LoRA, `lora_apply`, plus the baselines we measure against.

``lora_apply(y, x, stack, slot_ids=... | segments=...)`` adds, in place, for every token t whose slot
is >= 0: ``y[t, slice s] += scales[slot] * (x[t] @ A[slot, s, :r]^T) @ B[slot, slice s, :r]^T``.
Decode batches pass per-token ``slot_ids`` (int32, -1 = no adapter); prefill batches pass
``Segments`` (tokens already sorted into contiguous per-adapter runs).

Backends:
- ``triton``: the shrink/expand kernels in `dlora_gpu.kernels` (two launches per projection group,
  whatever the number of slices, adapters or ranks).
- ``torch``: a loop over the distinct adapters (or segments) of the batch with fp32 matmuls -- for
  machines without a GPU and as a readable second opinion in tests.
- ``auto``: triton on CUDA tensors, torch otherwise (the interpreter is opt-in: ask for ``triton``).

The baselines `einsum_resident` (the dLoRA artifact's dense one-hot einsum over all resident
adapters) and `gather_bmm` (materialise each token's adapter, then batched matmuls) exist for
`benchmarks/kernels.py`; they compute in the adapter dtype as those implementations do.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dlora_gpu.lora_stack import LoRAStack, Segments

Backend = Literal["auto", "triton", "torch"]


def resolve_backend(backend: Backend, x: Tensor) -> Literal["triton", "torch"]:
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'triton' or 'torch'")
    return backend


def lora_apply(y: Tensor, x: Tensor, stack: LoRAStack, *, slot_ids: Tensor | None = None,
               segments: Segments | None = None, backend: Backend = "auto") -> Tensor:
    """y += LoRA(x) for a mixed-adapter batch (see module docstring); returns y."""
    if (slot_ids is None) == (segments is None):
        raise ValueError("pass exactly one of slot_ids (decode) or segments (prefill)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens but y has {y.shape[0]}")
    if segments is not None and segments.num_tokens != x.shape[0]:
        raise ValueError(f"segments cover {segments.num_tokens} tokens, x has {x.shape[0]}")
    if slot_ids is not None and (slot_ids.shape != (x.shape[0],) or slot_ids.dtype != torch.int32):
        raise ValueError(f"slot_ids must be int32 [{x.shape[0]}], got {slot_ids.dtype} "
                         f"{tuple(slot_ids.shape)}")
    if resolve_backend(backend, x) == "triton":
        from dlora_gpu.kernels.lora_expand import expand_decode, expand_segments
        from dlora_gpu.kernels.lora_shrink import shrink_decode, shrink_segments
        if slot_ids is not None:
            from dlora_gpu.kernels import tuning
            partials = tuning.pick(tuning.SHRINK_DECODE, x.shape[0], stack.max_rank)["partials"]
            expand_decode(y, shrink_decode(x, stack, slot_ids, partials=partials), stack, slot_ids)
        else:
            assert segments is not None
            expand_segments(y, shrink_segments(x, stack, segments), stack, segments)
        return y
    if slot_ids is not None:
        _torch_apply(y, x, stack, _token_groups(slot_ids))
    else:
        assert segments is not None
        # a prefill segment is contiguous: a slice is a view, so no gather or scatter copies of
        # [tokens, features] per adapter and slice (they made unmerged prefill cost follow the
        # hidden size per token, which no LoRA cost model charges)
        groups = [(slot, slice(st, st + n)) for st, n, slot in zip(segments.starts_host, segments.lengths_host,
                                                                   segments.slots_host) if n > 0 and slot >= 0]
        _torch_apply(y, x, stack, groups)
    return y


def _token_groups(slot_ids: Tensor) -> list[tuple[int, Tensor]]:
    """(slot, token indices) for each distinct slot >= 0 in a decode batch."""
    return [(int(s), torch.nonzero(slot_ids == s).flatten())
            for s in torch.unique(slot_ids).tolist() if s >= 0]


def _torch_apply(y: Tensor, x: Tensor, stack: LoRAStack, groups: list[tuple[int, Tensor | slice]]) -> None:
    """PEFT-style loop over adapters: fp32 shrink and expand, one rounding of y per token. A group's
    tokens are an index tensor (decode) or a slice (a prefill segment)."""
    offs = stack.slice_offsets
    for slot, idx in groups:
        r, scale = stack.ranks_host[slot], stack.scales_host[slot]
        if r == 0 or (isinstance(idx, Tensor) and idx.numel() == 0):
            continue
        xs = x[idx].float()
        for s, (off, n) in enumerate(zip(offs, stack.slice_sizes)):
            v = xs @ stack.A[slot, s, :r].float().T
            delta = (v @ stack.B[slot, off:off + n, :r].float().T) * scale
            y[idx, off:off + n] = (y[idx, off:off + n].float() + delta).to(y.dtype)


def einsum_resident(y: Tensor, x: Tensor, stack: LoRAStack, slot_ids: Tensor) -> Tensor:
    """dLoRA-artifact baseline: every token against every resident adapter, masked by a one-hot.

    Cost grows with the number of resident slots, not with the adapters the batch uses.
    """
    # A comparison, not F.one_hot: one_hot validates its input with a device sync (no CUDA graphs).
    slots = torch.arange(stack.num_slots, device=x.device, dtype=slot_ids.dtype)
    weight = ((slot_ids[:, None] == slots[None, :]) * stack.scales[None, :]).to(x.dtype)  # [T, slots]
    for s, (off, n) in enumerate(zip(stack.slice_offsets, stack.slice_sizes)):
        v = torch.einsum("tk,ark->tar", x, stack.A[:, s]) * weight[:, :, None]
        y[:, off:off + n] += torch.einsum("tar,anr->tn", v, stack.B[:, off:off + n])
    return y


def gather_bmm(y: Tensor, x: Tensor, stack: LoRAStack, slot_ids: Tensor) -> Tensor:
    """Gather each token's adapter into a [T, ...] copy, then two batched matmuls per slice."""
    valid = slot_ids >= 0
    idx = slot_ids.clamp(min=0).long()
    scale = (stack.scales[idx] * valid).to(x.dtype)[:, None, None]
    a_g = stack.A[idx]  # [T, S, R, K]
    for s, (off, n) in enumerate(zip(stack.slice_offsets, stack.slice_sizes)):
        v = torch.bmm(a_g[:, s], x[:, :, None]) * scale  # [T, R, 1]
        y[:, off:off + n] += torch.bmm(stack.B[idx, off:off + n], v)[:, :, 0]
    return y
