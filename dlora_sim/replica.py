"""One replica as a SimPy process: ask the local policy, apply its decision, advance simulated time.

The rules that apply a decision live in `ReplicaState` (replica_state.py), shared with the GPU
runtime; this class adds only time: each step is priced by the cost model and waited out.

Fast-forward: when a policy marks its decision `stable` and the batch is all decodes with nothing to
load, switch, swap or preempt, the replica runs up to k identical iterations (until the first request finishes,
KV blocks would run out, or the decision's `max_repeats`) as a few timeouts, one per chunk of doubling
size. Any queue change interrupts it; it then stops at the end of the iteration in flight.
`sync(now)` materialises the iterations completed before `now`, so routers and migrators observe
exactly the state they would if every iteration were simulated one by one.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import simpy

from dlora_sim.cost_model import CostModel
from dlora_sim.policies.base import Decision, LocalScheduler, PolicyError
from dlora_sim.replica_state import ReplicaConfig, ReplicaState, Step
from dlora_sim.request import Request, to_ns

if TYPE_CHECKING:
    from dlora_sim.metrics import Recorder


@dataclass(slots=True)
class _Run:
    """Iterations of one decision in flight: the first may carry overheads, later ones are repeats."""

    step: Step
    durations: list[int]       # ns, per iteration
    ends: list[int]            # absolute ns, per iteration
    compute: list[float]       # s, per iteration (for the record)
    overhead: tuple[float, float, float]   # switch, load, swap seconds (first iteration only)
    planned: int = 1           # iterations this decision runs (durations are generated lazily, in chunks)
    repeat: tuple[int, ...] = (0, 0, 0, 0, 0, 0)   # decode seqs, first context, rank sums, adapters of a repeat
    applied: int = 0


class Replica(ReplicaState):
    def __init__(self, rid: int, env: simpy.Environment, cfg: ReplicaConfig, cost: CostModel,
                 scheduler: LocalScheduler, ranks: Sequence[int], recorder: "Recorder",
                 on_done: Callable[[Request], None]):
        super().__init__(rid, cfg, cost, ranks, recorder, on_done, lambda: env.now, merges=scheduler.merges)
        self.env, self.scheduler = env, scheduler
        self._wake: simpy.Event | None = None     # set while idle
        self._repeating = False                     # waiting out repeats of a stable decision
        self._interrupted = False
        self._proc: simpy.Process | None = None
        self._run: _Run | None = None

    def queue_changed(self) -> None:
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        elif self._repeating and not self._interrupted:   # cut a fast-forwarded run short
            self._interrupted = True
            self._proc.interrupt()

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
        step = self.begin(d)
        price = self.prices(step)
        first = price.total_ns()
        now = self.env.now
        run = self._run = _Run(step, [first], [now + first], [price.compute], price.overhead)
        n = len(d.batch)
        # a preemption leaves a request waiting that the next decision may admit: not a repeatable state
        if (self.cfg.fast_forward and d.stable and step.decode_seqs == n and not d.recompute and not d.swap_out
                and price.switch + price.load + price.swap == 0.0):
            run.planned = self.repeatable(d.batch)
            if d.max_repeats is not None:
                run.planned = max(min(run.planned, d.max_repeats), 1)
            unmerged = d.merged is None
            run.repeat = (n, step.decode_context, step.rank_sum if unmerged else 0,
                          step.token_rank if unmerged else 0, step.resident_rank_sum,
                          step.lora_passes if unmerged else 0)
            self._extend(run, _FIRST_CHUNK)
        return run

    def _extend(self, run: _Run, upto: int) -> None:
        """Generate the durations of repeats up to iteration `upto` (capped at the plan): a run that a
        queue change cuts short never pays for the iterations it did not reach."""
        n, ctx, rank_sum, token_rank, resident, adapters = run.repeat
        lo, hi = len(run.durations), min(upto, run.planned)
        if hi <= lo:
            return
        computes = self.cost.decode_repeats(n, ctx, lo, hi, rank_sum, token_rank, resident, adapters)
        durations = [to_ns(c) for c in computes]
        t = run.ends[-1]
        ends = run.ends
        for dur in durations:
            t += dur
            ends.append(t)
        run.durations += durations
        run.compute += computes

    def _advance(self, run: _Run, upto: int) -> None:
        """Complete iterations run.applied .. upto-1 of the run in flight.

        The first iteration may prefill; the rest are identical decodes, applied in bulk (every request
        gains one token per iteration, and nobody can finish before the run's last iteration)."""
        i = run.applied
        if upto <= i:
            return
        step, rec = run.step, self.recorder
        batch, n, d = step.batch, len(step.batch), step.decision
        if i == 0:
            end, dur = run.ends[0], run.durations[0]
            prefill_tokens, prefills = self.complete(step, end, dur)
            rec.iteration(self.id, end - dur, dur, run.compute[0], run.overhead, d, n, prefill_tokens,
                          n - prefills, step.distinct)
            i = 1
        last = upto == run.planned
        if upto > i:
            total = sum(run.durations[i:upto])
            m = upto - i
            self.complete_repeats(batch, m, total, grow=not last)
            if rec.keep_iterations:
                for k in range(i, upto):
                    rec.iteration(self.id, run.ends[k] - run.durations[k], run.durations[k], run.compute[k],
                                  _NO_OVERHEAD, d, n, 0, n, step.distinct)
            else:
                rec.num_iterations += m
                rec.busy_ns += total
        run.applied = upto
        if last:
            self.end_run(batch, run.ends[-1])
        elif upto == i:   # only the first iteration completed; the one now in flight needs KV to grow
            self.grow_in_flight(batch)


_NO_OVERHEAD = (0.0, 0.0, 0.0)
_FIRST_CHUNK = 8   # repeats generated up front; each further chunk doubles the run so far
