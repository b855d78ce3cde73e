"""The next token of each batch row: greedy, or drawn at a temperature within the top-p nucleus.

A draw is seeded by the request's seed and the token's position, so a request's tokens do not depend
on which replica runs it, what else is in its batch, or whether it migrated (vLLM seeds per request
the same way); greedy rows stay an argmax on the device.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from dlora_gpu.orders import Sampling


def _draw(row: Tensor, how: Sampling, position: int) -> int:
    probs = torch.softmax(row.float().cpu() / how.temperature, dim=-1)
    if how.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < how.top_p   # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    g = torch.Generator().manual_seed((how.seed * 1_000_003 + position) & 0x7FFF_FFFF_FFFF_FFFF)
    return int(torch.multinomial(probs, 1, generator=g))


def next_tokens(logits: Tensor, rows: Sequence[tuple[Sampling | None, int]]) -> list[int]:
    """One token per row of `logits` [rows, vocab]; `rows`: each row's sampling (None: greedy) and
    its position (tokens before the one drawn)."""
    out = logits.argmax(dim=-1).tolist()
    for i, (how, position) in enumerate(rows):
        if how is not None and how.temperature > 0:
            out[i] = _draw(logits[i], how, position)
    return out
