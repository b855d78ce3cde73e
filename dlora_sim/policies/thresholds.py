"""dLoRA's self-tuning merge thresholds (AIMD on counterfactual throughputs).

A *phase* is a run of iterations in one mode the replica actually ran (merged on some adapter, or
unmerged), whether the mode decision or the starvation guard chose it. At every merged <-> unmerged or
adapter-to-adapter transition, the phase that ended is replayed against two counterfactual policies,
each starting from the mode the replica was in before the phase:
- merged-only: every iteration merged on the most-loaded adapter m, serving min(|R_m|, B) requests,
  paying a switch whenever m changes;
- unmerged-only: every iteration running the FCFS batch F unmerged.
Iteration and switch times come from the replica's cost model (the profile of the model and hardware in
use, not constants fixed for one GPU), for decode iterations at `ref_context` tokens per sequence.
After a merged phase: merged-only better -> theta_right -= step (merge sooner), else theta_right *= factor.
After an unmerged phase: unmerged-only better -> theta_left += step (unmerge sooner), else
theta_left /= factor. theta_left < theta_right always.

A transition tunes the threshold that started the phase, so a phase that never ends (a replica that
starts unmerged under a load that merging would serve better) would never be tuned. Every `window`
iterations inside a phase, the last window is therefore replayed the same way, and when the mode in
use lost, the threshold that ends the phase is moved by one step: an unmerged window that merged-only
beats lowers theta_right; a merged window that unmerged-only beats raises theta_left. (A window the
mode in use won teaches nothing new: the phase simply goes on.)

Fast-forward: the engine may repeat a `stable` decision without asking the policy. Phase statistics
are therefore charged lazily: each decision's per-iteration statistics are integers (requests,
nanoseconds) held as pending and multiplied, at the next call, by the number of iterations the
decision actually ran (read from its requests' `generated` counters). Repeats of a stable decision
have identical statistics by the stability promise, so the sums are the same whether the engine
asked once or k times; and a stable decision may repeat at most until the next window ends
(`until_window()`), so the policy is asked at the same iteration either way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.request import NS, Request, to_ns


@dataclass(slots=True)
class IterationStats:
    """Counterfactual numbers of one iteration (integers, so repeated sums are exact)."""

    merged_served: int
    merged_ns: int
    unmerged_served: int
    unmerged_ns: int


@dataclass(slots=True)
class Tally:
    """Counterfactual sums over a run of iterations."""

    iterations: int = 0
    merged_served: int = 0
    merged_ns: int = 0
    unmerged_served: int = 0
    unmerged_ns: int = 0
    switch_ns: int = 0              # merged-only's switches when m changes

    def add(self, k: int, st: IterationStats) -> None:
        self.iterations += k
        self.merged_served += k * st.merged_served
        self.merged_ns += k * st.merged_ns
        self.unmerged_served += k * st.unmerged_served
        self.unmerged_ns += k * st.unmerged_ns

    def rates(self, merged_entry_ns: int = 0, unmerged_entry_ns: int = 0) -> tuple[float, float]:
        """(X_merged, X_unmerged): requests served per second by each counterfactual policy."""
        return (_rate(self.merged_served, self.merged_ns + self.switch_ns + merged_entry_ns),
                _rate(self.unmerged_served, self.unmerged_ns + unmerged_entry_ns))


@dataclass
class Phase:
    mode: int | None                # the mode the phase ran in (merged adapter, or None)
    before: int | None              # the mode before it (where the counterfactuals start)
    total: Tally = field(default_factory=Tally)
    window: Tally = field(default_factory=Tally)
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
    window: int = 256               # iterations between in-phase evaluations (0: only at transitions)
    phase: Phase = field(default_factory=lambda: Phase(None, None))
    _pending: tuple[Request, int, IterationStats] | None = field(default=None, repr=False)
    evaluations: list[tuple[int | None, float, float]] = field(default_factory=list, repr=False)
    window_evaluations: int = field(default=0, repr=False)

    # --- per call ------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Charge the previous decision's iterations (however many the executor ran) to the phase, and
        evaluate the window if it is complete."""
        if self._pending is None:
            return
        probe, g0, st = self._pending
        self._pending = None
        k = probe.generated - g0
        if k <= 0:
            return
        ph = self.phase
        ph.total.add(k, st)
        ph.window.add(k, st)
        if self.window and ph.window.iterations >= self.window:
            if self.enabled:
                x_m, x_u = ph.window.rates()
                if ph.mode is None and x_m > x_u:
                    self.theta_right = max(self.theta_right - self.step, self.theta_left + self.min_gap)
                elif ph.mode is not None and x_u > x_m:
                    self.theta_left = min(self.theta_left + self.step, self.theta_right - self.min_gap)
                self.window_evaluations += 1
            ph.window = Tally()

    def until_window(self) -> int | None:
        """Iterations the next decision may repeat before the window ends (None: no windows)."""
        if not (self.enabled and self.window):
            return None
        return max(self.window - self.phase.window.iterations, 1)

    def observe_m(self, m: int | None, cost: CostModel) -> None:
        """The most-loaded adapter this call; merged-only would switch when it changes."""
        ph = self.phase
        if m is None:
            return
        if ph.first_m is None:
            ph.first_m = m
        elif m != ph.last_m:
            ns = to_ns(cost.mode_change_time(ph.last_m, m))
            ph.total.switch_ns += ns
            ph.window.switch_ns += ns
        ph.last_m = m

    def pending(self, batch: list[Request], stats: IterationStats) -> None:
        if batch:
            self._pending = (batch[0], batch[0].generated, stats)

    # --- at a mode change --------------------------------------------------------------------
    def mode_changed(self, new_mode: int | None, cost: CostModel) -> None:
        ph = self.phase
        if self.enabled and ph.total.iterations > 0:
            merged_entry = to_ns(cost.mode_change_time(ph.before, ph.first_m)) if ph.first_m is not None else 0
            unmerged_entry = to_ns(cost.mode_change_time(ph.before, None))
            x_m, x_u = ph.total.rates(merged_entry, unmerged_entry)
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
