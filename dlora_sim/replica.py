"""One replica as a SimPy process: ask the local policy, apply its decision, advance time.

The replica owns the state a policy reads (it *is* the `ReplicaView`): the FCFS queue, KV blocks,
host swap, resident adapters and the merged adapter. It validates every decision against capacity
(so a buggy policy fails loudly), charges loads, mode changes, swaps and compute from the cost
model, and records one row per iteration.

Fast-forward: when a policy marks its decision `stable` and the batch is all decodes with nothing to
load, switch or swap, the replica runs up to k identical iterations (until the first request finishes or
KV blocks would run out) as a few timeouts, one per chunk of doubling size. Any queue change interrupts
it; it then stops at the end of the iteration in flight. `sync(now)` materialises the iterations completed before `now`, so routers and
migrators observe exactly the state they would if every iteration were simulated one by one.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import simpy

from dlora_sim.cost_model import CostModel
from dlora_sim.policies.base import Decision, LocalScheduler, PolicyError
from dlora_sim.request import NS, Request, State, blocks_for, to_ns

if TYPE_CHECKING:
    from dlora_sim.metrics import Recorder

GIB = 1 << 30


@dataclass(frozen=True)
class ReplicaConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    watermark: float = 0.01          # fraction of KV blocks kept free when admitting prefills
    host_swap_bytes: int = 16 * GIB  # per replica
    gpu_adapter_slots: int = 8
    weights: str = "lora"            # "lora" | "full_copy" (a whole merged model per adapter)
    fast_forward: bool = True
    max_kv_blocks: int | None = None # cap on KV blocks (a smaller KV budget than the GPU allows)

    def __post_init__(self) -> None:
        if self.weights not in ("lora", "full_copy"):
            raise ValueError(f"cluster.replica.weights must be 'lora' or 'full_copy', got {self.weights!r}")
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size", "gpu_adapter_slots"):
            if getattr(self, key) < 1:
                raise ValueError(f"cluster.replica.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_kv_blocks is not None and self.max_kv_blocks < 1:
            raise ValueError(f"cluster.replica.max_kv_blocks must be >= 1 or null, got {self.max_kv_blocks}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"cluster.replica.watermark must be in [0, 1), got {self.watermark}")


@dataclass(slots=True)
class _Run:
    """Iterations of one decision in flight: the first may carry overheads, later ones are repeats."""

    batch: list[Request]
    decision: Decision
    durations: list[int]       # ns, per iteration
    ends: list[int]            # absolute ns, per iteration
    compute: list[float]       # s, per iteration (for the record)
    overhead: tuple[float, float, float]   # switch, load, swap seconds (first iteration only)
    prefill: list[bool]        # per batch request: prefill in the first iteration
    distinct: int              # distinct adapters in the batch
    planned: int = 1           # iterations this decision runs (durations are generated lazily, in chunks)
    repeat: tuple[int, int, int, int] = (0, 0, 0, 0)   # decode seqs, first context, rank sums of a repeat
    applied: int = 0


class Replica:
    def __init__(self, rid: int, env: simpy.Environment, cfg: ReplicaConfig, cost: CostModel,
                 scheduler: LocalScheduler, ranks: Sequence[int], recorder: "Recorder",
                 on_done: Callable[[Request], None]):
        self.id, self.env, self.cfg, self.cost, self.scheduler = rid, env, cfg, cost, scheduler
        self._ranks = list(ranks)
        self.recorder, self._on_done = recorder, on_done
        self.full_copy = cfg.weights == "full_copy"
        # a full copy's first slot is the base weights themselves; LoRA slots sit beside them
        extra_slots = cfg.gpu_adapter_slots - 1 if self.full_copy else cfg.gpu_adapter_slots
        layout = cost.memory_layout(cfg.block_size, extra_slots, self._slot_bytes(max(self._ranks, default=1)))
        self.layout = layout
        self.max_num_seqs, self.max_num_batched_tokens = cfg.max_num_seqs, cfg.max_num_batched_tokens
        self.block_size, self.adapter_slots = cfg.block_size, cfg.gpu_adapter_slots
        blocks = layout.total_kv_blocks if cfg.max_kv_blocks is None else min(cfg.max_kv_blocks, layout.total_kv_blocks)
        self.total_blocks = self.free_blocks = blocks
        self.watermark_blocks = int(cfg.watermark * blocks)
        self.host_total_blocks = self.host_free_blocks = cfg.host_swap_bytes // layout.block_bytes
        self.queue: list[Request] = []
        self.resident: dict[int, None] = {}
        self.merged: int | None = None
        self._wake: simpy.Event | None = None     # set while idle
        self._repeating = False                     # waiting out repeats of a stable decision
        self._interrupted = False
        self._proc: simpy.Process | None = None
        self._run: _Run | None = None
        self.debug = False   # O(queue) memory accounting checks after every step (tests)

    def _slot_bytes(self, rank: int) -> int:
        """Bytes an adapter occupies on the GPU (and loads over PCIe): its A and B, or a whole model copy."""
        prof = self.cost.profile
        return prof.model.weight_bytes if self.full_copy else prof.adapter_bytes(rank)

    # --- the view policies read -----------------------------------------------------------------
    @property
    def now(self) -> float:
        return self.env.now / NS

    def adapter_rank(self, adapter: int) -> int:
        return self._ranks[adapter]

    @property
    def in_flight(self) -> Sequence[Request]:
        return self._run.batch if self._run is not None else ()

    # --- queue changes from the cluster ------------------------------------------------------------
    def enqueue(self, r: Request) -> None:
        r.replica = self.id
        bisect.insort(self.queue, r, key=Request.sort_key)
        self.notify()

    def remove(self, r: Request) -> None:
        i = bisect.bisect_left(self.queue, r.sort_key(), key=Request.sort_key)
        if i >= len(self.queue) or self.queue[i] is not r:
            raise PolicyError(f"request {r.id} is not queued on replica {self.id}")
        if self._run is not None and any(x is r for x in self._run.batch):
            raise PolicyError(f"request {r.id} is running on replica {self.id} and cannot be removed")
        del self.queue[i]
        # its KV (GPU or host copy) leaves with it: a migrated request holds no memory here
        if r.state == State.RESIDENT:
            self.free_blocks += r.kv_blocks
        elif r.state == State.SWAPPED:
            self.host_free_blocks += r.kv_blocks
        r.kv_blocks = 0
        self.notify()

    def receive(self, r: Request, with_kv: bool) -> State:
        """Admit a migrated request. With its KV cache: on the GPU if blocks are free (above the
        watermark), else into host swap if there is room, else it is recomputed (re-prefilled)."""
        need = blocks_for(r.context_len, self.block_size)
        if with_kv and self.free_blocks - need >= self.watermark_blocks:
            self.free_blocks -= need
            r.state, r.kv_blocks = State.RESIDENT, need
        elif with_kv and need <= self.host_free_blocks:
            self.host_free_blocks -= need
            r.state, r.kv_blocks = State.SWAPPED, need
        else:
            r.state, r.kv_blocks = State.QUEUED, 0
        self.enqueue(r)
        return r.state

    def notify(self) -> None:
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        elif self._repeating and not self._interrupted:   # cut a fast-forwarded run short
            self._interrupted = True
            self._proc.interrupt()

    def preload(self, adapters: Sequence[int]) -> None:
        for a in adapters:
            if len(self.resident) >= self.adapter_slots:
                raise ValueError(f"replica {self.id}: cannot preload {list(adapters)} into {self.adapter_slots} slots")
            self.resident[a] = None

    # --- the process ---------------------------------------------------------------------------------
    def start(self) -> simpy.Process:
        self._proc = self.env.process(self.process())
        return self._proc

    def process(self):
        env = self.env
        while True:
            if self.queue:
                decision = self.scheduler.schedule(self)
                if decision.batch:
                    run = self._begin(decision)
                    yield from self._execute(run)
                    continue
                if decision.load or decision.evict or decision.swap_out or decision.recompute:
                    raise PolicyError(f"replica {self.id}: a decision with an empty batch must not change memory")
            self._wake = env.event()
            yield self._wake
            self._wake = None

    def _execute(self, run: _Run):
        env = self.env
        while run.planned > 1:
            self._repeating = True
            try:
                yield env.timeout(run.ends[-1] - env.now)
                woken = False
            except simpy.Interrupt:
                woken = True
            self._repeating = self._interrupted = False
            if woken:   # the queue changed: finish the iteration in flight, then decide again
                j = bisect.bisect_left(run.ends, env.now)
                run.planned = j + 1
                del run.ends[j + 1:], run.durations[j + 1:], run.compute[j + 1:]
                if run.ends[j] > env.now:
                    yield env.timeout(run.ends[j] - env.now)
                break
            if len(run.ends) >= run.planned:
                break
            self._extend(run, 2 * len(run.ends))
        else:
            yield env.timeout(run.ends[0] - env.now)
        self._advance(run, run.planned)
        self._run = None

    def sync(self, now: int) -> None:
        """Apply the iterations of the run in flight that ended strictly before `now`."""
        run = self._run
        if run is not None and run.applied < len(run.ends) and run.ends[run.applied] < now:
            self._advance(run, bisect.bisect_left(run.ends, now))

    # --- applying a decision ------------------------------------------------------------------------
    def _begin(self, d: Decision) -> _Run:
        self._validate(d)
        cost, bs = self.cost, self.block_size
        for r in d.recompute:
            self.free_blocks += r.kv_blocks
            r.kv_blocks, r.state = 0, State.QUEUED
            r.preemptions += 1
        swapped_out = 0
        for r in d.swap_out:
            self.free_blocks += r.kv_blocks
            self.host_free_blocks -= r.kv_blocks
            swapped_out += r.kv_blocks
            r.state = State.SWAPPED
            r.preemptions += 1
        self.recorder.count("preemptions", len(d.recompute) + len(d.swap_out))
        self.recorder.count("swap_outs", len(d.swap_out))
        self.recorder.count("recomputes", len(d.recompute))
        for a in d.evict:
            del self.resident[a]
        load_s = 0.0
        for a in d.load:
            self.resident[a] = None
            load_s += cost.load_time(self._slot_bytes(self._ranks[a]))
        self.recorder.count("adapter_loads", len(d.load))
        switch_s = cost.mode_change_time(self.merged, d.merged, self.full_copy)
        if d.merged != self.merged:
            if not self.full_copy:
                self.recorder.count("switches", 1)
            self.merged = d.merged
        swapped_in = swapped_in_reqs = 0
        prefill_tokens = prefill_sq = decode = ctx = rank_sum = token_rank = 0
        prefill: list[bool] = []
        seen: set[int] = set()
        now = self.env.now
        ranks = self._ranks
        free = self.free_blocks
        for r in d.batch:   # hot loop: plain attribute arithmetic
            n = r.prompt_tokens + r.generated
            need = -(-n // bs)
            state = r.state
            if state == _SWAPPED:
                swapped_in_reqs += 1
                self.host_free_blocks += r.kv_blocks
                swapped_in += need
                free -= need
                r.state = state = _RESIDENT
            else:
                free -= need - r.kv_blocks
            r.kv_blocks = need
            a = r.adapter
            rank = ranks[a]
            if r.first_scheduled < 0:
                r.first_scheduled = now
            if state == _QUEUED:
                prefill_tokens += n
                prefill_sq += n * n
                token_rank += n * rank
                prefill.append(True)
            else:
                decode += 1
                ctx += n
                token_rank += rank
                prefill.append(False)
            if a not in seen:
                seen.add(a)
                rank_sum += rank
        self.free_blocks = free
        if self.free_blocks < 0 or self.host_free_blocks < 0:
            raise PolicyError(f"replica {self.id}: decision exceeds memory (free blocks {self.free_blocks}, "
                              f"host blocks {self.host_free_blocks})")
        self.recorder.count("swap_ins", swapped_in_reqs)
        swap_s = cost.swap_time(swapped_in + swapped_out, self.layout.block_bytes)
        unmerged = d.merged is None
        n = len(d.batch)
        compute = cost.iteration_time(prefill_tokens, prefill_sq, decode, ctx, n,
                                      rank_sum if unmerged else 0, token_rank if unmerged else 0)
        overheads = switch_s + load_s + swap_s
        first = to_ns(compute + switch_s + load_s + swap_s)   # this order: results are bit-stable
        durations, computes = [first], [compute]
        run = self._run = _Run(d.batch, d, durations, [now + first], computes, (switch_s, load_s, swap_s),
                               prefill, len(seen))
        if self.cfg.fast_forward and d.stable and decode == n and overheads == 0.0:
            run.planned = self._repeatable(d.batch)
            if d.max_repeats is not None:
                run.planned = max(min(run.planned, d.max_repeats), 1)
            run.repeat = (n, ctx, rank_sum if unmerged else 0, token_rank if unmerged else 0)
            self._extend(run, _FIRST_CHUNK)
        if self.debug:
            self.check_accounting()
        return self._run

    def _extend(self, run: _Run, upto: int) -> None:
        """Generate the durations of repeats up to iteration `upto` (capped at the plan): a run that a
        queue change cuts short never pays for the iterations it did not reach."""
        n, ctx, rank_sum, token_rank = run.repeat
        it, durations, ends, computes = self.cost.iteration_time, run.durations, run.ends, run.compute
        t = ends[-1]
        for i in range(len(durations), min(upto, run.planned)):
            c = it(0, 0, n, ctx + i * n, n, rank_sum, token_rank)
            dur = to_ns(c)
            t += dur
            durations.append(dur)
            ends.append(t)
            computes.append(c)

    def _repeatable(self, batch: list[Request]) -> int:
        """How many identical decode iterations fit before a request finishes or blocks run out."""
        k = min(r.output_tokens - r.generated for r in batch)
        bs, free = self.block_size, self.free_blocks

        def extra(m: int) -> int:   # blocks the iterations 2..m need beyond what the first holds
            return sum(-(-(r.prompt_tokens + r.generated + m - 1) // bs) - r.kv_blocks for r in batch)

        if k <= 1 or extra(k) <= free:
            return max(k, 1)
        lo, hi = 1, k   # extra(lo) <= free < extra(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if extra(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _advance(self, run: _Run, upto: int) -> None:
        """Complete iterations run.applied .. upto-1 of the run in flight.

        The first iteration may prefill; the rest are identical decodes, applied in bulk (every request
        gains one token per iteration, and nobody can finish before the run's last iteration)."""
        i = run.applied
        if upto <= i:
            return
        batch, rec, n = run.batch, self.recorder, len(run.batch)
        distinct = run.distinct
        if i == 0:
            end, dur = run.ends[0], run.durations[0]
            prefill_tokens = prefills = 0
            for r, pf in zip(batch, run.prefill):
                if pf:
                    prefill_tokens += r.prompt_tokens + r.generated
                    prefills += 1
                    r.state = State.RESIDENT
                r.generated += 1
                r.exec_ns += dur
                if r.first_token < 0:
                    r.first_token = end
            rec.iteration(self.id, end - dur, dur, run.compute[0], run.overhead, run.decision, n, prefill_tokens,
                          n - prefills, distinct)
            i = 1
        last = upto == run.planned
        if upto > i:
            total = sum(run.durations[i:upto])
            m = upto - i
            for r in batch:
                r.generated += m
                r.exec_ns += total
            if rec.keep_iterations:
                for k in range(i, upto):
                    rec.iteration(self.id, run.ends[k] - run.durations[k], run.durations[k], run.compute[k],
                                  _NO_OVERHEAD, run.decision, n, 0, n, distinct)
            else:
                rec.num_iterations += m
                rec.busy_ns += total
        run.applied = upto
        if last:
            end = run.ends[-1]
            for r in batch:
                if r.generated >= r.output_tokens:
                    self._finish(r, end)
        else:   # the iteration now in flight needs every request's KV to have grown
            bs, free = self.block_size, self.free_blocks
            for r in batch:
                if r.generated >= r.output_tokens:
                    raise AssertionError("a request finished inside a fast-forwarded run")
                need = -(-(r.prompt_tokens + r.generated) // bs)
                free -= need - r.kv_blocks
                r.kv_blocks = need
            self.free_blocks = free
        if self.free_blocks < 0:
            raise AssertionError(f"replica {self.id}: KV blocks overcommitted ({self.free_blocks})")
        if self.debug:
            self.check_accounting()

    def check_accounting(self) -> None:
        """Every block is owned by exactly one request; nothing exceeds capacity."""
        flight = {id(r) for r in self.in_flight}
        gpu = sum(r.kv_blocks for r in self.queue if r.state == State.RESIDENT or id(r) in flight)
        host = sum(r.kv_blocks for r in self.queue if r.state == State.SWAPPED)
        if gpu != self.total_blocks - self.free_blocks or not 0 <= self.free_blocks <= self.total_blocks:
            raise AssertionError(f"replica {self.id}: KV accounting {gpu} used vs {self.total_blocks - self.free_blocks}")
        if host != self.host_total_blocks - self.host_free_blocks or self.host_free_blocks < 0:
            raise AssertionError(f"replica {self.id}: host swap accounting {host} vs "
                                 f"{self.host_total_blocks - self.host_free_blocks}")
        if any(r.kv_blocks for r in self.queue if r.state == State.QUEUED and id(r) not in flight):
            raise AssertionError(f"replica {self.id}: a queued request holds KV blocks")
        if len(self.resident) > self.adapter_slots:
            raise AssertionError(f"replica {self.id}: {len(self.resident)} adapters in {self.adapter_slots} slots")

    def _finish(self, r: Request, t: int) -> None:
        self.free_blocks += r.kv_blocks
        r.kv_blocks = 0
        r.state = State.FINISHED
        r.finish = t
        i = bisect.bisect_left(self.queue, r.sort_key(), key=Request.sort_key)
        del self.queue[i]
        self._on_done(r)

    def _validate(self, d: Decision) -> None:
        """Reject a decision that breaks a capacity or consistency rule (one pass over the batch)."""
        cfg, batch = self.cfg, d.batch
        if len(batch) > cfg.max_num_seqs:
            raise PolicyError(f"replica {self.id}: batch of {len(batch)} exceeds max_num_seqs {cfg.max_num_seqs}")
        members = set(batch)   # requests hash by identity
        if len(members) != len(batch):
            raise PolicyError(f"replica {self.id}: a request appears twice in the batch")
        tokens, rid, swap_in = 0, self.id, False
        adapters: set[int] = set()
        for r in batch:
            state = r.state
            if r.replica != rid or state >= _FINISHED:
                raise PolicyError(f"replica {self.id}: request {r.id} is not runnable here")
            tokens += r.prompt_tokens + r.generated if state == _QUEUED else 1
            swap_in = swap_in or state == _SWAPPED
            adapters.add(r.adapter)
        if tokens > cfg.max_num_batched_tokens and len(batch) > 1:
            raise PolicyError(f"replica {self.id}: {tokens} tokens exceed max_num_batched_tokens")
        for r in (*d.swap_out, *d.recompute):
            if r.state != State.RESIDENT or r in members or r.replica != self.id:
                raise PolicyError(f"replica {self.id}: cannot preempt request {r.id} ({r.state.name})")
        if d.swap_out and swap_in:
            raise PolicyError(f"replica {self.id}: swap-in and swap-out in the same iteration")
        resident = self.resident
        if d.evict or d.load:
            resident = dict(resident)
            for a in d.evict:
                if a not in resident:
                    raise PolicyError(f"replica {self.id}: evicting adapter {a}, which is not resident")
                del resident[a]
            for a in d.load:
                if a in resident:
                    raise PolicyError(f"replica {self.id}: loading adapter {a}, which is already resident")
                resident[a] = None
            if len(resident) > self.adapter_slots:
                raise PolicyError(f"replica {self.id}: {len(resident)} resident adapters exceed "
                                  f"{self.adapter_slots} slots")
        if d.merged is not None:
            if d.merged not in resident:
                raise PolicyError(f"replica {self.id}: merging adapter {d.merged}, which is not resident")
            if adapters - {d.merged}:
                raise PolicyError(f"replica {self.id}: merged on {d.merged} but the batch has other adapters")
        else:
            if self.full_copy:
                raise PolicyError(f"replica {self.id}: full-copy replicas run merged only")
            missing = [a for a in adapters if a not in resident]
            if missing:
                raise PolicyError(f"replica {self.id}: unmerged batch uses non-resident adapters {sorted(missing)}")


_NO_OVERHEAD = (0.0, 0.0, 0.0)
_FIRST_CHUNK = 8   # repeats generated up front; each further chunk doubles the run so far
_QUEUED, _RESIDENT, _SWAPPED, _FINISHED = State.QUEUED, State.RESIDENT, State.SWAPPED, State.FINISHED

