"""Multi-adapter LoRA kernels (Triton, and the torch path) against a float64 reference.

Shapes are small and odd on purpose (in=67, slices 45/13/13 like a GQA qkv): they exercise every
mask, and keep the interpreter fast.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dlora_gpu.lora_ops import einsum_resident, gather_bmm, lora_apply  # noqa: E402
from dlora_gpu.lora_stack import LoRAStack, Segments, group_by_slot  # noqa: E402
from lora_reference import DTYPES, TOL, make_stack, reference, rel_err  # noqa: E402

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_mixed_ranks_and_no_adapter(dtype: torch.dtype, backend: str, device: str) -> None:
    stack = make_stack([16, 3, 8, 0, 5], 67, (45, 13, 13), 16, dtype, device)
    ids = [0, 1, -1, 2, 4, 0, 0, 4, -1, 1, 2]
    x = torch.randn(len(ids), 67).to(dtype).to(device)
    y0 = torch.randn(len(ids), 71).to(dtype).to(device)
    slot_ids = torch.tensor(ids, dtype=torch.int32, device=device)
    y = lora_apply(y0.clone(), x, stack, slot_ids=slot_ids, backend=backend)
    delta_ref = reference(torch.zeros_like(y0), x, stack, ids)
    assert rel_err(y.double().cpu() - y0.double().cpu(), delta_ref) < TOL[dtype] * 4
    assert rel_err(y, reference(y0, x, stack, ids)) < TOL[dtype]
    none = torch.tensor(ids, device=device) < 0
    assert torch.equal(y[none], y0[none])  # slot -1 tokens untouched, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_segments_with_empty_and_unassigned(dtype: torch.dtype, backend: str, device: str) -> None:
    stack = make_stack([4, 16, 7], 67, (45, 13, 13), 16, dtype, device, seed=1)
    lengths, slots = [2, 0, 37, 3, 0, 5], [-1, 1, 0, 2, 0, 1]  # a 37-token segment spans 2 M-tiles
    segs = Segments.from_lengths(lengths, slots, device)
    ids = [s for n, s in zip(lengths, slots) for _ in range(n)]
    x = torch.randn(len(ids), 67).to(dtype).to(device)
    y = lora_apply(torch.zeros(len(ids), 71, dtype=dtype, device=device), x, stack,
                   segments=segs, backend=backend)
    ref = reference(torch.zeros(len(ids), 71), x, stack, ids)
    assert rel_err(y, ref) < TOL[dtype]
    assert not y[:2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_and_strided_output(dtype: torch.dtype, device: str) -> None:
    """Split-K partial sums (fp32 atomics) and y as a column window of a wider activation."""
    from dlora_gpu.kernels.lora_expand import expand_decode, expand_segments
    from dlora_gpu.kernels.lora_shrink import shrink_decode, shrink_segments

    stack = make_stack([8, 2], 300, (33, 20), 8, dtype, device, seed=2)  # gate_up-like, 2 slices
    ids = [1, 0, 0, -1, 1]
    slot_ids = torch.tensor(ids, dtype=torch.int32, device=device)
    x = torch.randn(len(ids), 300).to(dtype).to(device)
    ref = reference(torch.zeros(len(ids), 53), x, stack, ids)

    v = shrink_decode(x, stack, slot_ids, split_k=3, block_k=64)
    assert not v[[0, 4]][:, 2:8].any() and not v[[0, 4]][:, 10:].any()  # slot 1: rank 2 of 8
    wide = torch.zeros(len(ids), 60, dtype=dtype, device=device)
    y = wide[:, 4:57]
    expand_decode(y, shrink_decode(x, stack, slot_ids, split_k=3, block_k=64), stack, slot_ids)
    assert rel_err(y, ref) < TOL[dtype]
    assert not wide[:, :4].any() and not wide[:, 57:].any()

    order, segs = group_by_slot(slot_ids)
    ys = torch.zeros(len(ids), 53, dtype=dtype, device=device)
    expand_segments(ys, shrink_segments(x[order], stack, segs, split_k=2, block_k=64), stack, segs)
    assert rel_err(ys, ref[order.cpu()]) < TOL[dtype]


def test_dense_baselines_match_reference(device: str) -> None:
    stack = make_stack([16, 3, 8], 67, (45, 13, 13), 16, torch.float32, device)
    for slot, r in enumerate([16, 3, 8]):  # the dense baselines read the padding: it must be zero
        stack.A[slot, :, r:] = 0
        stack.B[slot, :, r:] = 0
    ids = [2, -1, 0, 1, 1]
    x = torch.randn(len(ids), 67, device=device)
    slot_ids = torch.tensor(ids, dtype=torch.int32, device=device)
    ref = reference(torch.zeros(len(ids), 71), x, stack, ids)
    for fn in (einsum_resident, gather_bmm):
        assert rel_err(fn(torch.zeros(len(ids), 71, device=device), x, stack, slot_ids), ref) < 1e-5


def test_load_zero_fills_padding_and_rejects_bad_shapes() -> None:
    stack = LoRAStack.empty(2, 8, (4,), 4, torch.float32)
    stack.A.fill_(3.0)
    stack.load(0, [torch.ones(2, 8)], [torch.ones(4, 2)], scale=0.5)
    assert stack.A[0, 0, 2:].eq(0).all() and stack.ranks_host == [2, 0]
    with pytest.raises(ValueError, match="rank"):
        stack.load(1, [torch.ones(5, 8)], [torch.ones(4, 5)], scale=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        lora_apply(torch.zeros(1, 4), torch.zeros(1, 8), stack, backend="torch")



def test_backend_choice_and_clear_error_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlora_gpu.lora_ops import resolve_backend

    x = torch.zeros(1, 8)
    assert resolve_backend("auto", x) == "torch"
    if torch.cuda.is_available():
        assert resolve_backend("auto", x.cuda()) == "triton"
        return
    stack = LoRAStack.empty(1, 8, (4,), 4, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensor, or TRITON_INTERPRET=1"):
        lora_apply(torch.zeros(1, 4), x, stack, slot_ids=torch.zeros(1, dtype=torch.int32),
                   backend="triton")
