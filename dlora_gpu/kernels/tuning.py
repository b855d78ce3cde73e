"""Launch parameters of the decode (per-token) LoRA kernels, in one table the launchers consult.

Why a table: the best tile, split-K and warp count depend on the batch (how many programs there are to
fill 132 SMs) and on the rank (how many A rows each token reads), and each new combination of
constexprs costs a compile, so a handful of measured rows beats a formula. Rows are (max tokens,
max stack rank, params); the first row that fits wins. Explicit launcher arguments override them.

Provenance: `benchmarks/kernels_tune.py` on an H200 (fp16, Llama-2-7B layer; all configs in
benchmarks/results/kernels_tune_h200.csv). Cases measured: batch 1 (one adapter), 16/64/256 (distinct
adapters) at rank 16, batch 64 at rank 64, batch 64 on one adapter. Row bounds between those cases
(e.g. batch 8, rank 32) are interpolation, not measurement.
"""

from __future__ import annotations

from typing import Any

# Shrink: BLOCK_K / BLOCK_R tile, Triton num_warps / num_stages, split-K sized to reach about
# `target_programs` programs, `late_sum` (2-D fp32 accumulator reduced once after the K loop instead
# of a cross-warp reduction per iteration), `partials` (split-K partial sums stored to their own
# slabs and summed by expand, instead of fp32 atomics into a zeroed buffer: no memset launch).
SHRINK_DECODE: list[tuple[int | None, int | None, dict[str, Any]]] = [
    # batch 1: wide programs (8 warps), faster than the old 256/4/512/atomic params (kernels_tune_h200.log)
    (1, None, dict(block_k=128, block_r=16, num_warps=8, num_stages=3, target_programs=1056,
                   late_sum=False, partials=True)),
    # everything else: many small programs; close to each measured case's best (batch 16/64/256
    # x rank 16/64, 1 or distinct adapters) and faster than the old params (kernels_tune_h200.log)
    (None, None, dict(block_k=128, block_r=16, num_warps=2, num_stages=3, target_programs=2112,
                      late_sum=False, partials=True)),
]
# Measured and not chosen: late_sum (no barrier in the loop, but the redundant x tile loads cost
# more at the headline case, kernels_tune_h200.csv); num_stages 1-4 (within noise: the loop has no dot to pipeline).

# Expand: BLOCK_N output columns per program, Triton num_warps. Rank <= 16: 256/2 is the best or
# close to it in every measured rank-16 case; rank 64 keeps 128/4, about the best there (kernels_tune_h200.csv).
EXPAND_DECODE: list[tuple[int | None, int | None, dict[str, Any]]] = [
    (1, None, dict(block_n=128, num_warps=8)),
    (None, 16, dict(block_n=256, num_warps=2)),
    (None, None, dict(block_n=128, num_warps=4)),
]


def pick(table: list[tuple[int | None, int | None, dict[str, Any]]], tokens: int,
         rank: int) -> dict[str, Any]:
    """Params of the first row whose bounds (None = any) hold for this batch and stack rank."""
    for max_t, max_r, params in table:
        if (max_t is None or tokens <= max_t) and (max_r is None or rank <= max_r):
            return dict(params)
    raise LookupError(f"no tuning row covers {tokens} tokens at rank {rank}")
