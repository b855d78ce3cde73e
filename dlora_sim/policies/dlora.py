"""dLoRA's credit-based dynamic batching (dlora-algorithm.md section 2, with the fixes of 6.3 and 6.4).

Each iteration, on the FCFS-sorted queue Q with FCFS batch F (what unmerged FCFS would run under the
replica's limits):
1. starvation guard: adapters whose credit reached c_right (and stay above c_left) are forced: their
   requests go first, the rest of the batch is filled FCFS, and the iteration runs unmerged;
2. otherwise the mode decision, with m = the adapter with most queued requests and a* = the adapter
   the previous decision merged:
   stay merged on a* if |R_a*| >= theta_left*|F|; else merge on m if |R_m| >= theta_right*|F|;
   else run F unmerged;
3. zero-sum credit transfer from the adapters that ran in place of others to the displaced ones
   (reference batch: F; in a forced iteration, the batch the mode decision would have run, so that
   forcing spends the credit that bought it);
4. adapter slots: unmerged batches keep at most `adapter_slots` distinct adapters and load missing
   ones (evicting the resident adapter with fewest outstanding requests); a merged adapter is loaded
   first if it is not resident;
5. AIMD tuning of theta_left/theta_right at every decided mode change (see thresholds.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from dlora_sim.policies.base import Decision, LocalScheduler, PolicyError, ReplicaView
from dlora_sim.policies.batching import BatchPlan, fill_batch, plan_adapter_slots
from dlora_sim.policies.credits import CreditLedger
from dlora_sim.policies.thresholds import IterationStats, ThresholdTuner
from dlora_sim.request import Request, to_ns


@dataclass
class DLoRAScheduler(LocalScheduler):
    """dLoRA's local scheduler; one instance per replica (its credits and thresholds are per replica).

    Starvation bound. Credit counts displaced request-iterations: an adapter with a request in the
    reference batch that does not run gains >= 1 per iteration, so after d iterations of continuous
    displacement it is forced once d >= c_right - c, c its credit when displacement began. Credit only
    falls in iterations in which the adapter's requests run beyond the reference (forced, FCFS fill of a
    forced batch, or merged on it). Hence:
    - an adapter never served beyond its FCFS share (c >= 0) is forced within ceil(c_right) = 48 iterations;
    - after a forcing episode (it ends once c <= c_left, and one iteration moves at most P units: P = B
      requests displaced; P = ceil(B * t_unmerged / t_merged) with charge_slowdown) it is forced again
      within W = ceil(c_right - c_left) + P iterations;
    - a lone cold request (the only one of its adapter) pays at most 1 per iteration it runs and gains 1
      per iteration it is displaced, so its queueing delay while in F is at most (its output tokens + W)
      iterations.
    `starvation_bound(view)` returns W and W x the slowest full-batch iteration of the replica's profile
    plus one mode change: A100-80GB / Llama-2-7B analytic profile, B = 32, 512-token contexts:
    W = 64 iterations, ~2.0 s (first wait: 48 iterations, ~1.5 s). A wider c_right - c_left means
    fewer unmerge/merge pairs, a narrower one shorter stalls.

    Fast-forward: decisions are `stable` only if nothing was forced, no credit moved and the decided
    mode did not change; phase statistics for AIMD are charged lazily per executed iteration (see
    thresholds.py), so fast-forward on and off give identical runs.
    """

    guard: bool = True                 # the starvation guard (False: credits still move but never force)
    c_right: float = 48.0              # credit (displaced request-iterations) at which an adapter is forced
    c_left: float = 16.0               # ... and stays forced while above this (hysteresis)
    theta_right: float = 1.0           # initial: merge on m when |R_m| >= theta_right * |F|
    theta_left: float | None = None    # initial: stay merged while |R_a*| >= theta_left * |F|;
    #                                    None = merged/unmerged iteration-time ratio from the cost model
    tune: bool = True                  # AIMD threshold tuning
    aimd_step: float = 0.05            # additive step
    aimd_factor: float = 1.1           # multiplicative back-off
    theta_min: float = 0.05            # theta_left never below this
    theta_max: float = 4.0             # theta_right never above this
    min_gap: float = 0.01              # theta_left + min_gap <= theta_right
    charge_slowdown: bool = False      # forced adapters also pay for slowing a merged batch down (credits.py);
    #                                    off: it made episodes so short that cold requests crawled
    ref_context: int = 512             # tokens per sequence for cost-model estimates (initial theta_left, AIMD)

    ledger: CreditLedger = field(init=False, repr=False)
    tuner: ThresholdTuner | None = field(default=None, init=False, repr=False)
    anchor: int | None = field(default=None, init=False)   # the mode the last (unforced) decision chose

    def __post_init__(self) -> None:
        for key in ("c_right", "aimd_step", "theta_min", "theta_max", "ref_context"):
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
    def _decode_s(self, view: ReplicaView, n: int, rank_sum: int = 0, token_rank: int = 0) -> float:
        c = self.ref_context
        return view.cost.iteration_time(0, 0, n, n * c, n, rank_sum, token_rank)

    def _batch_s(self, view: ReplicaView, plan: BatchPlan, merged: bool) -> float:
        """Decode-iteration estimate for a planned batch (prefills are not what modes trade off)."""
        if merged:
            return self._decode_s(view, len(plan.batch))
        rank = view.adapter_rank
        return self._decode_s(view, len(plan.batch), sum(rank(x) for x in plan.adapters),
                              sum(rank(r.adapter) for r in plan.batch))

    def iteration_ratio(self, view: ReplicaView, rank: int) -> float:
        """Merged / unmerged decode iteration time at a full batch of B and `ref_context` tokens."""
        b = view.max_num_seqs
        distinct = min(b, view.adapter_slots)
        return self._decode_s(view, b) / self._decode_s(view, b, distinct * rank, b * rank)

    def starvation_bound(self, view: ReplicaView, rank: int = 16) -> tuple[int, float]:
        """(iterations, seconds) an adapter waits at most, displaced, before it is forced again after a
        forcing episode (see the class docstring); seconds at the slower of a full merged or unmerged
        decode iteration of this replica's profile, plus one mode change."""
        b = view.max_num_seqs
        t_m = self._decode_s(view, b)
        t_u = self._decode_s(view, b, min(b, view.adapter_slots) * rank, b * rank)
        pay = math.ceil(b * t_u / t_m) if self.charge_slowdown else b
        iters = math.ceil(self.c_right - self.c_left) + pay
        return iters, iters * max(t_m, t_u) + view.cost.mode_change_time(None, 0)

    def _init_tuner(self, view: ReplicaView) -> ThresholdTuner:
        if view.full_copy:
            raise PolicyError(f"replica {view.id}: dlora needs LoRA weights (cluster.replica.weights=lora), "
                              "it runs unmerged batches")
        left = self.theta_left
        if left is None:
            left = min(self.iteration_ratio(view, view.adapter_rank(view.queue[0].adapter)),
                       self.theta_right - self.min_gap)
        return ThresholdTuner(left, self.theta_right, self.aimd_step, self.aimd_factor, self.theta_min,
                              self.theta_max, self.min_gap, enabled=self.tune)

    # --- the decision ---------------------------------------------------------------------------------
    def schedule(self, view: ReplicaView) -> Decision:
        queue = view.queue
        if not queue:
            return Decision([], merged=view.merged)
        tuner = self.tuner
        if tuner is None:
            tuner = self.tuner = self._init_tuner(view)
        tuner.settle()
        slots, b = view.adapter_slots, view.max_num_seqs

        by_adapter: dict[int, list[Request]] = {}   # R_a, each in FCFS order
        for r in queue:
            if r.adapter in by_adapter:
                by_adapter[r.adapter].append(r)
            else:
                by_adapter[r.adapter] = [r]
        counts = {a: len(rs) for a, rs in by_adapter.items()}
        m = max(counts, key=counts.__getitem__)   # most queued; ties -> the adapter of the oldest request
        fcfs = fill_batch(view, queue, adapter_limit=slots)
        nf = len(fcfs.batch)
        tuner.observe_m(m, view.cost)

        # 2. the mode decision (also the reference a forced batch is charged against)
        a = self.anchor
        if a is not None and counts.get(a, 0) >= tuner.theta_left * nf:
            mode, plan = a, fill_batch(view, by_adapter[a])
        elif counts[m] >= tuner.theta_right * nf:
            mode, plan = m, fill_batch(view, by_adapter[m])
        else:
            mode, plan = None, fcfs
        if mode is not None and not plan.batch:   # the merged adapter's requests do not fit: run FCFS
            mode, plan = None, fcfs

        # 1. the starvation guard
        # (the adapter the decision merges on is served by it already; forcing it would only unmerge)
        forced = [f for f in self.ledger.forced_order(counts) if f != mode] if self.guard else []
        if forced:
            fplan = BatchPlan()
            for f in forced:
                fill_batch(view, by_adapter[f], plan=fplan, adapter_limit=slots)
            fill_batch(view, queue, plan=fplan, adapter_limit=slots)   # 3. forced + FCFS fill
            if not fplan.batch:   # nothing forced fits: not a forced iteration
                forced = []
            elif mode is None and set(fplan.batch) == set(plan.batch) and not (fplan.swap_out or fplan.recompute):
                forced = []       # the unforced decision already runs every forced request: nothing to force
        slowdown = 0.0
        if forced:
            reference, chosen, run_mode = plan.batch, fplan, None
            if mode is not None and self.charge_slowdown:   # forcing replaced a merged batch by a slower unmerged one
                slowdown = max(self._batch_s(view, fplan, False) / self._batch_s(view, plan, True) - 1, 0.0)
        else:
            reference, chosen, run_mode = fcfs.batch, plan, mode
            if mode != a:
                tuner.mode_changed(mode, view.cost)
                self.anchor = mode

        # 4. zero-sum credit transfer
        moved = self.ledger.transfer(reference, chosen.batch, slowdown)

        # phase statistics of this iteration, charged when we know how often it ran
        nm = min(counts[m], b)
        tuner.pending(chosen.batch, IterationStats(
            nm, to_ns(self._decode_s(view, nm)) if nm else 0,
            nf, to_ns(self._batch_s(view, fcfs, False)) if nf else 0))

        # 5. adapter slots
        if run_mode is None:
            load, evict = plan_adapter_slots(view, (r.adapter for r in chosen.batch))
        else:
            load, evict = plan_adapter_slots(view, [run_mode])
        stable = (not forced and moved == 0 and run_mode == view.merged and not chosen.swap_out
                  and not chosen.recompute)
        info = {"theta_left": round(tuner.theta_left, 6), "theta_right": round(tuner.theta_right, 6),
                "max_credit": self.ledger.max_credit()}
        return Decision(chosen.batch, merged=run_mode, load=load, evict=evict, swap_out=tuple(chosen.swap_out),
                        recompute=tuple(chosen.recompute), stable=stable, forced=bool(forced), info=info)

