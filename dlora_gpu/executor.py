"""One step of the shared replica state -> real work on a device: memory operations, then one forward.

`ModelExecutor.run(order)` follows the order `ReplicaState.begin` applied the decision in: recompute
(free KV), swap-out (KV to host), evict, load (adapter slots), the mode change (merge / unmerge /
switch), swap-in, KV growth, then the forward over the flat mixed batch and a greedy token for every
request (output lengths are forced, EOS is ignored, as in the paper's runs). The order carries ids and
token ids only (`dlora_gpu.orders`): the tokens are the driver's, so a request can leave this replica
with its KV (`export`, `install`) or without it and continue elsewhere. Each phase is timed:
CUDA events on a GPU, perf_counter_ns on a CPU. The executor mirrors the state's memory exactly:
every request owns as many KV blocks (on the device or in host swap) as the state says, and the
adapter slots hold the state's resident adapters (`check`).
"""
from __future__ import annotations


import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from dlora_gpu.adapters import AdapterFormatError, AdapterPool, load_peft_adapter
from dlora_gpu.batch import FlatBatch, LoRABatch
from dlora_gpu.kv_cache import KVPayload, PagedKVCache
from dlora_gpu.merge import DriftFreeMerger, InPlaceMerger
from dlora_gpu.model import Llama, LlamaConfig
from dlora_gpu.sampling import next_tokens
from dlora_gpu.weights import load_checkpoint, random_weights
from dlora_sim.core.config import Parts
from dlora_sim.core.profile import Profile
from dlora_sim.core.replica_state import ReplicaState
from dlora_gpu.orders import MemoryImage, StepOrder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("torch", "triton", "auto")
CLOCKS = ("real", "virtual", "measured")   # how the serving clock moves (dlora_gpu.engine)
WORKERS = ("auto", "local", "ray")         # where the replicas' workers run (dlora_gpu.workers)


@dataclass(frozen=True)
class RayConfig:
    """`runtime.ray`: where the replicas' actors run when `runtime.workers` is ray."""

    address: str | None = None        # None: start a local Ray cluster; "auto" or host:port: join one
    num_gpus: float | None = None     # GPUs per replica's actor (None: 1 on CUDA, 0 on a CPU; 0.5 shares one)
    num_cpus: float | None = None     # CPUs each actor reserves from Ray (None: none, Ray's actor default)

    def __post_init__(self) -> None:
        for key in ("num_gpus", "num_cpus"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"runtime.ray.{key} must be a number >= 0 (or null), got {v!r}")


@dataclass(frozen=True)
class RuntimeConfig:
    """The `runtime` config group: where and how the model runs."""

    device: str = "cpu"
    dtype: str = "float32"
    checkpoint: str | None = None     # Hugging Face checkpoint folder; None = random weights of the model preset
    adapters_dir: str | None = None   # one PEFT adapter folder per workload adapter (adapter-<id>); None = random
    seed: int = 0
    backend: str = "torch"            # LoRA and decode attention: torch | triton | auto
    clock: str = "real"               # real | virtual | measured (dlora_gpu.engine)
    threads: int = 1
    warmup: int = 2
    workers: str = "auto"             # local (in this process) | ray (an actor per replica) | auto (ray for N > 1)
    ray: RayConfig = RayConfig()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"runtime.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"runtime.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"runtime.clock must be one of {list(CLOCKS)}, got {self.clock!r}")
        if self.workers not in WORKERS:
            raise ValueError(f"runtime.workers must be one of {list(WORKERS)}, got {self.workers!r}")
        if self.threads < 1 or self.warmup < 0:
            raise ValueError(f"runtime.threads must be >= 1 and runtime.warmup >= 0, got {self.threads}, {self.warmup}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"runtime.device={self.device}: no CUDA device here (use runtime=cpu_tiny)")
        for key in ("checkpoint", "adapters_dir"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_dir():
                raise ValueError(f"runtime.{key}: {path} is not a folder")


@dataclass(frozen=True)
class PhaseTimes:
    """Measured seconds of one iteration's phases, in the order the executor runs them."""

    recompute: float = 0.0
    swap_out: float = 0.0
    evict: float = 0.0
    load: float = 0.0
    mode: float = 0.0
    swap_in: float = 0.0
    forward: float = 0.0

    @property
    def swap(self) -> float:
        return self.swap_out + self.swap_in

    @property
    def total(self) -> float:
        return self.recompute + self.swap_out + self.evict + self.load + self.mode + self.swap_in + self.forward

    def scaled(self, k: float) -> "PhaseTimes":
        """Every phase multiplied by `k` (a CPU drift factor, `dlora_gpu.drift`)."""
        return self if k == 1.0 else replace(self, **{f.name: getattr(self, f.name) * k for f in fields(self)})


def runtime_config(node) -> RuntimeConfig:
    from omegaconf import OmegaConf

    from dlora_sim.core.config import ConfigError, dataclass_from
    if node is None:
        raise ConfigError("runtime: missing (choose runtime=cpu_tiny or runtime=h200_7b)")
    raw = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
    ray = dataclass_from(RayConfig, raw.pop("ray", None) or {}, "runtime.ray")
    return replace(dataclass_from(RuntimeConfig, raw, "runtime"), ray=ray)


class _PhaseTimer:
    """Wall time of consecutive phases: CUDA events on a GPU (one sync at the end), else perf_counter_ns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter_ns())

    def seconds(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) / 1e9 for a, b in zip(self.marks, self.marks[1:])]


@dataclass(frozen=True)
class ExecutorSpec:
    """What a replica's worker needs to build its executor: the runtime config, the model the profile
    prices, the workload's adapters and the replica's memory sizes. Small and picklable (a Ray actor
    gets this, never the workload or the state)."""

    runtime: RuntimeConfig
    replica: int
    profile: Profile                       # prices the model that runs; random weights take its preset
    ranks: tuple[tuple[int, int], ...]     # (adapter id, rank) of every workload adapter
    merge: str
    total_blocks: int
    block_size: int
    host_blocks: int
    adapter_slots: int
    chunked_prefill: bool

    def refuse(self) -> None:
        """What no worker can serve, named by its config key: checked by the driver before any worker
        starts (a Ray actor's failure to start is a crash report, not a line), and by the executor."""
        if self.chunked_prefill:
            raise ValueError("cluster.replica.chunked_prefill is on (auto turns it on when a prompt exceeds "
                             "max_num_batched_tokens): the runtime prefills whole prompts only (its prefill "
                             "attention does not read earlier chunks' KV yet); set it to false to reject such "
                             "prompts instead; the simulator models chunking")
        if self.merge == "pristine_host":
            raise ValueError("cluster.replica.merge=pristine_host: the runtime keeps its pristine copy on the GPU "
                             "(pristine_gpu) or merges in place (inplace)")

    @classmethod
    def of(cls, rcfg: RuntimeConfig, state: ReplicaState, parts: Parts) -> "ExecutorSpec":
        return cls(rcfg, state.id, parts.profile, tuple((a.id, a.rank) for a in parts.workload.adapters),
                   parts.cluster.replica.merge,
                   state.total_blocks, state.block_size, state.host_total_blocks, state.adapter_slots,
                   state.chunked_prefill)


class ModelExecutor:
    """The model, its paged KV cache, the adapter pool and the merger of one replica."""

    def __init__(self, spec: ExecutorSpec):
        spec.refuse()
        rcfg = spec.runtime
        torch.set_num_threads(rcfg.threads)
        self.rcfg, self.spec = rcfg, spec
        self.device = torch.device(rcfg.device)
        self.dtype = DTYPES[rcfg.dtype]
        self.backend = rcfg.backend
        self.model = self._model(spec)
        cfg = self.model.cfg
        self._check_shape(cfg, spec)
        self.vocab = cfg.vocab_size
        ids = {str(a): rank for a, rank in spec.ranks}
        if rcfg.adapters_dir is None:
            self.pool = AdapterPool.random(cfg, ids, rcfg.seed, spec.adapter_slots, dtype=self.dtype,
                                           device=self.device)
        else:
            dirs = {aid: Path(rcfg.adapters_dir) / f"adapter-{aid}" for aid in ids}
            missing = [str(p) for p in dirs.values() if not p.is_dir()]
            if missing:
                raise ValueError(f"runtime.adapters_dir: no adapter folder {missing[0]} (one per workload adapter, "
                                 f"named adapter-<id>)")
            self.pool = AdapterPool.from_dirs(cfg, dirs, spec.adapter_slots, dtype=self.dtype, device=self.device)
            for aid, rank in ids.items():
                if self.pool.host[aid].rank != rank:
                    raise ValueError(f"{dirs[aid]}: rank {self.pool.host[aid].rank} but the workload says adapter "
                                     f"{aid} has rank {rank}")
        self.kv = PagedKVCache(spec.total_blocks, spec.block_size, cfg, self.dtype, self.device,
                               host_blocks=spec.host_blocks)
        targets = self.model.merge_targets()
        self.merger = DriftFreeMerger(targets) if spec.merge == "pristine_gpu" else InPlaceMerger(targets)
        self.merge_strategy = spec.merge
        self._slots: dict[int, int] = {}                 # workload adapter -> pool slot
        self.device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else f"CPU ({torch.get_num_threads()} torch thread(s))")

    def _model(self, spec: ExecutorSpec) -> Llama:
        if spec.runtime.checkpoint is not None:
            return load_checkpoint(spec.runtime.checkpoint, dtype=self.dtype, device=self.device)
        name = spec.profile.model.name
        try:
            cfg = LlamaConfig.preset(name)
        except (KeyError, ValueError):
            raise ValueError(f"model.name={name}: no model preset of that name for random weights "
                             f"(use tiny or llama-2-7b, or set runtime.checkpoint)") from None
        return random_weights(cfg, spec.runtime.seed, self.dtype, self.device)

    @staticmethod
    def _check_shape(cfg: LlamaConfig, spec: ExecutorSpec) -> None:
        """The profile prices the model that runs: same layers, widths, heads and vocabulary."""
        prof = spec.profile
        ours, theirs = cfg.architecture, prof.model.architecture
        if ours != theirs:
            raise ValueError(f"profile {prof.path or prof.name} describes model {prof.model.name} {theirs} "
                             f"(layers, hidden, intermediate, heads, kv heads, vocab) but the runtime's model is {ours}")

    def describe(self) -> dict:
        s = self.spec
        return {**asdict(self.rcfg), "kv_blocks": s.total_blocks, "host_blocks": s.host_blocks,
                "adapter_slots": s.adapter_slots, "merge": self.merge_strategy}

    # --- the executor protocol -------------------------------------------------------------------------
    def preload(self, adapters: Sequence[int]) -> None:
        for a in adapters:
            self._load(a)
        self._warmup()

    def run(self, order: StepOrder) -> tuple[PhaseTimes, list[int]]:
        """Apply one step's memory operations and mode change, then its forward; the measured phases and
        each batch entry's greedy next token."""
        kv = self.kv
        t = _PhaseTimer(self.device)
        for rid in order.recompute:
            kv.release(rid)
        t.mark()
        for rid in order.swap_out:
            kv.swap_out(rid)
        t.mark()
        for a in order.evict:
            self.pool.evict(self._slots.pop(a))
        t.mark()
        for a in order.load:
            self._load(a)
        t.mark()
        if order.switch:
            if order.merged is None:
                self.merger.unmerge()
            else:
                self.merger.switch(str(order.merged), self.pool.deltas(str(order.merged)))
        t.mark()
        for rid in order.swap_in:
            kv.swap_in(rid)
        t.mark()
        # a step may only change memory or mode (calibration times those alone)
        tokens = self._forward(order) if order.batch else []
        t.mark()
        return PhaseTimes(*t.seconds()), tokens

    def sync(self) -> None:
        """Wait for the device (timing of work outside `run`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release(self, requests: Sequence[int]) -> None:
        """Free finished requests' KV."""
        for rid in requests:
            self.kv.release(rid)

    def export(self, request: int) -> KVPayload:
        """A migrating request's KV, leaving: a host copy of its blocks; its blocks here are freed."""
        payload = self.kv.export(request)
        self.kv.release(request)
        return payload

    def forget(self, request: int) -> None:
        """Free a request's KV if it holds any (one that leaves to be recomputed elsewhere)."""
        if request in self.kv.sequences() or self.kv.is_swapped(request):
            self.kv.release(request)

    def install(self, request: int, payload: KVPayload, swapped: bool, blocks: int) -> None:
        """A migrated request's KV, arriving: on the device, or in host swap when `swapped`, in the
        `blocks` its state holds (the sender held the computed tokens'; the receiver reserves for the
        context, its next token included)."""
        self.kv.install(request, payload, swapped, blocks)

    def add_adapter(self, adapter: int, path: str) -> int:
        """Read a PEFT folder as adapter `adapter` (host memory; a slot when the policy loads it), after
        checking its shapes against the model and its rank against the slots; its rank."""
        ad = load_peft_adapter(path, self.model.cfg, str(adapter))
        try:
            self.pool.add(ad)
        except ValueError as e:   # the rank above the slots' maximum
            raise AdapterFormatError(f"{path}: {e}") from None
        return ad.rank

    def remove_adapter(self, adapter: int) -> None:
        """Drop an adapter's host copy; one still in a slot stays there until the policy evicts it."""
        self.pool.remove(str(adapter))

    # --- internals -------------------------------------------------------------------------------------
    def _load(self, adapter: int) -> None:
        free = sorted(set(range(self.pool.num_slots)) - set(self._slots.values()))
        self._slots[adapter] = free[0]
        self.pool.load(str(adapter), free[0])

    def _forward(self, order: StepOrder) -> list[int]:
        kv, unmerged = self.kv, order.merged is None
        prefills, decodes, pre_rows, dec_rows = [], [], [], []
        for f in order.batch:
            kv.grow(f.request, f.kv_blocks)
            slot = self._slots[f.adapter] if unmerged else -1
            if f.tokens is not None:
                prefills.append((f.request, list(f.tokens), slot))
                pre_rows.append((f.sampling, len(f.tokens)))
            else:
                decodes.append((f.request, f.last, f.length, slot))
                dec_rows.append((f.sampling, f.length))
        batch = FlatBatch.build(prefills, decodes, kv=kv)
        lora = LoRABatch.build(batch, self.pool, self.backend) if unmerged else None
        logits = self.model(batch, kv, lora, attention_backend=self.backend)
        nxt = dict(zip([e[0] for e in [*prefills, *decodes]], next_tokens(logits, [*pre_rows, *dec_rows])))
        return [nxt[f.request] for f in order.batch]

    def _warmup(self) -> None:
        """Run `warmup` small iterations (a prefill and a decode, through the LoRA path when an adapter
        is resident) on a scratch sequence, so kernels compile before the clock starts; frees what it used."""
        if not self.rcfg.warmup or self.kv.num_free() < 2:
            return
        slot = next(iter(self._slots.values()), -1)
        scratch = -1
        for _ in range(self.rcfg.warmup):
            tokens = list(range(1, 9))
            self.kv.grow(scratch, self.kv.blocks_for(len(tokens) + 1))
            for prefills, decodes in ([(scratch, tokens, slot)], []), ([], [(scratch, 1, len(tokens) + 1, slot)]):
                batch = FlatBatch.build(prefills, decodes, kv=self.kv)
                lora = LoRABatch.build(batch, self.pool, self.backend) if slot >= 0 else None
                self.model(batch, self.kv, lora, attention_backend=self.backend)
            self.kv.release(scratch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check(self, memory: MemoryImage) -> None:
        """The device mirrors the state: every request's blocks where the state says, the same adapters."""
        self.kv.check()
        on_gpu = set(self.kv.sequences())
        where = f"replica {memory.replica}"
        for rid, blocks in memory.device_kv:
            if rid not in on_gpu or self.kv.is_swapped(rid) or len(self.kv.block_table(rid)) != blocks:
                raise AssertionError(f"{where}: request {rid}: state holds {blocks} GPU blocks, the cache "
                                     f"{len(self.kv.block_table(rid)) if rid in on_gpu else 'none'}")
        for rid in memory.swapped:
            if not self.kv.is_swapped(rid):
                raise AssertionError(f"{where}: request {rid} is swapped in the state but not in the cache")
        if memory.free_blocks is not None and self.kv.num_free() != memory.free_blocks:
            raise AssertionError(f"{where}: free blocks: cache {self.kv.num_free()} vs state {memory.free_blocks}")
        if set(self._slots) != set(memory.adapters) or \
                set(self.pool.resident().values()) != {str(a) for a in self._slots}:
            raise AssertionError(f"{where}: adapter slots {sorted(self._slots)} vs state's resident "
                                 f"{list(memory.adapters)}")
