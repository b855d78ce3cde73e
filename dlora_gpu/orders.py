"""What the driver sends a replica's worker and what comes back: plain, small, picklable records.

The driver owns each replica's `ReplicaState` and local policy (as vLLM's engine owns its scheduler
while Ray workers run the model) and every request's tokens; a worker owns the device: model,
adapters, paged KV. A `StepOrder` is one applied decision in ids and token ids only (no `Request`
objects cross), so a step ships to a Ray actor as a few hundred bytes, not a replica's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping
from dlora_sim.core.replica_state import ReplicaState
from dlora_sim.core.request import State
from dlora_sim.core.step import Step


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a request picks its next token when not greedily: temperature, nucleus (top-p), and a seed
    that, with the token's position, fixes the draw (the same on any replica, in any batch)."""

    temperature: float
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Feed:
    """One batch entry: a prefill carries every token it computes (prompt, plus what was generated
    before a recompute or a migration without KV); a decode its last token and the context length."""

    request: int
    adapter: int
    kv_blocks: int                        # device blocks the request owns after this step
    tokens: tuple[int, ...] | None = None   # prefill
    last: int = 0                         # decode: the token to feed
    length: int = 0                       # decode: tokens so far, the fed one included
    sampling: Sampling | None = None      # None: greedy


@dataclass(frozen=True, slots=True)
class StepOrder:
    """One decision as the state applied it, in the order the worker must run it."""

    recompute: tuple[int, ...]   # request ids whose KV is dropped (re-prefilled later)
    swap_out: tuple[int, ...]
    evict: tuple[int, ...]       # adapters
    load: tuple[int, ...]
    switch: bool                 # the merged adapter changes
    merged: int | None
    swap_in: tuple[int, ...]
    batch: tuple[Feed, ...]

    @classmethod
    def of(cls, step: Step, tokens: Mapping[int, list[int]],
           sampling: Mapping[int, Sampling] | None = None) -> "StepOrder":
        """`tokens`: every batch request's tokens so far (a `TokenLog`); `sampling`: the requests that
        do not decode greedily."""
        d = step.decision
        feeds = []
        how = sampling or {}
        for r, pf in zip(step.batch, step.prefill):
            toks = tokens[r.id]
            s = how.get(r.id)
            feeds.append(Feed(r.id, r.adapter, r.kv_blocks, tokens=tuple(toks), sampling=s) if pf else
                         Feed(r.id, r.adapter, r.kv_blocks, last=toks[-1], length=len(toks), sampling=s))
        return cls(tuple(r.id for r in d.recompute), tuple(r.id for r in d.swap_out), tuple(d.evict), tuple(d.load),
                   d.merged != step.mode_from, d.merged, tuple(r.id for r in step.swap_in), tuple(feeds))


@dataclass(frozen=True, slots=True)
class StepResult:
    """A step's measured phases (seconds), the worker's wall time for all of it, the next token of each
    batch entry (in batch order), and the drift factor probed before it (1.0 unless measured on a CPU)."""

    phases: tuple[float, ...]   # PhaseTimes' fields, in order
    wall_s: float
    tokens: tuple[int, ...]
    factor: float = 1.0


@dataclass(frozen=True, slots=True)
class MemoryImage:
    """The memory a replica's state says its device holds, for the worker to check itself against."""

    replica: int
    device_kv: tuple[tuple[int, int], ...]   # (request, blocks) held on the device, in flight included
    swapped: tuple[int, ...]
    free_blocks: int | None                  # None while a batch is in flight
    adapters: tuple[int, ...]
    arriving: tuple[int, ...] = ()           # migrating requests on their way here (their KV may be held)

    @classmethod
    def of(cls, state: ReplicaState, arriving: tuple[int, ...] = ()) -> "MemoryImage":
        flight = {id(r) for r in state.running}
        held = tuple((r.id, r.kv_blocks) for r in state.queue
                     if r.kv_blocks and (r.state == State.RESIDENT or id(r) in flight))
        return cls(state.id, held, tuple(r.id for r in state.queue if r.state == State.SWAPPED),
                   None if state.running else state.free_blocks, tuple(sorted(state.resident)), arriving)
