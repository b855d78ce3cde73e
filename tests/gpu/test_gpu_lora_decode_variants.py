"""The decode kernels' launch variants the tuner chooses between must all compute the same LoRA.

Variants: late vs per-iteration reduction in shrink, split-K by fp32 atomics vs unreduced partial
slabs summed in expand, and the vectorised expand path taken when every slice width is a multiple of
16 (alignment hints). Padding is NaN (see lora_reference.make_stack), so any stray read shows.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dlora_gpu.kernels import tuning  # noqa: E402
from dlora_gpu.kernels.lora_expand import expand_decode, slice_align  # noqa: E402
from dlora_gpu.kernels.lora_shrink import shrink_decode  # noqa: E402
from dlora_gpu.lora_ops import lora_apply  # noqa: E402
from lora_reference import TOL, make_stack, reference, rel_err  # noqa: E402

IDS = [0, 1, -1, 2, 4, 0, 4]


@pytest.mark.parametrize("slices", [(45, 13, 13), (32, 16, 16)], ids=["odd", "aligned16"])
@pytest.mark.parametrize("late_sum", [False, True])
@pytest.mark.parametrize("partials", [False, True])
def test_decode_variants_match_reference(slices: tuple[int, ...], late_sum: bool, partials: bool,
                                         device: str) -> None:
    dtype = torch.float16
    k = 67 if slices[0] == 45 else 96
    stack = make_stack([16, 3, 8, 0, 5], k, slices, 16, dtype, device, seed=3)
    slot_ids = torch.tensor(IDS, dtype=torch.int32, device=device)
    x = torch.randn(len(IDS), k).to(dtype).to(device)
    y0 = torch.randn(len(IDS), sum(slices)).to(dtype).to(device)
    ref = reference(y0, x, stack, IDS)
    v = shrink_decode(x, stack, slot_ids, split_k=3, block_k=32, late_sum=late_sum,
                      partials=partials, num_warps=2)
    assert v.dim() == (3 if partials else 2)
    y = y0.clone()
    expand_decode(y, v, stack, slot_ids, block_n=32, num_warps=2)
    assert rel_err(y, ref) < TOL[dtype]
    none = slot_ids < 0
    assert torch.equal(y[none], y0[none])


def test_partials_are_reproducible_and_sum_to_v(device: str) -> None:
    stack = make_stack([16, 7], 130, (32, 16), 16, torch.float32, device, seed=4)
    ids = [1, 0, 1]
    slot_ids = torch.tensor(ids, dtype=torch.int32, device=device)
    x = torch.randn(len(ids), 130, device=device)
    p1 = shrink_decode(x, stack, slot_ids, split_k=3, block_k=16, partials=True)
    p2 = shrink_decode(x, stack, slot_ids, split_k=3, block_k=16, partials=True)
    assert p1.shape == (3, 3, 32) and torch.equal(p1, p2)  # no atomics: bit for bit
    v = shrink_decode(x, stack, slot_ids, split_k=1, block_k=16)
    assert torch.allclose(p1.sum(0), v, rtol=1e-5, atol=1e-6)


def test_tuning_table_lookup_and_alignment() -> None:
    assert slice_align((4096, 4096, 4096)) == 16 and slice_align((45, 13, 13)) == 1
    assert slice_align((24, 8)) == 8
    table = [(16, None, {"a": 1}), (None, 32, {"a": 2}), (None, None, {"a": 3})]
    assert tuning.pick(table, 8, 64) == {"a": 1}
    assert tuning.pick(table, 64, 16) == {"a": 2} and tuning.pick(table, 64, 64) == {"a": 3}
    for table in (tuning.SHRINK_DECODE, tuning.EXPAND_DECODE):  # every batch/rank is covered
        for t, r in ((1, 8), (64, 16), (4096, 128)):
            assert tuning.pick(table, t, r)


def test_lora_apply_uses_table_defaults(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the table holds (here: partials + late sum), lora_apply stays exact."""
    monkeypatch.setattr(tuning, "SHRINK_DECODE", [(None, None, dict(
        block_k=32, block_r=16, num_warps=2, num_stages=2, target_programs=64, late_sum=True,
        partials=True))])
    monkeypatch.setattr(tuning, "EXPAND_DECODE", [(None, None, dict(block_n=32, num_warps=2))])
    stack = make_stack([16, 3, 8, 0, 5], 67, (45, 13, 13), 16, torch.float16, device, seed=5)
    slot_ids = torch.tensor(IDS, dtype=torch.int32, device=device)
    x = torch.randn(len(IDS), 67).half().to(device)
    y0 = torch.randn(len(IDS), 71).half().to(device)
    y = lora_apply(y0.clone(), x, stack, slot_ids=slot_ids, backend="triton")
    assert rel_err(y, reference(y0, x, stack, IDS)) < TOL[torch.float16]
