"""The serving loop: one replica's iterations on a device, over the serving core's `Cluster`.

The cluster front end (requests, dispatch, placement, the end of the run) and the replica state are
the simulator's own (`dlora_sim.core`); this loop adds only a device and a clock. It asks the same
policy objects as the simulator, applies each decision through `ReplicaState.begin` and has an
executor run it on real kernels. Three clocks:
- `real`: wall time. Requests arrive when the wall clock passes their trace time, are admitted
  between iterations, and every timestamp is what a user would measure.
- `measured`: the clock advances by each step's measured wall time (its bookkeeping and the
  executor's run) and waits jump to the next arrival, so idle time, the policy's own time and the
  host's scheduling gaps do not count. On a CPU, with a profile that records the reference probe of
  its calibration (`provenance.reference_probe_s`), every step is also scaled to that reference's
  machine speed (`dlora_gpu.drift`): what is left between it and the simulator is the cost model's
  error and the per-iteration noise, not the machine's drift since the profile was measured.
- `virtual`: the clock advances by the cost model's price of each step while the real kernels run,
  and waits jump to the next arrival. Arrivals at or before an instant are queued before the policy
  decides at it, as the simulator's URGENT arrivals are, so requests.csv is byte-identical to
  `dlora-sim` with the same config: the runtime applies decisions exactly as the simulator does, and
  any error left on the real clock is the cost model's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence


from dlora_gpu.drift import DriftScale, calibrated_probe
from dlora_gpu.executor import CLOCKS, PhaseTimes
from dlora_sim.core.cluster import Cluster
from dlora_sim.core.config import Parts
from dlora_sim.core.contracts import PolicyError
from dlora_sim.core.replica_state import ReplicaState
from dlora_sim.core.request import NS, Request, to_ns
from dlora_sim.core.results import SimResult
from dlora_sim.core.step import LoraFeatures, Step


class Executor(Protocol):
    """Runs a step on a device: memory operations, then the forward pass; measures each phase."""

    def preload(self, adapters: Sequence[int]) -> None: ...
    def run(self, step: Step) -> PhaseTimes: ...
    def release(self, requests: Sequence[Request]) -> None: ...


class Clock:
    """Nanoseconds since the start of serving: wall time (`real`), cost-model time (`virtual`) or the
    sum of the steps' measured times (`measured`)."""

    def __init__(self, kind: str):
        if kind not in CLOCKS:
            raise ValueError(f"runtime.clock must be one of {list(CLOCKS)}, got {kind!r}")
        self.kind = kind
        self.virtual = kind == "virtual"
        self.stepped = kind != "real"   # time moves only by advance / wait_until
        self.start()

    def start(self) -> None:
        """Time 0 is now: serving starts (the model is built, warmed up and its adapters preloaded, as
        the simulator's replicas are at time 0), not when the clock was made."""
        self._t = 0
        self._t0 = time.perf_counter_ns()

    def now(self) -> int:
        return self._t if self.stepped else time.perf_counter_ns() - self._t0

    def advance(self, ns: int) -> None:
        """A step priced or measured at `ns` ran (wall time moved by itself)."""
        if self.stepped:
            self._t += ns

    def wait_until(self, t: int) -> None:
        if self.stepped:
            self._t = max(self._t, t)
        else:
            delay = (t - self.now()) / NS
            if delay > 0:
                time.sleep(delay)


@dataclass
class ServingStats:
    policy_s: float = 0.0     # wall time spent in the local scheduler and the router
    executor_s: float = 0.0   # wall time spent running steps
    iterations: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    """Serves a workload on one replica; the same `Parts` as a simulation. A migration policy has
    nothing to move with one replica and is not run (summary.json says so)."""

    def __init__(self, parts: Parts, make_executor: Callable[[ReplicaState], Executor], clock: Clock, *,
                 progress: bool = False, keep_iterations: bool = True):
        self._refuse(parts)
        # one replica: a migrator has nothing to move and is not run (summary.json says so)
        self.cluster = Cluster(parts.workload, parts.profile, parts.cluster, parts.scheduler_factory, parts.router,
                               None, clock.now, keep_iterations=keep_iterations)
        self.migrator, self.clock, self.profile = parts.migrator, clock, parts.profile
        self.recorder = self.cluster.recorder
        self.replica, self.scheduler = self.cluster.replicas[0], self.cluster.schedulers[0]
        self.executor = make_executor(self.replica)
        self.stats = ServingStats()
        self._progress = progress
        self._drift, self._drift_why = self._drift_scale(clock, parts.profile)

    @property
    def requests(self) -> list[Request]:
        return self.cluster.requests

    def _drift_scale(self, clock: Clock, profile) -> tuple[DriftScale | None, str]:
        """The measured clock's drift scaling on a CPU (see the module doc), or None and why not."""
        if clock.kind != "measured":
            return None, ""
        model = getattr(self.executor, "model", None)
        if model is None:
            return None, "the executor has no model to probe"
        probe, why = calibrated_probe(model, profile, getattr(self.executor, "backend", "torch"))
        return (None, why) if probe is None else (DriftScale(profile.provenance.reference_probe_s, probe), "")

    @staticmethod
    def _refuse(parts: Parts) -> None:
        """What one runtime process cannot serve yet, named by its config key."""
        if parts.cluster.num_replicas != 1:
            raise ValueError(f"cluster.num_replicas={parts.cluster.num_replicas}: dlora-serve runs one replica per "
                             "process (docs/runtime.md); use cluster.num_replicas=1")
        if parts.cluster.replica.weights != "lora":
            raise ValueError("cluster.replica.weights=full_copy: the runtime keeps one base model with LoRA slots "
                             "(vLLM-replicated whole-model copies are simulator-only)")

    def _dispatch(self, r: Request) -> None:
        # virtual, measured: dispatched at its arrival, as in the simulator; real: when the loop admitted it
        self.cluster.dispatch(r, r.arrival if self.clock.stepped else max(self.clock.now(), r.arrival))

    # --- the loop --------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        cluster = self.cluster
        self.executor.preload(cluster.place().get(0, []))
        clock, state, reqs = self.clock, self.replica, self.requests
        clock.start()
        n, i = len(reqs), 0
        with cluster.progress(self._progress, f"serving ({clock.kind} clock)") as bar:
            cluster.bar = bar
            while cluster.remaining:
                now = clock.now()
                while i < n and reqs[i].arrival <= now:
                    t0 = time.perf_counter()
                    self._dispatch(reqs[i])
                    self.stats.policy_s += time.perf_counter() - t0
                    i += 1
                if not state.queue:
                    if i >= n:
                        break
                    clock.wait_until(reqs[i].arrival)
                    continue
                t0 = time.perf_counter()
                d = self.scheduler.schedule(state)
                policy_s = time.perf_counter() - t0
                self.stats.policy_s += policy_s
                if not d.batch:
                    if d.load or d.evict or d.swap_out or d.recompute:
                        raise PolicyError("replica 0: a decision with an empty batch must not change memory")
                    if i >= n:
                        break   # stalled: reported below
                    clock.wait_until(reqs[i].arrival)
                    continue
                self._iterate(d, policy_s)
            cluster.bar = None
        return cluster.result(clock.now(), wall0, self._summary_extra())

    def _iterate(self, d, policy_s: float) -> None:
        clock, state = self.clock, self.replica
        k = self._drift.factor() if self._drift is not None else 1.0   # probed before the step, untimed
        start = clock.now()
        t_begin = time.perf_counter()
        step = state.begin(d)
        t0 = time.perf_counter()
        times = self.executor.run(step)
        wall = time.perf_counter() - t0
        self.stats.executor_s += wall
        self.stats.iterations += 1
        price = state.cost.price(step)   # the simulator's price of this step, recorded on every clock
        if clock.virtual:
            dur = price.total_ns()
            clock.advance(dur)
            compute, overhead = price.compute, price.overhead
        else:
            if clock.stepped:   # measured: the step's own wall time (bookkeeping and run), scaled by k
                dur = max(to_ns((t0 - t_begin + wall) * k), 1)
                clock.advance(dur)
            else:
                dur = max(clock.now() - start, 1)
            phases = times.scaled(k)   # the wall_* columns below stay unscaled
            compute, overhead = phases.forward, (phases.mode, phases.load, phases.swap)
        end = start + dur
        prefill_tokens, prefills = state.complete(step, end, dur)
        self.executor.release(state.end_run(step.batch, end))
        n, lora = len(step.batch), LoraFeatures.of(step)
        self.recorder.iteration(0, start, dur, compute, overhead, d, batch_size=n, prefill_tokens=prefill_tokens,
                                decode_seqs=n - prefills, distinct=step.distinct,
                                extra={"predicted_s": round(price.total_ns() / NS, 9),
                                       "wall_s": round(wall, 9), "policy_s": round(policy_s, 9),
                                       "wall_forward_s": round(times.forward, 9), "wall_switch_s": round(times.mode, 9),
                                       "wall_load_s": round(times.load, 9), "wall_swap_s": round(times.swap, 9),
                                       # the cost model's features as `price` charged them: a served
                                       # iteration is a fit point
                                       "decode_context": step.decode_context, "prefill_sq": step.prefill_sq,
                                       "rank_sum": lora.rank_sum, "token_rank": lora.token_rank,
                                       "resident_rank_sum": step.resident_rank_sum, "lora_passes": lora.passes})

    def _summary_extra(self) -> dict:
        s = self.stats
        extra = {"runtime_policy_s": round(s.policy_s, 6), "runtime_executor_s": round(s.executor_s, 6), **s.extra}
        if self.clock.kind == "measured":
            extra["clock_scaling"] = self._drift.summary() if self._drift is not None else {
                "scaled": False, "why": self._drift_why}
        if self.migrator is not None:
            extra["migration"] = "not run: one replica"
        return extra
