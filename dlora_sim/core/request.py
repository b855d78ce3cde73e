"""A request's runtime state inside the simulator (and the GPU runtime's replay).

Times are integers in nanoseconds of simulated time: sums of iteration times are then exact, so
a run is bit-for-bit reproducible and fast-forwarded iterations land on the same instants as
iterations simulated one by one.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

NS = 1_000_000_000
UNSET = -1


def to_ns(seconds: float) -> int:
    return int(round(seconds * NS))


class State(IntEnum):
    QUEUED = 0     # needs a prefill (new, or preempted by recompute)
    RESIDENT = 1   # KV cache on the GPU; decodes when selected
    SWAPPED = 2    # KV cache in host memory
    FINISHED = 3
    REJECTED = 4


@dataclass(slots=True, eq=False)
class Request:
    id: int
    adapter: int
    arrival: int            # ns
    prompt_tokens: int
    output_tokens: int
    generated: int = 0
    state: State = State.QUEUED
    kv_blocks: int = 0
    prefilled: int = 0      # QUEUED: context tokens whose KV earlier chunks computed, or a prefix cache held
    replica: int = UNSET
    dispatch: int = UNSET
    first_scheduled: int = UNSET
    first_token: int = UNSET
    finish: int = UNSET
    exec_ns: int = 0        # sum of the iterations it ran in
    migrations: int = 0
    preemptions: int = 0
    reject_reason: str = ""
    prefix: tuple[int, ...] = ()      # hashes of the prompt's prefix blocks (workload.prefix_block_tokens each)
    cache_refs: tuple = ()            # the prefix-cache entries it references on its replica (prefix_cache.py)

    @property
    def context_len(self) -> int:
        """Tokens whose KV the next iteration needs: the prompt plus every generated token."""
        return self.prompt_tokens + self.generated

    @property
    def remaining(self) -> int:
        return self.output_tokens - self.generated

    @property
    def done(self) -> bool:
        return self.state >= State.FINISHED

    def sort_key(self) -> tuple[int, int]:
        return (self.arrival, self.id)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def prefill_chunks(batch: list[Request], budget: int, chunked: bool) -> tuple[list[int], int]:
    """Tokens each request of `batch` computes in one iteration, and the token budget left.

    The one rule executors apply and policies plan with: in batch order a decode (or swap-in) takes
    one token; a prefill takes the rest of its context (`context_len - prefilled`), or with `chunked`
    (Sarathi-style) at most what is left of `budget`, the rest waiting for later iterations."""
    chunks, left = [], budget
    for r in batch:
        if r.state == State.QUEUED:
            c = r.prompt_tokens + r.generated - r.prefilled
            if chunked and c > left:
                c = left
        else:
            c = 1
        chunks.append(c)
        left -= c
    return chunks, left
