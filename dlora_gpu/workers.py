"""Replica workers: each owns one replica's device side (model, adapters, paged KV cache, executor).

The driver (`dlora_gpu.engine`) calls a worker's methods through a backend, and the two backends
differ only in transport:
- `LocalWorkers`: every worker in the driver's process, each call run at once (tests, debugging,
  one replica);
- `RayWorkers`: one Ray actor per replica (the dLoRA artifact's and vLLM's choice), calls answered
  when the actor gets to them, in the order they were made; a migrating request's KV goes from one
  actor to another through Ray's object store without passing through the driver.
A worker's exception reaches the driver as one `ReplicaError` naming the replica.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from dlora_gpu.drift import DriftScale, calibrated_probe, machine_factor
from dlora_gpu.executor import WORKERS, ModelExecutor
from dlora_gpu.orders import MemoryImage, StepOrder, StepResult
from dlora_sim.core.errors import UserError
from dlora_sim.ray_join import unreachable

log = logging.getLogger("dlora_gpu")

# Ray's errors that mean the transport failed (an object or the actor holding it is gone), not the work
TRANSPORT_ERRORS = ("ObjectLostError", "ObjectFetchTimedOutError", "OwnerDiedError", "ObjectReconstructionFailedError",
                    "RayActorError", "ActorDiedError", "ActorUnavailableError", "TransferLost")


class ReplicaError(UserError):
    """A replica's worker failed (its exception, or the actor died); the message names the replica.
    `transport`: the failure was the transport's (a lost object, a dead actor), not the work's."""

    def __init__(self, message: str, transport: bool = False):
        super().__init__(message)
        self.transport = transport


class TransferLost(RuntimeError):
    """A KV payload lost on its way (injected by `lose`: as an object store can lose an object)."""


class Worker:
    """One replica's device: builds its executor from an `ExecutorSpec` and runs what the driver orders."""

    def __init__(self, spec):
        self.spec = spec
        self.ex = ModelExecutor(spec)
        self._incoming: dict[int, Any] = {}   # migrated KV received, not yet installed
        self.drift, self.drift_why = None, ""
        if spec.runtime.clock == "measured":
            probe, why = calibrated_probe(self.ex.model, spec.profile, self.ex.backend)
            if probe is None:
                self.drift_why = why
            else:
                self.drift = DriftScale(spec.profile.provenance.reference_probe_s, probe)

    def about(self) -> dict:
        ex = self.ex
        return {"device": ex.device_name, "runtime": ex.describe(), "vocab": ex.vocab, "backend": ex.backend}

    def preload(self, adapters: Sequence[int]) -> None:
        self.ex.preload(adapters)

    def run(self, order: StepOrder) -> StepResult:
        """Run one step; on the measured clock the drift factor is probed first, untimed."""
        k = self.drift.factor() if self.drift is not None else 1.0
        t0 = time.perf_counter()
        phases, tokens = self.ex.run(order)
        wall = time.perf_counter() - t0
        return StepResult(tuple(getattr(phases, f) for f in phases.__dataclass_fields__), wall, tuple(tokens), k)

    def release(self, requests: Sequence[int]) -> None:
        self.ex.release(requests)

    def add_adapter(self, adapter: int, path: str) -> int:
        """Load a PEFT folder as a new adapter (validated first); its rank."""
        return self.ex.add_adapter(adapter, path)

    def remove_adapter(self, adapter: int) -> None:
        self.ex.remove_adapter(adapter)

    def export(self, request: int):
        """A migrating request's KV (a host copy; its blocks here are freed)."""
        return self.ex.export(request)

    def forget(self, request: int) -> None:
        """A request left this replica without its KV (it is recomputed elsewhere): free what it held."""
        self.ex.forget(request)

    def receive(self, request: int, payload) -> int:
        """Hold an arriving request's KV until the driver says where it lands; its bytes."""
        self._incoming[request] = payload
        return payload.nbytes

    def land(self, request: int, where: str, blocks: int) -> None:
        """Install the held KV in `blocks` blocks on the device (`resident`) or in host swap
        (`swapped`), or drop it (`recompute`: the request is re-prefilled from its tokens)."""
        payload = self._incoming.pop(request, None)
        if where != "recompute":
            if payload is None:
                raise RuntimeError(f"request {request}: no KV received to install")
            self.ex.install(request, payload, swapped=where == "swapped", blocks=blocks)

    def check(self, memory: MemoryImage) -> None:
        self.ex.check(memory)
        stray = sorted(set(self._incoming) - set(memory.arriving))
        if stray:
            raise AssertionError(f"replica {memory.replica}: KV received but never landed: {stray}")

    def drift_summary(self) -> dict:
        return self.drift.summary() if self.drift is not None else {"scaled": False, "why": self.drift_why}

    def machine_factor(self) -> tuple[float | None, str]:
        return machine_factor(self.ex.model, self.spec.profile, self.ex.backend)

    def block_bytes(self) -> int:
        """Bytes of one KV block, K and V of every layer (for measuring transfers)."""
        kv = self.ex.kv
        return 2 * kv.k[:, 0].numel() * kv.k.element_size()

    def fill(self, request: int, blocks: int) -> None:
        """Give a scratch sequence `blocks` device blocks of random KV (to measure a transfer)."""
        import torch
        table = self.ex.kv.grow(request, blocks)
        idx = torch.tensor(table, dtype=torch.long, device=self.ex.kv.device)
        for t in (self.ex.kv.k, self.ex.kv.v):
            t.index_copy_(1, idx, torch.randn_like(t.index_select(1, idx)))

    def digest(self, request: int) -> list[float]:
        """Per-layer sums of a sequence's K and V, in float64 (tests compare contents across workers)."""
        p = self.ex.kv.export(request)
        return [float(x) for x in (*p.k.double().sum(dim=tuple(range(1, p.k.dim()))),
                                   *p.v.double().sum(dim=tuple(range(1, p.v.dim()))))]


@dataclass
class Pending:
    """A call in flight: `ref` is Ray's object ref, or the local result (or exception) at once."""

    replica: int
    method: str
    ref: Any = None
    error: BaseException | None = None
    meta: dict = field(default_factory=dict)


class LocalWorkers:
    """Every worker in this process; a call runs when it is made."""

    kind = "local"

    def __init__(self, specs: Sequence):
        self.workers = []
        for spec in specs:
            try:
                self.workers.append(Worker(spec))
            except ValueError:
                raise
            except Exception as e:
                raise ReplicaError(f"replica {spec.replica}: its worker failed to start: "
                                   f"{type(e).__name__}: {e}") from e

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, j: int, method: str, *args) -> Pending:
        p = Pending(j, method)
        try:
            p.ref = getattr(self.workers[j], method)(*args)
        except Exception as e:
            p.error = e
        p.meta["done_ns"] = time.perf_counter_ns()   # calls run one after another here: when this one ended
        return p

    def chain(self, j: int, method: str, request: int, upstream: Pending) -> Pending:
        """Call `method(request, upstream's result)` on worker j, or fail as the upstream call did."""
        if upstream.error is not None:
            return Pending(upstream.replica, upstream.method, error=upstream.error)
        return self.call(j, method, request, upstream.ref)

    def lose(self, p: Pending) -> None:
        """Fault injection: the result of `p` is lost (as an object store can lose an object)."""
        p.ref, p.error = None, TransferLost("the KV object was lost on its way (injected fault)")

    def get(self, p: Pending):
        if p.error is not None:
            raise _replica_error(p, p.error) from p.error
        return p.ref

    def ready(self, pending: Sequence[Pending], timeout_s: float) -> list[Pending]:
        if not pending and timeout_s > 0:
            time.sleep(timeout_s)
        return list(pending)

    def close(self) -> None:
        self.workers.clear()


class RayWorkers:
    """One Ray actor per replica. `address` None starts a local Ray cluster (or joins the one this
    process already started); "auto" or an address joins an existing one. On a GPU each actor takes
    `num_gpus` (one replica per GPU by default, 0.5 to share one); `num_cpus` (default none held) only
    if the actors should reserve CPUs from the cluster's scheduler."""

    kind = "ray"

    def __init__(self, specs: Sequence, address: str | None = None, num_gpus: float | None = None,
                 num_cpus: float | None = None, start_timeout_s: float = 300.0):
        import ray

        if not ray.is_initialized():
            def nobody(why: str) -> ValueError:
                return ValueError(f"runtime.ray.address={address}: no Ray cluster to join there ({why}); "
                                  "null starts a local one")
            why = unreachable(address)
            if why is not None:
                raise nobody(why)
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise nobody(str(e).splitlines()[0]) from None
        self.ray = ray
        # GPUs per replica's actor: one replica per GPU on CUDA unless num_gpus says, none on a CPU
        gpus = num_gpus if num_gpus is not None else float(specs[0].runtime.device.startswith("cuda"))
        want = gpus * len(specs)
        have = ray.cluster_resources().get("GPU", 0.0)
        if want > have:
            raise ValueError(f"runtime.ray.num_gpus: {len(specs)} replica(s) ask for {want:g} GPU(s) in all, the Ray "
                             f"cluster has {have:g}")
        # CPUs: Ray's actor default holds none while running, so actors never starve the cluster's tasks (a
        # sweep's jobs); they are spread over its nodes. GPUs: one replica per GPU unless num_gpus says.
        actor = ray.remote(Worker)
        self.actors = []
        for spec in specs:
            self.actors.append(actor.options(num_gpus=gpus, num_cpus=num_cpus or 0, scheduling_strategy="SPREAD")
                               .remote(spec))
        # building the models: a failure names its replica here, not at the first step
        try:
            for j, a in enumerate(self.actors):
                p = Pending(j, "start", a.about.remote())
                done, _ = ray.wait([p.ref], timeout=start_timeout_s)
                if not done:
                    raise ReplicaError(f"replica {j}: its Ray actor did not start in {start_timeout_s:.0f} s: the "
                                       f"cluster has {ray.available_resources()} free, each replica asks for "
                                       f"{num_cpus or 0} CPU and {gpus} GPU "
                                       "(runtime.ray.num_cpus, runtime.ray.num_gpus)")
                self.get(p)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, j: int, method: str, *args) -> Pending:
        return Pending(j, method, getattr(self.actors[j], method).remote(*args))

    def chain(self, j: int, method: str, request: int, upstream: Pending) -> Pending:
        """Call `method(request, upstream's result)` on worker j: the object goes actor to actor."""
        return self.call(j, method, request, upstream.ref)

    def lose(self, p: Pending) -> None:
        """Fault injection: `p`'s object is replaced by one whose fetch fails, so the worker that needs
        it fails through Ray as it would on a lost object (Ray has no public call to drop one)."""
        p.ref = self.ray.remote(_lost_object).options(num_cpus=0, max_retries=0).remote()

    def get(self, p: Pending):
        from ray import exceptions as rex
        try:
            return self.ray.get(p.ref)
        except rex.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, ValueError) and p.method == "start":
                raise ValueError(str(cause)) from None   # a config the runtime refuses: one clear line
            raise _replica_error(p, cause) from None
        except rex.RayError as e:
            raise _replica_error(p, e) from None

    def ready(self, pending: Sequence[Pending], timeout_s: float) -> list[Pending]:
        if not pending:
            if timeout_s > 0:
                time.sleep(timeout_s)
            return []
        refs = {id(p.ref): p for p in pending}
        done, _ = self.ray.wait([p.ref for p in pending], num_returns=1, timeout=max(timeout_s, 0.0))
        more, _ = self.ray.wait([p.ref for p in pending], num_returns=len(pending), timeout=0)
        hit = {id(r) for r in (*done, *more)}
        return [p for key, p in refs.items() if key in hit]

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors.clear()


def _lost_object() -> None:
    raise TransferLost("the KV object was lost on its way (injected fault)")


def _replica_error(p: Pending, e: BaseException) -> ReplicaError:
    name = type(e).__name__
    what = "its worker died" if name in ("RayActorError", "ActorDiedError") else name
    transport = name in TRANSPORT_ERRORS or "TransferLost" in str(e)
    return ReplicaError(f"replica {p.replica}: {p.method} failed: {what}: {e}", transport=transport)


def make_workers(kind: str, specs: Sequence, address: str | None = None, num_gpus: float | None = None,
                 num_cpus: float | None = None):
    """The backend `runtime.workers` names; `auto` is Ray for several replicas when Ray is installed."""
    import importlib.util
    if kind not in WORKERS:
        raise ValueError(f"runtime.workers must be one of {list(WORKERS)}, got {kind!r}")
    has_ray = importlib.util.find_spec("ray") is not None
    if kind == "auto":
        kind = "ray" if len(specs) > 1 and has_ray else "local"
        if len(specs) > 1 and not has_ray:
            log.warning("runtime.workers=auto: Ray is not installed, so the %d replicas run in this process, one "
                        "step at a time (make install-cluster for one Ray actor each)", len(specs))
    if kind == "ray":
        if not has_ray:
            raise ValueError("runtime.workers=ray: Ray is not installed here (pip install 'dlora[cluster]', "
                             "docs/runtime.md)")
        return RayWorkers(specs, address, num_gpus, num_cpus)
    return LocalWorkers(specs)
