"""One replica as a SimPy process: ask the local policy, apply its decision, advance simulated time.

The rules that apply a decision live in the replica's `ReplicaState` (dlora_sim/core), shared with
the GPU runtime; this process adds only time: each step is priced by the cost model and waited out.

Fast-forward: when a policy marks its decision `stable` and the batch is all decodes with nothing to
load, switch, swap or preempt, the replica runs up to k identical iterations (until the first request finishes,
KV blocks would run out, or the decision's `max_repeats`) as a few timeouts, one per chunk of doubling
size. Any queue change interrupts it; it then stops at the end of the iteration in flight.
`sync(now)` materialises the iterations completed before `now`, so migrators and routers that read
requests observe exactly the state they would if every iteration were simulated one by one; the
dLoRA router reads the replica's `lag` instead (iterations ended, not applied) and nothing is applied
for it but a run's first iteration.

Continuation: after an iteration with prefills, a policy that `continues` is not asked again while
its promise holds (see `LocalScheduler.continues`); the same batch goes on as decodes, fast-forwarded.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import simpy

from dlora_sim.core.contracts import Decision, LocalScheduler, PolicyError
from dlora_sim.core.replica_state import FOREVER_NS, ReplicaState
from dlora_sim.core.request import State, to_ns
from dlora_sim.core.step import Step


@dataclass(slots=True)
class _Run:
    """Iterations of one decision in flight: the first may carry overheads, later ones are repeats."""

    step: Step
    members: int               # the queue's membership when the decision began
    durations: list[int]       # ns, per iteration
    ends: list[int]            # absolute ns, per iteration
    compute: list[float]       # s, per iteration (for the record)
    overhead: tuple[float, float, float]   # switch, load, swap seconds (first iteration only)
    planned: int = 1           # iterations this decision runs (durations are generated lazily, in chunks)
    applied: int = 0


class Replica:
    """The process that drives one `ReplicaState` with its local scheduler in simulated time."""

    def __init__(self, state: ReplicaState, scheduler: LocalScheduler, env: simpy.Environment):
        self.state, self.scheduler, self.env = state, scheduler, env
        self.id = state.id
        state.on_queue_change = self.queue_changed
        state.lag = self._lag
        state.lag_until = self._lag_until
        self._wake: simpy.Event | None = None     # set while idle
        self._repeating = False                     # waiting out repeats of a stable decision
        self._interrupted = False
        self._proc: simpy.Process | None = None
        self._run: _Run | None = None
        self._continues = scheduler.continues and state.cfg.fast_forward

    def queue_changed(self) -> None:
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        elif self._repeating and not self._interrupted and self._proc is not None:   # cut a fast-forwarded run short
            self._interrupted = True
            self._proc.interrupt()

    # --- the process ---------------------------------------------------------------------------------
    def start(self) -> simpy.Process:
        self._proc = self.env.process(self.process())
        return self._proc

    def process(self):
        env, state = self.env, self.state
        while True:
            if state.queue:
                decision = self.scheduler.schedule(state)
                if decision.batch:
                    run = self._begin(decision, state.begin(decision))
                    yield from self._execute(run)
                    while self._continues and (decision := self._continuation(run)) is not None:
                        run = self._begin(decision, state.continue_decodes(decision, run.step))
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

    def _lag(self) -> int:
        """Repeats of the run in flight that ended before now and are not applied (the state's `lag`: a
        router counts them). Its first iteration, which may prefill, is applied if it ended."""
        run = self._run
        if run is None:
            return 0
        now, ends = self.env.now, run.ends
        if run.applied == 0:
            if ends[0] >= now:
                return 0
            self._advance(run, 1)
        return bisect.bisect_left(ends, now) - run.applied if run.applied < len(ends) else 0

    def _lag_until(self) -> int:
        """Until when `_lag()` keeps the value it returned now, with no effect: the end of the iteration in flight
        (the first iteration's, before it is applied); now itself where the run's ends are not generated yet, and
        before now where `_lag()` would apply the ended first iteration."""
        run = self._run
        if run is None:
            return FOREVER_NS   # nothing runs: the next run begins with a version change
        now, ends = int(self.env.now), run.ends   # simulated time is integer ns
        if run.applied == 0:   # lag() applies the first iteration once it ended: expired already if it has
            return ends[0] if ends[0] >= now else now - 1
        i = bisect.bisect_left(ends, now)
        return ends[i] if i < len(ends) else now

    # --- applying a decision ------------------------------------------------------------------------
    def _begin(self, d: Decision, step: Step) -> _Run:
        """A run of the decision `d` that the replica's state just began as `step`."""
        state = self.state
        price = state.cost.price(step)
        first = price.total_ns()
        now = int(self.env.now)
        run = self._run = _Run(step, state.membership, [first], [now + first], [price.compute], price.overhead)
        n = len(d.batch)
        # a preemption leaves a request waiting that the next decision may admit: not a repeatable state
        if (state.cfg.fast_forward and d.stable and step.decode_seqs == n and not d.recompute and not d.swap_out
                and price.switch + price.load + price.swap == 0.0 and not state.prefetch_pending()):
            run.planned = state.repeatable(d.batch)
            if d.max_repeats is not None:
                run.planned = max(min(run.planned, d.max_repeats), 1)
            self._extend(run, _FIRST_CHUNK)
        return run

    def _continuation(self, run: _Run) -> Decision | None:
        """The decision the policy promised to make again now that `run`'s prefills are done, or None
        (ask it): the whole queue ran, in order, nothing joined or left, nothing was loaded, and every
        request's next decode fits the free blocks and the token budget (so nothing is preempted)."""
        step, state = run.step, self.state
        d, batch, queue = step.decision, step.batch, state.queue
        if (not d.stable or run.planned != 1 or step.decode_seqs == len(batch) or d.load or d.evict
                or (d.max_repeats is not None and d.max_repeats < 2) or state.membership != run.members
                or len(batch) != len(queue) or len(batch) > state.max_num_batched_tokens):
            return None
        bs, need = state.block_size, 0
        for r, q in zip(batch, queue):
            if r is not q or r.state != _RESIDENT:
                return None
            need += -(-(r.prompt_tokens + r.generated) // bs) - r.kv_blocks   # blocks_for, inlined
        if need > state.free_blocks:
            return None
        return Decision(batch, merged=d.merged, stable=True,
                        max_repeats=None if d.max_repeats is None else d.max_repeats - 1, info=d.info)

    def _extend(self, run: _Run, upto: int) -> None:
        """Generate the durations of repeats up to iteration `upto` (capped at the plan): a run that a
        queue change cuts short never pays for the iterations it did not reach."""
        lo, hi = len(run.durations), min(upto, run.planned)
        if hi <= lo:
            return
        computes = self.state.cost.repeat_prices(run.step, lo, hi)
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
        state = self.state
        step, rec = run.step, state.recorder
        batch, n, d = step.batch, len(step.batch), step.decision
        last = upto == run.planned
        if i == 0:
            end, dur = run.ends[0], run.durations[0]
            prefill_tokens, prefills = state.complete(step, end, dur, last=last and upto == 1)
            rec.iteration(self.id, end - dur, dur, run.compute[0], run.overhead, d, batch_size=n,
                          prefill_tokens=prefill_tokens, decode_seqs=n - prefills, distinct=step.distinct)
            i = 1
        if upto > i:
            total = sum(run.durations[i:upto])
            m = upto - i
            if last:   # the repeats and the run's end in one pass
                state.end_run(batch, run.ends[-1], m, total)
            else:
                state.complete_repeats(batch, m, total)
            if rec.keep_iterations:
                for k in range(i, upto):
                    rec.iteration(self.id, run.ends[k] - run.durations[k], run.durations[k], run.compute[k],
                                  _NO_OVERHEAD, d, batch_size=n, prefill_tokens=0, decode_seqs=n,
                                  distinct=step.distinct)
            else:
                rec.num_iterations += m
                rec.busy_ns += total
                if d.merged is not None:
                    rec.merged_iterations += m
        elif not last:   # only the first iteration completed; the one now in flight needs KV to grow
            state.grow_in_flight(batch)
        run.applied = upto


_NO_OVERHEAD = (0.0, 0.0, 0.0)
_RESIDENT = State.RESIDENT
_FIRST_CHUNK = 8   # repeats generated up front; each further chunk doubles the run so far
