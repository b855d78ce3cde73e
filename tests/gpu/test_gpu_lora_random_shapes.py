"""Property test: the Triton kernels on random small shapes (odd sizes, empty slots, slot -1)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

from dlora_gpu.lora_ops import lora_apply  # noqa: E402
from dlora_gpu.lora_stack import group_by_slot  # noqa: E402
from lora_reference import TOL, make_stack, reference, rel_err  # noqa: E402


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
    in_features=st.integers(1, 90),
    slice_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    ranks=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    ids=st.lists(st.integers(-1, 3), min_size=1, max_size=9),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_random_shapes_decode_and_segments(in_features: int, slice_sizes: list[int],
                                           ranks: list[int], ids: list[int],
                                           dtype: torch.dtype) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = [i if i < len(ranks) else -1 for i in ids]
    stack = make_stack(ranks, in_features, tuple(slice_sizes), max(max(ranks), 1), dtype, device)
    x = torch.randn(len(ids), in_features).to(dtype).to(device)
    y0 = torch.randn(len(ids), sum(slice_sizes)).to(dtype).to(device)
    slot_ids = torch.tensor(ids, dtype=torch.int32, device=device)
    ref = reference(y0, x, stack, ids)
    y = lora_apply(y0.clone(), x, stack, slot_ids=slot_ids, backend="triton")
    assert rel_err(y, ref) < TOL[dtype]
    order, segs = group_by_slot(slot_ids)
    ys = lora_apply(y0[order].clone(), x[order], stack, segments=segs, backend="triton")
    assert rel_err(ys, ref[order.cpu()]) < TOL[dtype]
