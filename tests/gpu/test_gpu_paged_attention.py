"""Paged decode attention (Triton kernel and torch path) against a float64 per-sequence reference.

Block tables are shuffled (blocks of different sequences interleave), contexts are ragged and end
mid-block, block sizes and head dims include non-powers of two (masked lanes), and the head layouts
cover MHA, GQA and MQA. Unused blocks hold NaN, so any read past a context shows.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dlora_gpu.decode_attention import decode_attention  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def make_case(ctx: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in ctx]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(perm[used:used + n])
        used += n
    k = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    for n, table in zip(ctx, tables):  # only positions < context are ever written
        for p in range(n):
            blk, off = table[p // block_size], p % block_size
            k[blk, off] = torch.randn(kv_heads, head_dim, generator=g)
            v[blk, off] = torch.randn(kv_heads, head_dim, generator=g)
    q = torch.randn(len(ctx), heads, head_dim, generator=g) * 2  # peaky softmax
    width = max(need)
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    return (q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device),
            bt.to(device), torch.tensor(ctx, dtype=torch.int32, device=device))


def reference(q, k, v, bt, ctx) -> torch.Tensor:
    q, k, v = (t.double().cpu() for t in (q, k, v))
    s, h, d = q.shape
    group = h // k.shape[2]
    out = torch.zeros(s, h, d, dtype=torch.float64)
    for i, n in enumerate(ctx.tolist()):
        blocks = bt[i, :-(-n // k.shape[1])].long().cpu()
        keys = k[blocks].reshape(-1, k.shape[2], d)[:n]
        vals = v[blocks].reshape(-1, k.shape[2], d)[:n]
        for head in range(h):
            w = torch.softmax(keys[:, head // group] @ q[i, head] / math.sqrt(d), dim=0)
            out[i, head] = w @ vals[:, head // group]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 2, 16, 4),   # GQA, powers of two
    (3, 3, 24, 5),   # MHA, head dim and block size masked
    (4, 1, 8, 16),   # MQA, a block larger than most contexts
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decode_attention_matches_float64(dtype, heads, kv_heads, head_dim, block_size, backend,
                                          device) -> None:
    ctx = [1, block_size, block_size + 1, 13, 3 * block_size + 2]
    q, k, v, bt, cl = make_case(ctx, heads, kv_heads, head_dim, block_size, dtype, device)
    out = decode_attention(q, k, v, bt, cl, backend=backend)
    ref = reference(q, k, v, bt, cl)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err = float((out.double().cpu() - ref).norm() / ref.norm())
    assert err < TOL[dtype], err


def test_single_token_context_returns_its_value(device) -> None:
    q, k, v, bt, cl = make_case([1, 1], 2, 1, 8, 4, torch.float32, device, seed=3)
    out = decode_attention(q, k, v, bt, cl, backend="triton")
    for i in range(2):
        assert torch.allclose(out[i], v[bt[i, 0], 0].expand(2, -1), atol=1e-6)


def test_rejects_mismatched_shapes(device) -> None:
    q, k, v, bt, cl = make_case([3], 4, 2, 8, 4, torch.float32, device)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(q[:, :3], k, v, bt, cl)
    with pytest.raises(ValueError, match="1 queries"):
        decode_attention(q, k, v, bt, cl.repeat(2))
