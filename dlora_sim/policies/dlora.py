"""dLoRA's credit-based dynamic batching (docs/algorithm.md): AIMD thresholds priced by the replica's cost
model, and credits counted in displaced request-iterations so a displaced adapter is forced in time.

Each iteration, on the FCFS-sorted queue Q with FCFS batch F (what unmerged FCFS would run under the
replica's limits):
1. the mode decision, with m = the adapter with most queued requests and a* = the adapter the replica
   is merged on: stay merged on a* if |R_a*| >= theta_left*|F|; else merge on m if
   |R_m| >= theta_right*|F|; else run F unmerged;
2. the starvation guard: adapters whose credit reached c_right are forced. Once a forcing episode
   starts, their requests go first (highest credit first) and the rest of the batch is filled FCFS;
   the batch runs merged if it holds one adapter only, else unmerged. An episode never starts, and
   its adapters never leave, sooner than `dwell` after the replica's last mode change, where dwell =
   that change's cost / `switch_budget`: every mode change the guard causes is amortised over at
   least 1/switch_budget times its cost, so the guard cannot make the replica thrash;
3. zero-sum credit settlement (credits.py): displaced adapters earn, those that ran in their place
   pay, forced adapters that run spend;
4. adapter slots: unmerged batches keep at most `adapter_slots` distinct adapters and load missing
   ones (evicting the resident adapter with fewest outstanding requests); a merged adapter is loaded
   first if it is not resident;
5. AIMD tuning of theta_left/theta_right at every mode change the replica makes, and every
   `aimd_window` iterations inside a long phase (thresholds.py).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from dlora_sim.core.contracts import Decision, LocalScheduler, PolicyError, ReplicaView
from dlora_sim.policies.batching import BatchPlan, adapter_prefetch, batch_adapter_slots, fill_batch, plan_adapter_slots
from dlora_sim.policies.credits import CreditLedger
from dlora_sim.policies.thresholds import IterationStats, ThresholdTuner
from dlora_sim.core.request import Request, to_ns


@dataclass
class DLoRAScheduler(LocalScheduler):
    """dLoRA's local scheduler; one instance per replica (its credits and thresholds are per replica).

    Starvation bound. Credit counts displaced request-iterations, and a forced adapter spends at most
    down to 0, so an adapter that was never served ahead of FCFS holds credit >= 0. Displaced
    continuously, it is forced within ceil(c_right) iterations; the episode starts within
    dwell_max = (costliest mode change) / switch_budget of the replica's last mode change, and its
    requests run in the episode's first iteration unless other forced adapters fill the batch
    (then it waits their turns; each lasts at least one dwell). `starvation_bound(view)` returns
    (c_right iterations, that wait in seconds) for the replica's profile: W = c_right x the slowest
    full-batch decode iteration + dwell_max + one mode change. At the defaults the dwell is most of it
    (tests/test_dlora_sim.py checks the bound on the A100-80GB / Llama-2-7B profile). An adapter served ahead of FCFS
    (credit c < 0, a hot adapter the mode decision merged on) waits c_right - c iterations: exactly the
    service it got ahead of the others.

    Fast-forward: decisions are `stable` only if nothing was forced or pending, no credit moved and the
    mode did not change; phase statistics for AIMD are charged lazily per executed iteration (see
    thresholds.py), so fast-forward on and off give identical runs.
    """

    merges = True
    # whole-queue stable decisions hold after their prefills: the counts, F, the mode, the credits and the
    # phase statistics depend on queue membership, the resident adapters and the mode, which such a prefill
    # keeps (the executor checks the free blocks, and max_repeats >= 2 keeps the AIMD window's end)
    continues = True
    guard: bool = True                 # the starvation guard (False: credits still move but never force)
    c_right: float = 48.0              # credit (displaced request-iterations) at which an adapter is forced
    c_left: float = 16.0               # ... and stays forced while above this (hysteresis)
    switch_budget: float = 0.02        # the guard changes mode no sooner than (last change's cost) / this
    theta_right: float = 1.0           # initial: merge on m when |R_m| >= theta_right * |F|
    theta_left: float | None = None    # initial: stay merged while |R_a*| >= theta_left * |F|;
    #                                    None = merged/unmerged iteration-time ratio from the cost model
    tune: bool = True                  # AIMD threshold tuning
    aimd_step: float = 0.05            # additive step
    aimd_factor: float = 1.1           # multiplicative back-off
    aimd_window: int = 256             # also evaluate every N iterations inside a phase (0: transitions only)
    theta_min: float = 0.05            # theta_left never below this
    theta_max: float = 4.0             # theta_right never above this
    min_gap: float = 0.01              # theta_left + min_gap <= theta_right
    ref_context: int = 512             # tokens per sequence for cost-model estimates (initial theta_left, AIMD)

    ledger: CreditLedger = field(init=False, repr=False)
    tuner: ThresholdTuner | None = field(default=None, init=False, repr=False)
    episode: bool = field(default=False, init=False)           # a forcing episode is running
    _changed_at: float = field(default=-math.inf, init=False, repr=False)   # time of the last mode change
    _dwell: float = field(default=0.0, init=False, repr=False)              # ... and its cost / budget
    _pending_since: float | None = field(default=None, init=False, repr=False)  # forced adapters waiting
    _episode_mode: int | None = field(default=None, init=False, repr=False)     # the episode's merged adapter
    _info_key: tuple | None = field(default=None, init=False, repr=False)
    _info: dict = field(default_factory=dict, init=False, repr=False)
    _rank: int | None = field(default=None, init=False, repr=False)   # every adapter's rank if one (0: mixed)
    _ranked: int = field(default=0, init=False, repr=False)   # adapters `_rank` was taken over (a server adds some)
    _decode_memo: dict = field(default_factory=dict, init=False, repr=False)   # (cost, shape) -> seconds

    def __post_init__(self) -> None:
        if self.aimd_window < 0:
            raise ValueError(f"scheduler.aimd_window must be >= 0, got {self.aimd_window}")
        for key in ("c_right", "aimd_step", "theta_min", "theta_max", "ref_context", "switch_budget"):
            if not getattr(self, key) > 0:
                raise ValueError(f"scheduler.{key} must be > 0, got {getattr(self, key)}")
        if not 0 <= self.c_left < self.c_right:
            raise ValueError(f"scheduler.c_left must be in [0, c_right={self.c_right}), got {self.c_left}")
        if not self.aimd_factor > 1:
            raise ValueError(f"scheduler.aimd_factor must be > 1, got {self.aimd_factor}")
        if not 0 <= self.min_gap < 1:
            raise ValueError(f"scheduler.min_gap must be in [0, 1), got {self.min_gap}")
        if not self.theta_min <= self.theta_right <= self.theta_max:
            raise ValueError(f"scheduler.theta_right must be in [theta_min, theta_max] = "
                             f"[{self.theta_min}, {self.theta_max}], got {self.theta_right}")
        if self.theta_left is not None and not 0 < self.theta_left < self.theta_right:
            raise ValueError(f"scheduler.theta_left must be in (0, theta_right={self.theta_right}), "
                             f"got {self.theta_left}")
        self.ledger = CreditLedger(self.c_right, self.c_left)

    # --- cost-model estimates ---------------------------------------------------------------------------
    def _decode_s(self, view: ReplicaView, n: int, rank_sum: int = 0, token_rank: int = 0,
                  adapters: int = 0) -> float:
        resident = view.resident_rank_sum if rank_sum else 0
        key = (view.cost, n, rank_sum, token_rank, adapters, resident)
        t = self._decode_memo.get(key)   # a few batch shapes recur every call: price each once
        if t is None:
            c = self.ref_context
            t = self._decode_memo[key] = view.cost.iteration_time(
                decode_seqs=n, decode_context=n * c, num_seqs=n, lora_rank_sum=rank_sum, lora_token_rank=token_rank,
                resident_rank_sum=resident, lora_passes=adapters)
        return t

    def _batch_s(self, view: ReplicaView, plan: BatchPlan) -> float:
        """Unmerged decode-iteration estimate for a planned batch (prefills are not what modes trade off)."""
        ranks, n = view.ranks, len(plan.batch)
        if self._rank is None or self._ranked != len(ranks):   # one rank for every adapter: sums are products
            self._rank = ranks[0] if ranks and all(x == ranks[0] for x in ranks) else 0
            self._ranked = len(ranks)
        if self._rank:
            return self._decode_s(view, n, len(plan.adapters) * self._rank, n * self._rank, len(plan.adapters))
        return self._decode_s(view, n, sum(ranks[x] for x in plan.adapters), sum(ranks[r.adapter] for r in plan.batch),
                              len(plan.adapters))

    def iteration_ratio(self, view: ReplicaView, rank: int) -> float:
        """Merged / unmerged decode iteration time at a full batch of B and `ref_context` tokens."""
        b = view.max_num_seqs
        distinct = min(b, view.adapter_slots)
        return self._decode_s(view, b) / self._decode_s(view, b, distinct * rank, b * rank, distinct)

    def dwell_s(self, view: ReplicaView, old: int | None, new: int | None) -> float:
        """How long the guard waits after a mode change old -> new: its cost / switch_budget."""
        return view.cost.mode_change_time(old, new) / self.switch_budget

    def starvation_bound(self, view: ReplicaView, rank: int = 16) -> tuple[int, float]:
        """(iterations, seconds): how long an adapter with credit >= 0 stays displaced at most before its
        requests run, when the forced adapters' requests fit one batch (see the class docstring)."""
        b = view.max_num_seqs
        t_m = self._decode_s(view, b)
        distinct = min(b, view.adapter_slots)
        t_u = self._decode_s(view, b, distinct * rank, b * rank, distinct)
        iters = math.ceil(self.c_right)
        costliest = view.cost.mode_change_time(0, 1)   # a switch costs at least a merge or an unmerge
        return iters, iters * max(t_m, t_u) + costliest / self.switch_budget + costliest

    def _init_tuner(self, view: ReplicaView) -> ThresholdTuner:
        if view.full_copy:
            raise PolicyError(f"replica {view.id}: dlora needs LoRA weights (cluster.replica.weights=lora), "
                              "it runs unmerged batches")
        left = self.theta_left
        if left is None:
            left = min(self.iteration_ratio(view, view.adapter_rank(view.queue[0].adapter)),
                       self.theta_right - self.min_gap)
        return ThresholdTuner(left, self.theta_right, self.aimd_step, self.aimd_factor, self.theta_min,
                              self.theta_max, self.min_gap, enabled=self.tune, window=self.aimd_window)

    # --- the decision ---------------------------------------------------------------------------------
    def schedule(self, view: ReplicaView) -> Decision:
        queue = view.queue
        if not queue:
            return Decision([], merged=view.merged)
        tuner = self.tuner
        if tuner is None:
            tuner = self.tuner = self._init_tuner(view)
        tuner.settle()
        slots, b, now = view.adapter_slots, view.max_num_seqs, view.now

        by_adapter = view.by_adapter()   # R_a, each in FCFS order (read-only)
        counts = {a: len(rs) for a, rs in by_adapter.items()}
        m = max(counts, key=counts.__getitem__)   # most queued; ties -> the adapter of the oldest request
        fcfs = fill_batch(view, queue, adapter_limit=slots)
        nf = len(fcfs.batch)
        tuner.observe_m(m, view.cost)

        # 1. the mode decision
        a = view.merged
        if a is not None and counts.get(a, 0) >= tuner.theta_left * nf:
            mode, plan = a, fill_batch(view, by_adapter[a])
        elif counts[m] >= tuner.theta_right * nf:
            mode, plan = m, fill_batch(view, by_adapter[m])
        else:
            mode, plan = None, fcfs
        if mode is not None and not plan.batch:   # the merged adapter's requests do not fit: run FCFS
            mode, plan = None, fcfs

        # 2. the starvation guard
        chosen, run_mode, forced = plan, mode, False
        pending = False
        if self.guard:
            episode = self._guard(view, by_adapter, fcfs, now)
            if episode is not None:
                fplan, fmode = episode
                if fmode != mode or set(fplan.batch) != set(plan.batch):   # the guard changed the iteration
                    chosen, run_mode, forced = fplan, fmode, True
            pending = self.episode or self._pending_since is not None

        # 3. zero-sum credit settlement
        moved = self.ledger.settle(fcfs.batch, chosen.batch, now)

        # 5. AIMD: phase statistics of this iteration, charged when we know how often it ran
        if run_mode != view.merged:
            self._changed_at, self._dwell = now, self.dwell_s(view, view.merged, run_mode)
            tuner.mode_changed(run_mode, view.cost)
        nm = min(counts[m], b)
        tuner.pending(chosen.batch, IterationStats(
            nm, to_ns(self._decode_s(view, nm)) if nm else 0,
            nf, to_ns(self._batch_s(view, fcfs)) if nf else 0))

        # 4. adapter slots
        if run_mode is None:
            load, evict = batch_adapter_slots(view, chosen)
        else:
            load, evict = plan_adapter_slots(view, [run_mode])
        stable = (not forced and not pending and moved == 0 and run_mode == view.merged and not chosen.swap_out
                  and not chosen.recompute)
        key = (tuner.theta_left, tuner.theta_right, self.ledger.max_credit())
        if key != self._info_key:   # unchanged thresholds share one (read-only) info dict
            self._info_key = key
            self._info = {"theta_left": round(key[0], 6), "theta_right": round(key[1], 6), "max_credit": key[2]}
        info = self._info
        return Decision(chosen.batch, merged=run_mode, load=load, evict=evict, swap_out=tuple(chosen.swap_out),
                        recompute=tuple(chosen.recompute), stable=stable, max_repeats=tuner.until_window(),
                        forced=forced, info=info, prefetch=adapter_prefetch(view, load, evict))

    def _guard(self, view: ReplicaView, by_adapter: dict[int, list[Request]], fcfs_plan: BatchPlan,
               now: float) -> tuple[BatchPlan, int | None] | None:
        """This iteration's forced batch and mode, or None when no forcing episode runs.

        An episode runs merged on its top adapter when that adapter's requests alone fill a batch as
        large as F (the efficient way to serve a backlog), else unmerged: the forced adapters' requests
        in FCFS order, then FCFS fill. Its mode is chosen again only once the last mode change is
        amortised, or when the merged adapter has nothing left to run."""
        ledger, queued, nf = self.ledger, by_adapter.keys(), len(fcfs_plan.batch)
        if not ledger.forced and not ledger.reaches_right():   # nobody is or becomes forced: no episode
            self.episode, self._pending_since = False, None
            return None
        settled = now - self._changed_at >= self._dwell   # the last mode change is amortised
        if settled or not self.episode:
            ledger.release()
        ledger.enter()
        order = ledger.forced_order(queued)
        if not order:
            self.episode, self._pending_since = False, None
            return None
        if not self.episode:
            if self._pending_since is None:
                self._pending_since = now
            dwell_max = view.cost.mode_change_time(0, 1) / self.switch_budget
            if not (settled or now - self._pending_since >= dwell_max):
                return None
            self.episode, self._pending_since, settled = True, None, True
            ledger.join(queued)
            order = ledger.forced_order(queued)
        mode = self._episode_mode
        plan = None
        if mode is not None and not settled and mode in order:   # keep the episode's merged adapter
            plan = fill_batch(view, by_adapter[mode])
        if not plan or not plan.batch:
            mode = None
            if settled or self._episode_mode not in order:        # choose: the first forced adapter
                rate_f = nf / self._batch_s(view, fcfs_plan)     # requests/s of the unmerged batch F
                for f in order:                                  # whose merged batch serves faster
                    p = fill_batch(view, by_adapter[f])
                    if p.batch and len(p.batch) / self._decode_s(view, len(p.batch)) > rate_f:
                        mode, plan = f, p
                        break
        if mode is None:
            slots = view.adapter_slots
            plan = fill_batch(view, heapq.merge(*(by_adapter[f] for f in order), key=Request.sort_key),
                              adapter_limit=slots)
            fill_batch(view, view.queue, plan=plan, adapter_limit=slots)   # forced first, then FCFS
        self._episode_mode = mode
        return (plan, mode) if plan.batch else None
