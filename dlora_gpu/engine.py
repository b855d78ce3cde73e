"""The serving loop: N replicas' iterations on their workers, over the serving core's `Cluster`.

The cluster front end (requests, dispatch, placement, migration, the end of the run) and the replica
states are the simulator's own (`dlora_sim.core`), and this driver owns them with the local
policies, as vLLM's engine owns its scheduler; each replica's worker (`dlora_gpu.workers`: in this
process, or a Ray actor) owns the device: model, adapters, paged KV. The driver applies each
decision through `ReplicaState.begin`, sends the step to the worker (`orders.StepOrder`: ids and
token ids) and completes it with the tokens that come back. Co-migration moves a request's KV from
the source worker to the target's (through Ray's object store), or recomputes it there from the
driver's tokens; a failed transfer falls back to recompute, with the reason in summary.json.
Three clocks:
- `real`: wall time. Requests arrive when the wall clock passes their trace time; each replica
  starts its next step as soon as its last one is back (replicas run at once on Ray actors),
  migration ticks and KV transfers happen at wall time, and every timestamp is what a user measures.
- `measured`: the clock advances by each step's measured wall time (its bookkeeping and the
  worker's run) and waits jump to the next event, so idle time, the policy's own time and the
  host's scheduling gaps do not count. On a CPU, with a profile that records the reference probe of
  its calibration (`provenance.reference_probe_s`), every step is also scaled to that reference's
  machine speed (`dlora_gpu.drift`): what is left between it and the simulator is the cost model's
  error and the per-iteration noise, not the machine's drift since the profile was measured. A KV
  transfer takes its measured wall time.
- `virtual`: the clock advances by the cost model's price of each step (and transfer) while the
  real kernels run. Events are ordered as the simulator orders them (`dlora_gpu.timeline`), so
  requests.csv is byte-identical to `dlora-sim` with the same config, migrations included: the
  runtime applies decisions exactly as the simulator does, and any error left on the real clock is
  the cost model's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from dlora_gpu.executor import CLOCKS, ExecutorSpec, PhaseTimes, RuntimeConfig
from dlora_gpu.orders import MemoryImage, Sampling, StepOrder, StepResult
from dlora_gpu.timeline import NORMAL, URGENT, Timeline
from dlora_gpu.tokens import TokenLog
from dlora_gpu.workers import Pending, ReplicaError
from dlora_sim.core.cluster import Cluster
from dlora_sim.core.config import Parts
from dlora_sim.core.contracts import Decision, PolicyError
from dlora_sim.core.replica_config import rank_pad
from dlora_sim.core.request import NS, Request, State, to_ns
from dlora_sim.core.results import RequestStream, SimResult
from dlora_sim.core.step import LoraFeatures, Prices, Step

class Clock:
    """Nanoseconds since the start of serving: wall time (`real`), cost-model time (`virtual`) or the
    sum of the steps' measured times (`measured`)."""

    def __init__(self, kind: str):
        if kind not in CLOCKS:
            raise ValueError(f"runtime.clock must be one of {list(CLOCKS)}, got {kind!r}")
        self.kind = kind
        self.virtual = kind == "virtual"
        self.stepped = kind != "real"   # time moves only by wait_until (the driver's events)
        self.start()

    def start(self) -> None:
        """Time 0 is now: serving starts (the model is built, warmed up and its adapters preloaded, as
        the simulator's replicas are at time 0), not when the clock was made."""
        self._t = 0
        self._t0 = time.perf_counter_ns()

    def now(self) -> int:
        return self._t if self.stepped else time.perf_counter_ns() - self._t0

    def at(self, perf_ns: int) -> int:
        """The real clock's reading at a `time.perf_counter_ns()` instant."""
        return perf_ns - self._t0

    def wait_until(self, t: int) -> None:
        if self.stepped:
            self._t = max(self._t, t)
        else:
            delay = (t - self.now()) / NS
            if delay > 0:
                time.sleep(delay)


@dataclass
class ServingStats:
    policy_s: float = 0.0     # wall time spent in the local schedulers (and the router, on the real clock)
    executor_s: float = 0.0   # workers' wall time running steps
    iterations: int = 0
    forced: int = 0           # iterations the starvation guard forced (a server's metrics)
    extra: dict = field(default_factory=dict)


@dataclass
class TransferStats:
    """KV moved between workers for co-migration, as measured (the cost model's price is the core's)."""

    count: int = 0
    bytes: int = 0
    wall_s: float = 0.0       # export, shipping and receipt, summed over transfers
    failed: int = 0

    def summary(self) -> dict:
        return {"kv_transfers": self.count, "kv_transfer_bytes": self.bytes,
                "kv_transfer_wall_s": round(self.wall_s, 6), "kv_transfers_failed": self.failed,
                "kv_transfer_bytes_per_s": round(self.bytes / self.wall_s, 1) if self.wall_s > 0 else None}


@dataclass
class _Flight:
    """A step sent to a replica's worker and not yet completed."""

    step: Step
    decision: Decision
    policy_s: float
    start: int                 # ns
    bookkeeping_s: float       # the driver's wall time applying the decision (counted by `measured`)
    pending: Pending
    price: Prices
    result: StepResult | None = None
    dur: int = 0               # ns, once known


@dataclass
class _Transfer:
    """A migrating request's KV on its way (the real clock's; the stepped clocks land it by an event)."""

    request: Request
    dst: int
    receipt: Pending
    t0: float


def _combined(scaling: list[dict]) -> dict:
    """Several replicas' drift scaling as one record of the single replica's keys (factors over all of
    them; the median of their medians), with each replica's own in `replicas`."""
    if not all(x["scaled"] for x in scaling):
        return {"scaled": False, "why": next(x["why"] for x in scaling if not x["scaled"]), "replicas": scaling}
    meds = sorted(x["factor_median"] for x in scaling if x["factor_median"] is not None)
    return {**scaling[0], "factors": sum(x["factors"] for x in scaling),
            "factor_median": meds[len(meds) // 2] if meds else None,
            "factor_min": min((x["factor_min"] for x in scaling if x["factor_min"] is not None), default=None),
            "factor_max": max((x["factor_max"] for x in scaling if x["factor_max"] is not None), default=None),
            "replicas": scaling}


class Listener:
    """What a server hears of its requests, on the engine's thread: tokens as each step returns them,
    and each request's end. The default hears nothing (a trace replay)."""

    def tokens(self, batch: list[Request], tokens: tuple[int, ...]) -> None:
        pass

    def ended(self, r: Request) -> None:
        pass


class Arrivals:
    """Where the real clock's requests come from: a trace's (`TraceArrivals`) or a server's inbox
    (`dlora_gpu.live.Inbox`). `pump(now)` dispatches what is due; `closed`: none will come."""

    poll_s = float("inf")   # the longest wait on the workers before pumping again

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def pump(self, now: int) -> None:
        raise NotImplementedError

    def next_at(self) -> int | None:
        """When the next arrival is due (ns), if known."""
        return None

    def wait(self, timeout_s: float) -> None:
        """Nothing runs: block until something may be due, at most `timeout_s`."""
        raise NotImplementedError


class TraceArrivals(Arrivals):
    """A workload's requests at their arrival times."""

    def __init__(self, engine: "Engine"):
        self.engine, self.requests, self.i = engine, engine.cluster.requests, 0

    @property
    def closed(self) -> bool:
        return self.i >= len(self.requests)

    def pump(self, now: int) -> None:
        reqs, eng = self.requests, self.engine
        while self.i < len(reqs) and reqs[self.i].arrival <= now:
            eng.dispatch(reqs[self.i], max(now, reqs[self.i].arrival))
            self.i += 1

    def next_at(self) -> int | None:
        return self.requests[self.i].arrival if self.i < len(self.requests) else None

    def wait(self, timeout_s: float) -> None:
        if timeout_s > 0:
            time.sleep(timeout_s)


_UNCOLLECTED = 64   # calls sent without waiting, collected (those done) once this many are outstanding

_WHERE = {State.RESIDENT: "resident", State.SWAPPED: "swapped", State.QUEUED: "recompute"}


class Engine:
    """Serves a workload on `parts.cluster.num_replicas` replicas; the same `Parts` as a simulation.

    `make_workers(specs)` builds the workers (`dlora_gpu.workers.make_workers`). With one replica a
    migration policy has nothing to move and is not run (summary.json says so). `keep_tokens` keeps
    every finished request's tokens (`tokens.finished`); `check_memory` checks after every step that
    each worker's memory mirrors its state (tests). `lose_kv(request)` is fault injection: the KV of
    the requests it names is lost in transit, as if the object store lost it."""

    def __init__(self, parts: Parts, rcfg: RuntimeConfig, make_workers: Callable, clock: Clock, *,
                 progress: bool = False, keep_iterations: bool = True, keep_tokens: bool = False,
                 stream: RequestStream | None = None):
        self._refuse(parts, clock)
        n = parts.cluster.num_replicas
        migrator = parts.migrator if n > 1 else None
        self.cluster = Cluster(parts.workload, parts.profile, parts.cluster, parts.scheduler_factory, parts.router,
                               migrator, clock.now, keep_iterations=keep_iterations, stream=stream)
        self.migrator, self.clock, self.profile = parts.migrator, clock, parts.profile
        self.recorder = self.cluster.recorder
        self.replicas, self.schedulers = self.cluster.replicas, self.cluster.schedulers
        if migrator is not None and not migrator.interval_s > 0:
            raise ValueError(f"migration.interval_s must be > 0, got {migrator.interval_s}")
        specs = [ExecutorSpec.of(rcfg, st, parts) for st in self.replicas]
        for spec in specs:
            spec.refuse()
        self.workers = make_workers(specs)
        try:
            self.info = [self.workers.get(self.workers.call(j, "about")) for j in range(n)]
        except BaseException:
            self.workers.close()
            raise
        self.tokens = TokenLog(self.info[0]["vocab"], rcfg.seed, keep_tokens)
        self.stats = ServingStats()
        self.transfers = TransferStats()
        self.check_memory = False
        self.lose_kv: Callable[[Request], bool] | None = None
        self.listener = Listener()
        self.sampling: dict[int, Sampling] = {}      # request id -> how it draws tokens (absent: greedy)
        self.stops: dict[int, frozenset[int]] = {}   # request id -> tokens that end it (EOS), if any
        self._cancels: dict[int, tuple[Request, str]] = {}   # asked to end while running or in transit
        self._progress = progress
        self._flight: dict[int, _Flight] = {}
        self._moving: list[_Transfer] = []
        self._releases: list[Pending] = []
        self._arriving: dict[int, int] = {}   # request id -> the replica its KV is on its way to
        self._sources: dict[int, int] = {}    # request id -> the replica it left
        self._link_free: dict[tuple[int, int], int] = {}   # measured clock: when each link's last transfer ends
        self.timeline = Timeline()
        self._stopped = False
        self._idle = [False] * n      # the replica waits for its queue to change (its last decision ran nothing)
        self._woken = [False] * n
        self.cluster.left_without_kv = lambda r, src: self._releases.append(self.workers.call(src, "forget", r.id))
        for j, st in enumerate(self.replicas):
            st.on_queue_change = (lambda j=j: self._queue_changed(j))

    @property
    def requests(self) -> list[Request]:
        return self.cluster.requests

    @staticmethod
    def _refuse(parts: Parts, clock: Clock) -> None:
        """What the runtime cannot serve, named by its config key."""
        if parts.cluster.replica.weights != "lora":
            raise ValueError("cluster.replica.weights=full_copy: the runtime keeps one base model with LoRA slots "
                             "(vLLM-replicated whole-model copies are simulator-only)")
        if parts.cluster.replica.prefix_caching:
            raise ValueError("cluster.replica.prefix_caching: the runtime's paged KV cache gives every request its "
                             "own blocks (no block shared between requests); prefix caching is simulator-only")
        pad = rank_pad(parts.cluster.replica, [a.rank for a in parts.workload.adapters])
        if pad is not None and not clock.virtual and any(a.rank < pad for a in parts.workload.adapters):
            raise ValueError(f"cluster.replica.max_lora_rank={parts.cluster.replica.max_lora_rank}: the runtime's "
                             "kernels compute at each adapter's own rank; vLLM's rank padding of smaller adapters is "
                             "priced on runtime.clock=virtual only")
        if parts.cluster.replica.host_adapter_cache is not None and not clock.virtual:
            raise ValueError("cluster.replica.host_adapter_cache: the runtime keeps every adapter in host memory; "
                             "adapter tiers are priced on runtime.clock=virtual only")

    # --- one step on one replica -----------------------------------------------------------------------
    def _decide(self, j: int) -> Decision | None:
        """Ask replica j's local policy; the decision if it runs a batch, else None."""
        t0 = time.perf_counter()
        d = self.schedulers[j].schedule(self.replicas[j])
        self._policy_s = time.perf_counter() - t0
        self.stats.policy_s += self._policy_s
        if d.batch:
            return d
        if d.load or d.evict or d.swap_out or d.recompute:
            raise PolicyError(f"replica {j}: a decision with an empty batch must not change memory")
        return None

    def _begin(self, j: int, d: Decision) -> _Flight:
        state, tokens = self.replicas[j], self.tokens
        start = self.clock.now()
        tb = time.perf_counter()
        step = state.begin(d)
        for r, pf in zip(step.batch, step.prefill):
            if pf:
                tokens.prompt(r)
        order = StepOrder.of(step, tokens, self.sampling)
        fl = _Flight(step, d, self._policy_s, start, time.perf_counter() - tb, self.workers.call(j, "run", order),
                     state.cost.price(step))   # the simulator's price, recorded on every clock
        self._flight[j] = fl
        return fl

    def _result(self, fl: _Flight) -> StepResult:
        if fl.result is None:
            fl.result = self.workers.get(fl.pending)
            self.stats.executor_s += fl.result.wall_s
            self.stats.iterations += 1
        return fl.result

    def _duration(self, j: int, fl: _Flight) -> int:
        """The step's length on this clock: its price (virtual), its measured time scaled by the drift
        factor (measured), or the wall time until now (real)."""
        if self.clock.virtual:
            return fl.price.total_ns()
        if self.clock.stepped:
            res = self._result(fl)
            return max(to_ns((fl.bookkeeping_s + res.wall_s) * res.factor), 1)
        done = fl.pending.meta.get("done_ns")   # in-process workers: when the call itself ended
        end = self.clock.at(done) if done is not None else self.clock.now()
        return max(end - fl.start, 1)

    def _complete(self, j: int) -> None:
        fl = self._flight.pop(j)
        state, step, d = self.replicas[j], fl.step, fl.decision
        res = self._result(fl)
        price = fl.price
        dur = fl.dur or self._duration(j, fl)
        if self.clock.virtual:
            compute, overhead = price.compute, price.overhead
        else:
            phases = PhaseTimes(*res.phases).scaled(res.factor)   # the wall_* columns below stay unscaled
            compute, overhead = phases.forward, (phases.mode, phases.load, phases.swap)
        end = fl.start + dur
        prefill_tokens, prefills = state.complete(step, end, dur)
        self.tokens.append(step.batch, res.tokens)
        if self.stops:
            for r, tok in zip(step.batch, res.tokens):
                if tok in self.stops.get(r.id, ()) and r.state != State.QUEUED:
                    r.output_tokens = r.generated   # it ends here, as if this was its last token
        self.listener.tokens(step.batch, res.tokens)
        done = state.end_run(step.batch, end)
        self.stats.forced += d.forced
        if done:
            self._releases.append(self.workers.call(j, "release", tuple(r.id for r in done)))
            if len(self._releases) >= _UNCOLLECTED:
                self._drain(wait=False)
            for r in done:
                self._ended(r)
                self.tokens.finish(r)
        if self._cancels:
            self._retry_cancels()
        n, lora, wall = len(step.batch), LoraFeatures.of(step), PhaseTimes(*res.phases)
        self.recorder.iteration(j, fl.start, dur, compute, overhead, d, batch_size=n, prefill_tokens=prefill_tokens,
                                decode_seqs=n - prefills, distinct=step.distinct,
                                extra={"predicted_s": round(price.total_ns() / NS, 9),
                                       "wall_s": round(res.wall_s, 9), "policy_s": round(fl.policy_s, 9),
                                       "wall_forward_s": round(wall.forward, 9), "wall_switch_s": round(wall.mode, 9),
                                       "wall_load_s": round(wall.load, 9), "wall_swap_s": round(wall.swap, 9),
                                       # the cost model's features as `price` charged them: a served
                                       # iteration is a fit point
                                       "decode_context": step.decode_context, "prefill_sq": step.prefill_sq,
                                       "rank_sum": lora.rank_sum, "token_rank": lora.token_rank,
                                       "resident_rank_sum": step.resident_rank_sum, "lora_passes": lora.passes})
        if self.check_memory:
            self._check(j)

    # --- requests that end early: a server's clients ------------------------------------------------
    def dispatch(self, r: Request, at: int) -> None:
        """Route an arrival (the real clock's: the router's time counts as policy time)."""
        t0 = time.perf_counter()
        self.cluster.dispatch(r, at)
        self.stats.policy_s += time.perf_counter() - t0
        if r.done:   # rejected
            self._ended(r)

    def cancel(self, r: Request, reason: str = "cancelled by the client") -> None:
        """End `r` and free its KV and slot: now if it waits in a queue, else once its running step is
        back or its migration has landed. One that has ended is left alone."""
        if r.done:
            return
        if self.cluster.cancel(r, reason):
            self._cancelled(r)
        else:
            self._cancels[r.id] = (r, reason)

    def _cancelled(self, r: Request) -> None:
        self._cancels.pop(r.id, None)
        if r.replica >= 0:   # whatever its worker holds of it (nothing, if it never ran)
            self._releases.append(self.workers.call(r.replica, "forget", r.id))
        self.tokens.drop(r.id)
        self._ended(r)

    def _retry_cancels(self) -> None:
        for r, reason in list(self._cancels.values()):
            if r.done:   # its last step finished it first
                del self._cancels[r.id]
            elif self.cluster.cancel(r, reason):
                self._cancelled(r)

    def _ended(self, r: Request) -> None:
        self.sampling.pop(r.id, None)
        self.stops.pop(r.id, None)
        self.listener.ended(r)

    def _drain(self, wait: bool = True) -> None:
        """Collect the calls sent without waiting (frees, landings): all of them, or (`wait=False`) those
        already done. A worker's failure in one surfaces here."""
        done = self._releases if wait else self.workers.ready(self._releases, 0)
        keys = {id(p) for p in done}
        for p in done:
            self.workers.get(p)
        self._releases = [p for p in self._releases if id(p) not in keys]

    def _check(self, j: int) -> None:
        self._drain()
        arriving = tuple(rid for rid, dst in self._arriving.items() if dst == j)
        self.workers.get(self.workers.call(j, "check", MemoryImage.of(self.replicas[j], arriving)))

    # --- migration: KV between workers -----------------------------------------------------------------
    def _send(self, r: Request, src: int, dst: int) -> Pending:
        """Export the request's KV at `src` and have `dst` receive it (worker to worker)."""
        self._arriving[r.id] = dst
        self._sources[r.id] = src
        exported = self.workers.call(src, "export", r.id)
        if self.lose_kv is not None and self.lose_kv(r):
            self.workers.lose(exported)
        return self.workers.chain(dst, "receive", r.id, exported)

    def _land(self, r: Request, dst: int, receipt: Pending, wall_s: float) -> None:
        """The transfer is over: the request arrives at `dst` with its KV, or without it if it failed."""
        src = self._sources.pop(r.id)
        try:
            nbytes, failure = self.workers.get(receipt), None
        except ReplicaError as e:
            if not e.transport:
                raise   # the work failed, not the transport: a bug to see, not to recompute around
            nbytes, failure = 0, str(e)
            try:   # whatever the source still holds of it
                self.workers.get(self.workers.call(src, "forget", r.id))
            except ReplicaError as gone:
                if not gone.transport:
                    raise
        self.transfers.count += 1
        self.transfers.bytes += nbytes
        self.transfers.wall_s += wall_s
        self.transfers.failed += failure is not None
        where = self.cluster.arrive(r, dst, failure)
        if failure is None:   # ordered before the target's next step: no need to wait for it
            self._releases.append(self.workers.call(dst, "land", r.id, _WHERE[where], r.kv_blocks))
        del self._arriving[r.id]
        if r.id in self._cancels:
            self._retry_cancels()

    # --- the stepped clocks: events in the simulator's order -------------------------------------------
    def _queue_changed(self, j: int) -> None:
        if self._idle[j] and not self._woken[j]:
            self._woken[j] = True
            if self.clock.stepped:
                self.timeline.after(0, NORMAL, lambda: self._wake(j))

    def _wake(self, j: int) -> None:
        self._idle[j] = self._woken[j] = False
        self._next(j)

    def _next(self, j: int) -> None:
        """Replica j's process: decide at this instant; run a step, or wait for its queue to change."""
        d = self._decide(j) if self.replicas[j].queue else None
        if d is None:
            self._idle[j] = True
            return
        fl = self._begin(j, d)
        fl.dur = self._duration(j, fl)
        self.timeline.after(fl.dur, NORMAL, lambda: self._step_end(j))

    def _stop(self) -> None:
        self._stopped = True

    def _step_end(self, j: int) -> None:
        self._complete(j)
        self._next(j)

    def _arrivals(self, it) -> None:
        for r in it:
            if r.arrival > self.timeline.now:
                self.timeline.after(r.arrival - self.timeline.now, URGENT, lambda r=r: self._arrive_then(r, it))
                return
            self.cluster.dispatch(r, self.timeline.now)

    def _arrive_then(self, r: Request, it) -> None:
        self.cluster.dispatch(r, self.timeline.now)
        self._arrivals(it)

    def _tick(self) -> None:
        plan = self.cluster.plan_migration()
        interval = to_ns(self.cluster.migrator.interval_s)
        if not plan.moves and plan.adapter_hosts is None:
            self.timeline.after(interval, URGENT, self._tick)
            return
        delay = to_ns(max(plan.solve_s, 0.0))

        def apply() -> None:
            self.cluster.apply_migration(plan, self._deliver_stepped)
            self.timeline.after(interval, URGENT, self._tick)
        if delay:
            self.timeline.after(delay, URGENT, apply)
        else:
            apply()

    def _deliver_stepped(self, r: Request, src: int, dst: int, delay_ns: int) -> None:
        """Move the KV now (the source holds it at this instant); it lands after the transfer's price
        (virtual) or its measured wall time (measured), as the simulator's delivery process does."""
        t0 = time.perf_counter()
        receipt = self._send(r, src, dst)
        try:
            self.workers.get(receipt)
        except ReplicaError:
            pass   # reported when it lands
        wall = time.perf_counter() - t0
        delay = delay_ns
        if not self.clock.virtual:   # measured: its own time, after the link's earlier transfers (as priced ones queue)
            now, key = self.timeline.now, (src, dst)
            end = max(now, self._link_free.get(key, now)) + to_ns(wall)
            self._link_free[key] = end
            delay = end - now
        land = lambda: self._land(r, dst, receipt, wall)   # noqa: E731

        def init() -> None:
            if delay > 0:
                self.timeline.after(delay, URGENT, land)
            else:
                land()
        self.timeline.after(0, URGENT, init)

    def _run_stepped(self) -> None:
        cluster, tl = self.cluster, self.timeline
        for j in range(len(self.replicas)):
            self._idle[j] = True    # each replica process starts idle at 0 (no request has arrived)
        it = iter(cluster.incoming())
        tl.after(0, URGENT, lambda: self._arrivals(it))
        if cluster.migrator is not None:
            interval = to_ns(cluster.migrator.interval_s)
            tl.after(0, URGENT, lambda: tl.after(interval, URGENT, self._tick))
        # the run ends as SimPy's does: at an event scheduled when the last request finishes, so events
        # already due at that instant (a migration tick) still run
        cluster.on_all_done = lambda: tl.after(0, NORMAL, self._stop)
        tl.run(lambda: self._stopped, self.clock.wait_until)

    # --- the real clock -------------------------------------------------------------------------------
    def _deliver_real(self, r: Request, src: int, dst: int, delay_ns: int) -> None:
        self._moving.append(_Transfer(r, dst, self._send(r, src, dst), time.perf_counter()))

    def _run_real(self, source: Arrivals) -> None:
        cluster, clock, workers = self.cluster, self.clock, self.workers
        interval = to_ns(cluster.migrator.interval_s) if cluster.migrator is not None else 0
        tick: int | None = interval or None
        quiet = False   # the last migration round moved nothing and nothing finished or landed since the one before
        busy = False    # something finished or landed since the last round
        while cluster.remaining or not source.closed:
            now = clock.now()
            source.pump(now)
            if tick is not None and now >= tick:
                # applied once solved: the solve's own wall time has passed, nothing more is charged
                plan = cluster.plan_migration(charged=False)
                moved = bool(cluster.apply_migration(plan, self._deliver_real).get("moved"))
                quiet, busy, tick = not moved and not busy, False, now + interval
            for j, state in enumerate(self.replicas):
                # as the simulator's replica process: decide again only after a step or a queue change
                if j not in self._flight and state.queue and not (self._idle[j] and not self._woken[j]):
                    self._idle[j] = self._woken[j] = False
                    d = self._decide(j)
                    if d is None:
                        self._idle[j] = True
                    else:
                        self._begin(j, d)
            pending = [fl.pending for fl in self._flight.values()] + [t.receipt for t in self._moving]
            if not pending and source.closed and (tick is None or quiet):
                break   # nothing runs, arrives or moves any more: stalled, reported by `result`
            upcoming = [t for t in (source.next_at(), tick) if t is not None]
            wait_s = max(min(upcoming) - clock.now(), 0) / NS if upcoming else 3600.0
            if not pending:
                source.wait(wait_s)
            ready = {id(p) for p in workers.ready(pending, min(wait_s, source.poll_s))} if pending else set()
            for j in [j for j, fl in self._flight.items() if id(fl.pending) in ready]:
                self._complete(j)
                busy = True
            for t in [t for t in self._moving if id(t.receipt) in ready]:
                self._moving.remove(t)
                self._land(t.request, t.dst, t.receipt, time.perf_counter() - t.t0)
                busy = True

    # --- the run --------------------------------------------------------------------------------------
    def run(self, source: Callable[["Engine"], Arrivals] = TraceArrivals) -> SimResult:
        """Serve until every request is done; on the real clock, requests come from `source(engine)`
        (the workload's, by default; a server's inbox)."""
        wall0 = time.perf_counter()
        cluster, workers = self.cluster, self.workers
        preload = cluster.place()
        for p in [workers.call(j, "preload", preload.get(j, [])) for j in range(len(self.replicas))]:
            workers.get(p)
        self.clock.start()
        desc = f"serving {len(self.replicas)} replica(s) ({self.clock.kind} clock)"
        with cluster.progress(self._progress, desc) as bar:
            cluster.bar = bar
            if self.clock.stepped:
                self._run_stepped()
            else:
                self._run_real(source(self))
            cluster.bar = None
        end = self.clock.now()
        if not cluster.remaining:   # every request done: no KV, slot or received transfer left anywhere
            for j in range(len(self.replicas)):
                self._check(j)
        return cluster.result(end, wall0, self._summary_extra())

    def close(self) -> None:
        self.workers.close()

    def _summary_extra(self) -> dict:
        s = self.stats
        extra = {"runtime_policy_s": round(s.policy_s, 6), "runtime_executor_s": round(s.executor_s, 6), **s.extra}
        if self.cluster.migrator is not None:
            extra.update(self.transfers.summary())
        if self.clock.kind == "measured":
            scaling = [self.workers.get(self.workers.call(j, "drift_summary")) for j in range(len(self.replicas))]
            extra["clock_scaling"] = scaling[0] if len(scaling) == 1 else _combined(scaling)
        if self.migrator is not None and self.cluster.migrator is None:
            extra["migration"] = "not run: one replica"
        return extra
