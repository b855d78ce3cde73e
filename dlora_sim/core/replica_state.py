"""One replica's state and the rules that apply a decision, for every executor (no SimPy, no kernels).

The state *is* the `ReplicaView` a local policy reads: the FCFS queue, KV blocks, host swap, resident
adapters and the merged adapter, and a clock. `begin(decision)` validates a decision against capacity
(`validation.py`: a buggy policy fails loudly) and applies it to memory in the order every executor
follows: recompute, swap-out, evict, load, mode change, swap-in, then the batch's KV growth. It returns
a `Step` with the iteration's features; the simulator prices it (`CostModel.price`) and advances
simulated time, the GPU runtime runs kernels for it. `complete*` / `end_run` then apply what an
iteration produced (a token per request, KV growth, finishing). Both executors size KV from the same
memory layout, so they have the same blocks (and `Cluster` rejects the same requests).
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Callable, Sequence

from dlora_sim.core.adapter_tiers import AdapterTiers
from dlora_sim.core.contracts import Decision, PolicyError
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.prefix_cache import PrefixCache
from dlora_sim.core.replica_config import ReplicaConfig, adapter_slots, rank_pad
from dlora_sim.core.request import NS, Request, State, blocks_for, to_ns
from dlora_sim.core.step import Step
from dlora_sim.core.validation import check_accounting, validate
from dlora_sim.core.workload import PREFIX_BLOCK_TOKENS

FOREVER_NS = 1 << 62   # later than any simulated time

if TYPE_CHECKING:
    from dlora_sim.core.results import Recorder

class ReplicaState:
    def __init__(self, rid: int, cfg: ReplicaConfig, cost: CostModel, ranks: Sequence[int], recorder: "Recorder",
                 on_done: Callable[[Request], None], clock: Callable[[], int], *, merges: bool = False,
                 prefix_block_tokens: int = PREFIX_BLOCK_TOKENS):
        """`merges`: the local policy may merge adapters into the weights, so a pristine_gpu merge
        strategy keeps its copy of the touched weights here (taken from the KV cache).
        `prefix_block_tokens`: the workload's prefix hash granularity (prefix caching's entries)."""
        self.id, self.cfg, self.cost = rid, cfg, cost
        self._pad = rank_pad(cfg, ranks)
        self._ranks = list(ranks) if self._pad is None else [self._pad] * len(ranks)  # LoRA compute and slots
        self._copy_ranks = list(ranks)   # what a load copies: an adapter's own weights
        self.recorder, self._on_done, self._clock = recorder, on_done, clock
        self.full_copy = cfg.weights == "full_copy"
        slot_bytes = self.slot_bytes(max(self._ranks, default=1))
        slots = adapter_slots(cfg, cost, self._ranks, slot_bytes)
        # a full copy's first slot is the base weights themselves; LoRA slots sit beside them
        extra_slots = slots - 1 if self.full_copy else slots
        self.merge_copy_bytes = cost.merge_copy_bytes() if merges and not self.full_copy else 0
        layout = cost.memory_layout(cfg.block_size, extra_slots, slot_bytes, self.merge_copy_bytes)
        self.layout = layout
        self.max_num_seqs, self.max_num_batched_tokens = cfg.max_num_seqs, cfg.max_num_batched_tokens
        self.block_size, self.adapter_slots = cfg.block_size, slots
        if not isinstance(cfg.chunked_prefill, bool):
            raise ValueError("chunked_prefill='auto' must be resolved against the workload first "
                             "(resolve_chunked_prefill)")
        self.chunked_prefill, self.prefill_priority = cfg.chunked_prefill, cfg.prefill_priority
        blocks = layout.total_kv_blocks if cfg.max_kv_blocks is None else min(cfg.max_kv_blocks, layout.total_kv_blocks)
        self.total_blocks = self.free_blocks = blocks
        self.watermark_blocks = int(cfg.watermark * blocks)
        self.host_total_blocks = self.host_free_blocks = cfg.host_swap_bytes // layout.block_bytes
        self.queue: list[Request] = []
        self.resident: dict[int, None] = {}
        self.resident_rank_sum = 0   # ranks of the resident adapters (what the einsum path prices)
        self.merged: int | None = None
        self.running: list[Request] = []
        self.version = 0   # bumped by every change to the queue or a queued request's progress (caches key on it)
        self._by_adapter: dict[int, list[Request]] = {}   # the queue per adapter, each in FCFS order
        self.membership = 0   # bumped whenever a request joins or leaves the queue (arrives, migrates, finishes)
        # iterations of the batch in flight that ended but are not applied yet (the simulator's fast-forward
        # applies them lazily): each of its requests has generated that many more tokens than it shows.
        # Set by an executor that defers them; a router reads progress through it (policies/estimates.py)
        self.lag: Callable[[], int] = _no_lag
        # the latest time (ns) up to which `lag()` keeps the value it last returned and has no effect, while
        # `version` holds: a router may reuse a price until then (the executor that sets `lag` sets it)
        self.lag_until: Callable[[], int] = _forever
        self._grouped: tuple[int, dict[int, list[Request]]] = (-1, {})
        self.tiers: AdapterTiers | None = None   # a bounded host adapter cache and the store behind it
        self.host_adapter_cache, self.adapter_prefetch = cfg.host_adapter_cache, cfg.adapter_prefetch
        if cfg.host_adapter_cache is not None:
            cost.store_time(0)   # a profile without a store is refused here, naming the key
            self.tiers = AdapterTiers(cfg.host_adapter_cache, lambda nbytes: to_ns(cost.store_time(nbytes)))
            recorder.counters["tiered_replicas"] += 1
        self.prefix_cache = PrefixCache(prefix_block_tokens, cfg.block_size) if cfg.prefix_caching else None
        if self.prefix_cache is not None:
            recorder.counters["prefix_cached_replicas"] += 1
        self.debug = False   # O(queue) memory accounting checks after every step (tests)
        # called when the queue changes from outside (an arrival, a migration): an executor that waits
        # for work (the simulator's replica process) wakes up here
        self.on_queue_change: Callable[[], None] = _nothing

    def slot_bytes(self, rank: int) -> int:
        """Bytes an adapter occupies on the GPU (and loads over PCIe): its A and B, or a whole model copy."""
        prof = self.cost.profile
        return prof.model.weight_bytes if self.full_copy else prof.adapter_bytes(rank)

    # --- the view policies read -----------------------------------------------------------------
    @property
    def now(self) -> float:
        return self._clock() / NS

    def clock_ns(self) -> int:
        return self._clock()

    def adapter_rank(self, adapter: int) -> int:
        return self._ranks[adapter]

    @property
    def ranks(self) -> Sequence[int]:
        """Every workload adapter's rank, by id."""
        return self._ranks

    @property
    def in_flight(self) -> Sequence[Request]:
        return self.running

    def by_adapter(self) -> dict[int, list[Request]]:
        """The queue grouped by adapter: each list in FCFS order, adapters in the order of their oldest
        request (what one pass over the queue builds), kept up to date by enqueue and removal, so
        policies and estimators need not regroup per call. Read-only."""
        at, grouped = self._grouped
        if at != self.membership:
            grouped = dict(sorted(self._by_adapter.items(), key=lambda kv: kv[1][0].sort_key()))
            self._grouped = (self.membership, grouped)
        return grouped

    def _unlist(self, r: Request) -> None:
        rs = self._by_adapter[r.adapter]
        del rs[bisect.bisect_left(rs, r.sort_key(), key=Request.sort_key)]
        if not rs:
            del self._by_adapter[r.adapter]
        self.membership += 1

    # --- queue changes from the cluster ------------------------------------------------------------
    def enqueue(self, r: Request) -> None:
        r.replica = self.id
        bisect.insort(self.queue, r, key=Request.sort_key)
        bisect.insort(self._by_adapter.setdefault(r.adapter, []), r, key=Request.sort_key)
        self.membership += 1
        self.version += 1
        self.on_queue_change()

    def remove(self, r: Request) -> None:
        i = bisect.bisect_left(self.queue, r.sort_key(), key=Request.sort_key)
        if i >= len(self.queue) or self.queue[i] is not r:
            raise PolicyError(f"request {r.id} is not queued on replica {self.id}")
        if any(x is r for x in self.running):
            raise PolicyError(f"request {r.id} is running on replica {self.id} and cannot be removed")
        del self.queue[i]
        self._unlist(r)
        # its KV (GPU or host copy) leaves with it: a migrated request holds no memory here
        if r.state == State.RESIDENT:
            self.free_blocks += r.kv_blocks
        elif r.state == State.SWAPPED:
            self.host_free_blocks += r.kv_blocks
        else:   # a partly prefilled prompt's chunks are recomputed wherever it goes
            self.free_blocks += r.kv_blocks
            r.prefilled = 0
        if r.cache_refs:
            self._release(r)
        r.kv_blocks = 0
        self.version += 1
        self.on_queue_change()

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
        if self.prefix_cache is not None:
            self.prefix_cache.reclaim(self.free_blocks)
        self.enqueue(r)
        return r.state

    def add_adapter(self, rank: int) -> None:
        """A new adapter's rank (the next id); it must fit the slots, sized for the largest rank."""
        if self.slot_bytes(rank) > self.slot_bytes(max(self._ranks, default=1)):
            padded = "" if self._pad is None else f" (cluster.replica.max_lora_rank={self.cfg.max_lora_rank})"
            raise ValueError(f"rank {rank} is above the adapter slots' maximum {max(self._ranks, default=1)}{padded}")
        self._ranks.append(rank if self._pad is None else self._pad)
        self._copy_ranks.append(rank)

    def preload(self, adapters: Sequence[int]) -> None:
        for a in adapters:
            if len(self.resident) >= self.adapter_slots:
                raise ValueError(f"replica {self.id}: cannot preload {list(adapters)} into {self.adapter_slots} slots")
            self.resident[a] = None
            self.resident_rank_sum += self._ranks[a]
            if self.tiers is not None:   # fetched before serving starts
                self.tiers.load(a, 0, 0)

    # --- applying a decision ------------------------------------------------------------------------
    def begin(self, d: Decision) -> Step:
        """Validate `d` and apply it to memory; the batch is then in flight until `end_run`."""
        validate(self, d)
        self.version += 1
        rec, bs = self.recorder, self.block_size
        step = Step(d.batch, d, [], [], self.merged, block_bytes=self.layout.block_bytes, full_copy=self.full_copy,
                    overlap_loads=self.cfg.overlap_loads)
        for r in d.recompute:
            self.free_blocks += r.kv_blocks
            r.kv_blocks, r.state, r.prefilled = 0, State.QUEUED, 0
            r.preemptions += 1
            if r.cache_refs:
                self._release(r)
        for r in d.swap_out:
            self.free_blocks += r.kv_blocks
            self.host_free_blocks -= r.kv_blocks
            step.swapped_out_blocks += r.kv_blocks
            r.state = State.SWAPPED
            r.preemptions += 1
            if r.cache_refs:   # its whole KV goes to host memory; the cached prefix stays on the GPU
                self._release(r)
        rec.count("preemptions", len(d.recompute) + len(d.swap_out))
        rec.count("swap_outs", len(d.swap_out))
        rec.count("recomputes", len(d.recompute))
        ranks = self._ranks
        for a in d.evict:
            del self.resident[a]
            self.resident_rank_sum -= ranks[a]
        for a in d.load:
            self.resident[a] = None
            self.resident_rank_sum += ranks[a]
            step.load_bytes.append(self.slot_bytes(self._copy_ranks[a]))
        rec.count("adapter_loads", len(d.load))
        if self.tiers is not None:
            self._tiered(step, d)
        if d.merged != self.merged:
            if not self.full_copy:
                rec.count("switches", 1)
            self.merged = d.merged
        prefill_tokens = prefill_sq = decode = ctx = rank_sum = token_rank = 0
        prefill, swap_in = step.prefill, step.swap_in
        seen: set[int] = set()
        pre_adapters: list[int] = []
        now = self._clock()
        free = self.free_blocks
        left, chunked = self.max_num_batched_tokens, self.chunked_prefill
        cache = self.prefix_cache
        fresh: list[tuple[int, Request, int]] = []   # first chunks the token budget cut (prefix caching)
        # hot loop: plain attribute arithmetic, with prefill_chunks' rule and blocks_for inlined (a call per
        # request slowed whole runs measurably, side by side with benchmarks/sim_speed.py's workload)
        for r in d.batch:
            n = r.prompt_tokens + r.generated
            state = r.state
            if state == _QUEUED:
                done = r.prefilled
                c = n - done
                if chunked and c > left:
                    c = left
                    rec.count("prefill_chunks", 1)   # a partial chunk: the prompt continues next iteration
                left -= c
                if cache is not None and not done and r.prefix:   # its first chunk: the cached prefix is done
                    if c < n:   # cut by the budget: the cache may reach past it (_extend_prefixes)
                        fresh.append((len(prefill), r, c))
                    done, credit = cache.acquire(r, c)
                    if done:   # the chunk's tokens and blocks stay as planned; only the rest is computed
                        r.prefilled, c, free = done, c - done, free + credit
                        rec.count("prefix_hit_tokens", done)
                need = -(-(done + c) // bs)
            else:
                need = -(-n // bs)
                left -= 1
            if state == _SWAPPED:
                swap_in.append(r)
                self.host_free_blocks += r.kv_blocks
                step.swapped_in_blocks += need
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
                prefill_tokens += c
                prefill_sq += c * (2 * done + c)   # causal attention of c tokens over done + c: chunks sum to n^2
                token_rank += c * rank
                prefill.append(c)
                if c:
                    pre_adapters.append(a)
            else:
                decode += 1
                ctx += n
                token_rank += rank
                prefill.append(0)
            if a not in seen:
                seen.add(a)
                rank_sum += rank
        if fresh:
            free, dt, dsq, dtr = self._extend_prefixes(fresh, free, prefill)
            prefill_tokens, prefill_sq, token_rank = prefill_tokens + dt, prefill_sq + dsq, token_rank + dtr
        self.free_blocks = free
        if self.free_blocks < 0 or self.host_free_blocks < 0:
            raise PolicyError(f"replica {self.id}: decision exceeds memory (free blocks {self.free_blocks}, "
                              f"host blocks {self.host_free_blocks})")
        if self.prefix_cache is not None:
            self.prefix_cache.reclaim(self.free_blocks)
        rec.count("swap_ins", len(swap_in))
        step.prefill_tokens, step.prefill_sq, step.decode_seqs, step.decode_context = prefill_tokens, prefill_sq, decode, ctx
        step.rank_sum, step.token_rank, step.distinct = rank_sum, token_rank, len(seen)
        step.lora_passes = len(seen)
        if pre_adapters and decode:   # an adapter with prefill and decode tokens: one pass for each kind
            step.lora_passes += len(set(pre_adapters) & {r.adapter for r in d.batch if r.state != _QUEUED})
        step.resident_rank_sum = self.resident_rank_sum
        self.running = d.batch
        if self.debug:
            self.check_accounting()
        return step

    def _extend_prefixes(self, fresh: list[tuple[int, Request, int]], free: int,
                         prefill: list[int]) -> tuple[int, int, int, int]:
        """Prefix caching: a first chunk the token budget cut takes cached blocks past it too, as far as the blocks
        the batch leaves free allow (an entry other requests reference costs none; an unreferenced one is already
        counted free), so a long prompt reuses its whole cached prefix as vLLM's does: the prompt then continues
        after the cached run, the chunk computing at most the tokens planned. Returns the free blocks and what the
        step's prefill tokens, prefill_sq and token-rank change by."""
        cache, bs, rec = self.prefix_cache, self.block_size, self.recorder
        assert cache is not None
        bt, dt, dsq, dtr = cache.block_tokens, 0, 0, 0
        for i, r, planned in fresh:
            n = r.prompt_tokens + r.generated
            flags = cache.extension(r, n)
            h, c = r.prefilled, prefill[i]
            best, shared = 0, 0
            for k, is_shared in enumerate(flags, start=1):
                shared += is_shared
                top = h + k * bt
                blocks = -(-(top + min(n - top, planned)) // bs)
                if blocks - r.kv_blocks - cache.blocks * shared <= free:
                    best = k
            if not best:
                continue
            credit = cache.take(r, best)
            top = h + best * bt
            c2 = min(n - top, planned)
            blocks = -(-(top + c2) // bs)
            free -= blocks - r.kv_blocks - credit
            r.kv_blocks, r.prefilled, prefill[i] = blocks, top, c2
            dt += c2 - c
            dsq += c2 * (2 * top + c2) - c * (2 * h + c)
            dtr += (c2 - c) * self._ranks[r.adapter]
            rec.count("prefix_hit_tokens", top - h)
            if top + c2 >= n:   # the prompt completes in this chunk after all
                rec.count("prefill_chunks", -1)
        return free, dt, dsq, dtr

    def prefetch_pending(self) -> bool:
        """Adapter prefetch has work a later decision would start (a queued request's adapter neither resident,
        in host memory nor on its way): the simulator then does not fast-forward past those decisions."""
        tiers = self.tiers
        if tiers is None or not self.cfg.adapter_prefetch:
            return False
        return any(a not in self.resident and a not in tiers.host and a not in tiers.fetching for a in self.by_adapter())

    def freed_by(self, r: Request) -> int:
        """ReplicaView: the KV blocks preempting r frees (blocks of cached prefixes it shares stay in use)."""
        if not r.cache_refs:
            return r.kv_blocks
        cache = self.prefix_cache
        assert cache is not None
        return r.kv_blocks - cache.blocks * sum(cache.refs[k] > 1 for k in r.cache_refs)

    def _release(self, r: Request) -> None:
        """r gave its KV blocks back: those of cached entries other requests still reference stay in use."""
        assert self.prefix_cache is not None
        self.free_blocks -= self.prefix_cache.release(r)

    def _tiered(self, step: Step, d: Decision) -> None:
        """The decision's loads by tier (what the store adds to each), then the fetches it asks for
        (`Decision.prefetch`, policies/batching.py chooses them), as many in flight as the GPU has slots."""
        tiers, rec, now = self.tiers, self.recorder, self._clock()
        assert tiers is not None
        evicted = tiers.evictions
        tiers.settle(now)
        ready = now   # when the decision's adapters are all in host memory: prefetches land in parallel,
        for a, nbytes in zip(d.load, step.load_bytes):   # fetches on demand follow one another
            wait, tier = tiers.load(a, nbytes, now)
            ready = ready + to_ns(wait) if tier == "store" else max(ready, now + to_ns(wait))
            rec.count(f"adapter_loads_{tier}")
            rec.count("adapter_host_load_ns", to_ns(self.cost.load_time(nbytes)))
        step.store_s = (ready - now) / NS
        rec.count("adapter_store_wait_ns", ready - now)
        if self.cfg.adapter_prefetch:
            ranks = self._copy_ranks
            rec.count("adapter_prefetches", tiers.prefetch(d.prefetch, lambda a: self.slot_bytes(ranks[a]), now,
                                                           self.adapter_slots))
        rec.count("host_cache_evictions", tiers.evictions - evicted)

    def continue_decodes(self, d: Decision, prev: Step) -> Step:
        """`begin` for the decisions a policy promised to make again right after `prev`'s prefills
        (`LocalScheduler.continues`): the same requests, all resident now, decode. One pass for KV growth
        and the features; the checks `begin` makes hold by construction (the full check with `debug`)."""
        if self.debug:
            return self.begin(d)
        if d.batch is not prev.batch or d.load or d.evict or d.merged != self.merged:
            raise PolicyError(f"replica {self.id}: a continued decision must run the same batch and mode")
        self.version += 1
        bs, ranks, free = self.block_size, self._ranks, self.free_blocks
        ctx = token_rank = 0
        for r in d.batch:   # hot loop: blocks_for inlined
            if r.state != _RESIDENT:
                raise PolicyError(f"replica {self.id}: request {r.id} of a continued batch is not resident")
            n = r.prompt_tokens + r.generated
            need = -(-n // bs)
            free -= need - r.kv_blocks
            r.kv_blocks = need
            ctx += n
            token_rank += ranks[r.adapter]
        if free < 0:
            raise PolicyError(f"replica {self.id}: a continued decision exceeds memory (free blocks {free})")
        self.free_blocks = free
        if self.prefix_cache is not None:
            self.prefix_cache.reclaim(free)
        n = len(d.batch)
        step = Step(d.batch, d, [0] * n, [], self.merged, decode_seqs=n, decode_context=ctx, rank_sum=prev.rank_sum,
                    token_rank=token_rank, distinct=prev.distinct, lora_passes=prev.distinct,
                    resident_rank_sum=self.resident_rank_sum, block_bytes=prev.block_bytes, full_copy=self.full_copy)
        self.running = d.batch
        return step

    def complete(self, step: Step, end: int, dur: int, *, last: bool = False) -> tuple[int, int]:
        """The step's (first) iteration ended at `end` ns after `dur` ns: every request gains a token.
        With `last`, it is also the run's last iteration: `end_run` in the same pass. Returns (prefill
        tokens, prefilled requests) for the record."""
        prefill_tokens = prefills = 0
        self.version += 1
        done, bs, free = [], self.block_size, self.free_blocks
        for r, pf in zip(step.batch, step.prefill):
            if pf:
                prefill_tokens += pf
                prefills += 1
                if r.prefilled + pf < r.prompt_tokens + r.generated:   # a chunk: the prompt is not done yet
                    r.prefilled += pf
                    r.exec_ns += dur
                    continue
                r.prefilled = 0
                r.state = _RESIDENT
                if r.prefix and self.prefix_cache is not None:
                    self.prefix_cache.register(r)
                    self.recorder.count("prefix_prompt_tokens", r.prompt_tokens + r.generated)
            g = r.generated = r.generated + 1
            r.exec_ns += dur
            if r.first_token < 0:
                r.first_token = end
            if last:   # end_run's rule, inlined
                if g >= r.output_tokens:
                    done.append(r)
                    continue
                need = -(-(r.prompt_tokens + g - 1) // bs)
                free -= need - r.kv_blocks
                r.kv_blocks = need
        if last:
            self._ended(done, free, end)
        return prefill_tokens, prefills

    def complete_repeats(self, batch: Sequence[Request], m: int, total: int) -> None:
        """m more identical decode iterations of `total` ns together (nobody finishes inside them), and
        the next identical one is in flight: every request's KV grows to hold it (one pass for both, the
        hot path of a fast-forwarded run observed part-way; the run's end is `end_run` with repeats)."""
        self.version += 1
        bs, free = self.block_size, self.free_blocks
        for r in batch:
            g = r.generated = r.generated + m
            r.exec_ns += total
            if g >= r.output_tokens:
                raise AssertionError("a request finished inside a fast-forwarded run")
            need = -(-(r.prompt_tokens + g) // bs)   # blocks_for, inlined: once per request per repeat
            free -= need - r.kv_blocks
            r.kv_blocks = need
        self.free_blocks = free
        self._check_free()

    def grow_in_flight(self, batch: Sequence[Request]) -> None:
        """The next identical iteration of `batch` is in flight: every request's KV grows to hold it."""
        self.complete_repeats(batch, 0, 0)

    def end_run(self, batch: Sequence[Request], end: int, repeats: int = 0, repeat_ns: int = 0) -> list[Request]:
        """The batch's last iteration ended at `end` ns: requests with all their tokens finish; the others
        hold KV for every token but the one their next iteration writes (after repeats of a decision
        applied in bulk, that is more than `begin` charged). `repeats` identical decode iterations of
        `repeat_ns` together are applied first, in the same pass (`complete_repeats`). Returns the
        requests that finished."""
        done, bs, free = [], self.block_size, self.free_blocks
        self.version += 1
        for r in batch:
            if repeats:
                r.generated += repeats
                r.exec_ns += repeat_ns
            if r.state == _QUEUED:   # a prefill chunk: its KV is what begin charged
                continue
            if r.generated >= r.output_tokens:
                done.append(r)
                continue
            need = -(-(r.prompt_tokens + r.generated - 1) // bs)   # blocks_for, inlined: per request per step
            free -= need - r.kv_blocks
            r.kv_blocks = need
        self._ended(done, free, end)
        return done

    def _ended(self, done: list[Request], free: int, end: int) -> None:
        self.free_blocks = free
        for r in done:
            self._finish(r, end)
        self.running = []
        self._check_free()

    def _check_free(self) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.reclaim(self.free_blocks)
        if self.free_blocks < 0:
            raise AssertionError(f"replica {self.id}: KV blocks overcommitted ({self.free_blocks})")
        if self.debug:
            self.check_accounting()

    def repeatable(self, batch: list[Request]) -> int:
        """How many identical decode iterations fit before a request finishes or blocks run out."""
        k = min(r.output_tokens - r.generated for r in batch)
        bs, free = self.block_size, self.free_blocks

        def extra(m: int) -> int:   # blocks the iterations 2..m need beyond what the first holds
            # blocks_for, inlined: called per bisection step over the whole batch
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

    def check_accounting(self) -> None:
        """Every block is owned by exactly one request; nothing exceeds capacity (debug and tests)."""
        check_accounting(self)

    def _finish(self, r: Request, t: int) -> None:
        self.free_blocks += r.kv_blocks
        if r.cache_refs:
            self._release(r)
        r.kv_blocks = 0
        r.state = State.FINISHED
        r.finish = t
        i = bisect.bisect_left(self.queue, r.sort_key(), key=Request.sort_key)
        del self.queue[i]
        self._unlist(r)
        self._on_done(r)

_QUEUED, _RESIDENT, _SWAPPED, _FINISHED = State.QUEUED, State.RESIDENT, State.SWAPPED, State.FINISHED


def _nothing() -> None:
    pass


def _no_lag() -> int:
    return 0


def _forever() -> int:
    return FOREVER_NS
