"""dLoRA's self-tuning merge thresholds (AIMD on counterfactual throughputs).

A *phase* is a run of iterations in one mode the replica actually ran (merged on some adapter, or
unmerged), whether the mode decision or the starvation guard chose it. At every merged <-> unmerged or
adapter-to-adapter transition, the phase that ended is replayed against two counterfactual policies,
each starting from the mode the replica was in before the phase:
- merged-only: every iteration merged on the most-loaded adapter m, serving min(|R_m|, B) requests,
  paying a switch whenever m changes;
- unmerged-only: every iteration running the FCFS batch F unmerged.
Iteration and switch times come from the replica's cost model (the profile of the model and hardware in
use; dlora-algorithm.md section 6.3), for decode iterations at `ref_context` tokens per sequence.
After a merged phase: merged-only better -> theta_right -= step (merge sooner), else theta_right *= factor.
After an unmerged phase: unmerged-only better -> theta_left += step (unmerge sooner), else
theta_left /= factor. theta_left < theta_right always.

Fast-forward: the engine may repeat a `stable` decision without asking the policy. Phase statistics
are therefore charged lazily: each decision's per-iteration statistics are integers (requests,
nanoseconds) held as pending and multiplied, at the next call, by the number of iterations the
decision actually ran (read from its requests' `generated` counters). Repeats of a stable decision
have identical statistics by the stability promise, so the sums are the same whether the engine
asked once or k times.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dlora_sim.cost_model import CostModel
from dlora_sim.request import NS, Request, to_ns


@dataclass(slots=True)
class IterationStats:
    """Counterfactual numbers of one iteration (integers, so repeated sums are exact)."""

    merged_served: int
    merged_ns: int
    unmerged_served: int
    unmerged_ns: int


@dataclass
class Phase:
    mode: int | None                # the mode the phase ran in (merged adapter, or None)
    before: int | None              # the mode before it (where the counterfactuals start)
    iterations: int = 0
    merged_served: int = 0
    merged_ns: int = 0
    unmerged_served: int = 0
    unmerged_ns: int = 0
    switch_ns: int = 0              # merged-only's switches when m changes inside the phase
    first_m: int | None = None
    last_m: int | None = None


@dataclass
class ThresholdTuner:
    theta_left: float
    theta_right: float
    step: float
    factor: float
    theta_min: float
    theta_max: float
    min_gap: float
    enabled: bool = True
    phase: Phase = field(default_factory=lambda: Phase(None, None))
    _pending: tuple[Request, int, IterationStats] | None = field(default=None, repr=False)
    evaluations: list[tuple[int | None, float, float]] = field(default_factory=list, repr=False)

    # --- per call ------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Charge the previous decision's iterations (however many the executor ran) to the phase."""
        if self._pending is None:
            return
        probe, g0, st = self._pending
        self._pending = None
        k = probe.generated - g0
        if k <= 0:
            return
        ph = self.phase
        ph.iterations += k
        ph.merged_served += k * st.merged_served
        ph.merged_ns += k * st.merged_ns
        ph.unmerged_served += k * st.unmerged_served
        ph.unmerged_ns += k * st.unmerged_ns

    def observe_m(self, m: int | None, cost: CostModel) -> None:
        """The most-loaded adapter this call; merged-only would switch when it changes."""
        ph = self.phase
        if m is None:
            return
        if ph.first_m is None:
            ph.first_m = m
        elif m != ph.last_m:
            ph.switch_ns += to_ns(cost.mode_change_time(ph.last_m, m))
        ph.last_m = m

    def pending(self, batch: list[Request], stats: IterationStats) -> None:
        if batch:
            self._pending = (batch[0], batch[0].generated, stats)

    # --- at a mode change --------------------------------------------------------------------
    def mode_changed(self, new_mode: int | None, cost: CostModel) -> None:
        ph = self.phase
        if self.enabled and ph.iterations > 0:
            merged_entry = to_ns(cost.mode_change_time(ph.before, ph.first_m)) if ph.first_m is not None else 0
            unmerged_entry = to_ns(cost.mode_change_time(ph.before, None))
            x_m = _rate(ph.merged_served, ph.merged_ns + ph.switch_ns + merged_entry)
            x_u = _rate(ph.unmerged_served, ph.unmerged_ns + unmerged_entry)
            self.adjust(ph.mode is not None, x_m, x_u)
            self.evaluations.append((ph.mode, x_m, x_u))
        self.phase = Phase(new_mode, ph.mode)

    def adjust(self, merged_phase: bool, x_merged: float, x_unmerged: float) -> None:
        """AIMD: additive step towards the mode that won, multiplicative back-off otherwise."""
        if merged_phase:
            if x_merged > x_unmerged:
                self.theta_right = max(self.theta_right - self.step, self.theta_left + self.min_gap)
            else:
                self.theta_right = min(self.theta_right * self.factor, self.theta_max)
        else:
            if x_unmerged > x_merged:
                self.theta_left = min(self.theta_left + self.step, self.theta_right - self.min_gap)
            else:
                self.theta_left = max(self.theta_left / self.factor, self.theta_min)


def _rate(served: int, ns: int) -> float:
    return served * NS / ns if ns > 0 else 0.0

