"""Paged KV cache: ownership invariants after every operation, bit-exact swaps, all-or-nothing errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

from dlora_gpu.kv_cache import OutOfBlocks, PagedKVCache  # noqa: E402
from dlora_gpu.model import LlamaConfig  # noqa: E402

CFG = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=2, num_heads=2,
                  num_kv_heads=1)
SEQS = ["a", "b", "c", "d"]


def fill_new_blocks(kv: PagedKVCache, seq: str, old: int, g: torch.Generator) -> None:
    """Random K/V in the sequence's blocks past the first `old` (every layer), as a forward would."""
    table = kv.block_table(seq)[old:]
    if table:
        idx = torch.tensor(table)
        kv.k[:, idx] = torch.randn(kv.k[:, idx].shape, generator=g).to(kv.dtype)
        kv.v[:, idx] = torch.randn(kv.v[:, idx].shape, generator=g).to(kv.dtype)


def contents(kv: PagedKVCache, seq: str) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.tensor(kv.block_table(seq), dtype=torch.long)
    return kv.k[:, idx].clone(), kv.v[:, idx].clone()


def state(kv: PagedKVCache) -> tuple:
    return (dict(kv._tables), dict(kv._swapped), kv.num_free(), kv.host_free())


OPS = st.lists(st.tuples(st.sampled_from(["grow", "release", "swap_out", "swap_in"]),
                         st.sampled_from(SEQS), st.integers(0, 4)), min_size=1, max_size=40)


@hypothesis.settings(max_examples=100, deadline=None, derandomize=True)
@hypothesis.given(ops=OPS)
def test_random_operations_keep_ownership_and_contents(ops: list[tuple[str, str, int]]) -> None:
    kv = PagedKVCache(7, 4, CFG, torch.float16, host_blocks=5)
    g = torch.Generator().manual_seed(0)
    data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # what each sequence's blocks hold
    for op, seq, n in ops:
        before = state(kv)
        try:
            if op == "grow":
                old = 0 if seq not in kv.sequences() else len(kv.block_table(seq))
                kv.grow(seq, old + n)
                fill_new_blocks(kv, seq, old, g)
                data[seq] = contents(kv, seq)
            elif op == "release":
                kv.release(seq)
                del data[seq]
            elif op == "swap_out":
                kv.swap_out(seq)
                assert kv.is_swapped(seq)
            else:
                kv.swap_in(seq)
                k, v = contents(kv, seq)
                assert torch.equal(k, data[seq][0]) and torch.equal(v, data[seq][1])  # bit-exact
        except (OutOfBlocks, KeyError, ValueError):
            assert state(kv) == before  # a refused operation changes nothing
        kv.check()
        for s in kv.sequences():  # blocks of resident sequences are never overwritten by others
            k, v = contents(kv, s)
            assert torch.equal(k, data[s][0]) and torch.equal(v, data[s][1])


def test_swap_round_trip_is_bit_exact_and_moves_blocks() -> None:
    kv = PagedKVCache(6, 4, CFG, torch.bfloat16, host_blocks=3)
    kv.grow("x", 2)
    kv.grow("y", 3)
    fill_new_blocks(kv, "x", 0, torch.Generator().manual_seed(1))
    k0, v0 = contents(kv, "x")
    old = kv.block_table("x")
    kv.swap_out("x")
    assert kv.num_free() == 3 and kv.host_free() == 1
    kv.grow("y", 4)  # takes one of x's freed blocks
    assert kv.swap_in("x") != old
    k1, v1 = contents(kv, "x")
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert kv.host_free() == 3
    kv.check()


def test_errors_name_the_problem() -> None:
    kv = PagedKVCache(2, 4, CFG, torch.float16, host_blocks=1)
    kv.grow("x", 2)
    with pytest.raises(OutOfBlocks, match="1 blocks requested, 0 of 2 free"):
        kv.grow("y", 1)
    with pytest.raises(OutOfBlocks):
        kv.swap_out("x")  # the host pool has 1 block, x needs 2
    assert kv.block_table("x") == [0, 1]
    with pytest.raises(ValueError, match="cannot shrink"):
        kv.grow("x", 1)
    with pytest.raises(KeyError, match="owns no"):
        kv.release("nobody")
    kv._tables["y"] = [1]  # corrupt: block 1 owned twice
    with pytest.raises(AssertionError, match="owned by two"):
        kv.check()


def test_write_places_tokens_through_the_block_table() -> None:
    kv = PagedKVCache(4, 2, CFG, torch.float32)
    kv.grow("x", 1)
    kv.grow("y", 2)  # y owns blocks 1 and 2
    k = torch.arange(3 * CFG.head_dim, dtype=torch.float32).reshape(3, 1, CFG.head_dim)
    slots = torch.tensor([1 * 2 + 0, 1 * 2 + 1, 2 * 2 + 0])  # y's positions 0, 1, 2
    kv.write(1, slots, k, -k)
    assert torch.equal(kv.k[1, 1], k[:2]) and torch.equal(kv.k[1, 2, 0], k[2])
    assert torch.equal(kv.v[1, 2, 0], -k[2]) and not kv.k[0].any() and not kv.k[1, 0].any()


@pytest.mark.parametrize("swapped", [False, True])
def test_a_sequence_moves_between_caches_bit_exact_with_the_blocks_its_state_reserves(swapped: bool) -> None:
    """Co-migration: export copies a sequence's blocks (on the device or swapped) in table order; install
    on another cache writes them into new blocks (device or host) and reserves as many more as asked
    (the target's state holds the block its next token needs); the payload survives pickling (Ray's
    object store) in bfloat16."""
    import pickle
    src = PagedKVCache(6, 4, CFG, torch.bfloat16, host_blocks=4)
    dst = PagedKVCache(6, 4, CFG, torch.bfloat16, host_blocks=4)
    dst.grow("other", 1)
    src.grow("x", 3)
    fill_new_blocks(src, "x", 0, torch.Generator().manual_seed(2))
    k0, v0 = contents(src, "x")
    if swapped:
        src.swap_out("x")
    payload = pickle.loads(pickle.dumps(src.export("x"), protocol=5))
    assert payload.blocks == 3 and payload.nbytes == 2 * k0.numel() * k0.element_size()
    table = dst.install("x", payload, swapped=swapped, blocks=4)
    assert len(table) == 4
    if swapped:
        assert dst.is_swapped("x") and dst.host_free() == 0
        dst.swap_in("x")
    k1, v1 = contents(dst, "x")
    assert torch.equal(k1[:, :3], k0) and torch.equal(v1[:, :3], v0)
    with pytest.raises(ValueError, match="already owns"):
        dst.install("x", payload)
    dst.check()
