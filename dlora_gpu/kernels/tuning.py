"""Launch parameters of the decode (per-token) LoRA kernels, in one table the launchers consult.

Why a table: the best tile, split-K and warp count depend on the batch (how many programs there are to
fill 132 SMs) and on the rank (how many A rows each token reads), and each new combination of
constexprs costs a compile, so a handful of measured rows beats a formula. Rows are (max tokens,
max stack rank, params); the first row that fits wins. Explicit launcher arguments override them.

Provenance: `benchmarks/kernels_tune.py` on an H200 (results in benchmarks/results/
kernels_tune_h200.csv); rows not backed by a measurement keep the earlier hand-picked values.
"""

from __future__ import annotations

from typing import Any

# Shrink: BLOCK_K / BLOCK_R tile, Triton num_warps / num_stages, split-K sized to reach about
# `target_programs` programs, `late_sum` (2-D fp32 accumulator reduced once after the K loop instead
# of a cross-warp reduction per iteration), `partials` (split-K partial sums stored to their own
# slabs and summed by expand, instead of fp32 atomics into a zeroed buffer: no memset launch).
SHRINK_DECODE: list[tuple[int | None, int | None, dict[str, Any]]] = [
    (None, None, dict(block_k=256, block_r=16, num_warps=4, num_stages=3, target_programs=512,
                      late_sum=False, partials=False)),
]

# Expand: BLOCK_N output columns per program, Triton num_warps.
EXPAND_DECODE: list[tuple[int | None, int | None, dict[str, Any]]] = [
    (None, None, dict(block_n=128, num_warps=4)),
]


def pick(table: list[tuple[int | None, int | None, dict[str, Any]]], tokens: int,
         rank: int) -> dict[str, Any]:
    """Params of the first row whose bounds (None = any) hold for this batch and stack rank."""
    for max_t, max_r, params in table:
        if (max_t is None or tokens <= max_t) and (max_r is None or rank <= max_r):
            return dict(params)
    raise LookupError(f"no tuning row covers {tokens} tokens at rank {rank}")
