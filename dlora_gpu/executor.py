"""One step of the shared replica state -> real work on a device: memory operations, then one forward.

`ModelExecutor.run(step)` follows the order `ReplicaState.begin` applied the decision in: recompute
(free KV), swap-out (KV to host), evict, load (adapter slots), the mode change (merge / unmerge /
switch), swap-in, KV growth, then the forward over the flat mixed batch and a greedy token for every
request (output lengths are forced, EOS is ignored, as in the paper's runs). Each phase is timed:
CUDA events on a GPU, perf_counter_ns on a CPU. The executor mirrors the state's memory exactly:
every request owns as many KV blocks (on the device or in host swap) as the state says, and the
adapter slots hold the state's resident adapters (`check`).
"""
from __future__ import annotations


import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dlora_gpu.adapters import AdapterPool
from dlora_gpu.batch import FlatBatch, LoRABatch
from dlora_gpu.kv_cache import PagedKVCache
from dlora_gpu.merge import DriftFreeMerger, InPlaceMerger
from dlora_gpu.model import Llama, LlamaConfig
from dlora_gpu.weights import load_checkpoint, random_weights
from dlora_sim.core.config import Parts
from dlora_sim.core.replica_state import ReplicaState
from dlora_sim.core.step import Step
from dlora_sim.core.request import Request, State

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("torch", "triton", "auto")
CLOCKS = ("real", "virtual", "measured")   # how the serving clock moves (dlora_gpu.engine)


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

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"runtime.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"runtime.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"runtime.clock must be one of {list(CLOCKS)}, got {self.clock!r}")
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
    from dlora_sim.core.config import ConfigError, dataclass_from
    if node is None:
        raise ConfigError("runtime: missing (choose runtime=cpu_tiny or runtime=h200_7b)")
    return dataclass_from(RuntimeConfig, node, "runtime")


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


class ModelExecutor:
    """The model, its paged KV cache, the adapter pool and the merger of one replica."""

    def __init__(self, rcfg: RuntimeConfig, state: ReplicaState, parts: Parts):
        if state.chunked_prefill:
            raise ValueError("cluster.replica.chunked_prefill is on (auto turns it on when a prompt exceeds "
                             "max_num_batched_tokens): the runtime prefills whole prompts only (its prefill "
                             "attention does not read earlier chunks' KV yet); set it to false to reject such "
                             "prompts instead; the simulator models chunking")
        torch.set_num_threads(rcfg.threads)
        self.rcfg, self.state = rcfg, state
        self.device = torch.device(rcfg.device)
        self.dtype = DTYPES[rcfg.dtype]
        self.backend = rcfg.backend
        self.model = self._model(rcfg, parts)
        cfg = self.model.cfg
        self._check_shape(cfg, parts)
        self.vocab = cfg.vocab_size
        adapters = parts.workload.adapters
        ids = {str(a.id): a.rank for a in adapters}
        if rcfg.adapters_dir is None:
            self.pool = AdapterPool.random(cfg, ids, rcfg.seed, state.adapter_slots, dtype=self.dtype,
                                           device=self.device)
        else:
            dirs = {aid: Path(rcfg.adapters_dir) / f"adapter-{aid}" for aid in ids}
            missing = [str(p) for p in dirs.values() if not p.is_dir()]
            if missing:
                raise ValueError(f"runtime.adapters_dir: no adapter folder {missing[0]} (one per workload adapter, "
                                 f"named adapter-<id>)")
            self.pool = AdapterPool.from_dirs(cfg, dirs, state.adapter_slots, dtype=self.dtype, device=self.device)
            for aid, rank in ids.items():
                if self.pool.host[aid].rank != rank:
                    raise ValueError(f"{dirs[aid]}: rank {self.pool.host[aid].rank} but the workload says adapter "
                                     f"{aid} has rank {rank}")
        self.kv = PagedKVCache(state.total_blocks, state.block_size, cfg, self.dtype, self.device,
                               host_blocks=state.host_total_blocks)
        merge = parts.cluster.replica.merge
        if merge == "pristine_host":
            raise ValueError("cluster.replica.merge=pristine_host: the runtime keeps its pristine copy on the GPU "
                             "(pristine_gpu) or merges in place (inplace)")
        targets = self.model.merge_targets()
        self.merger = DriftFreeMerger(targets) if merge == "pristine_gpu" else InPlaceMerger(targets)
        self.merge_strategy = merge
        self._slots: dict[int, int] = {}                 # workload adapter -> pool slot
        self._tokens: dict[int, list[int]] = {}          # request id -> prompt + generated token ids
        self.device_name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else f"CPU ({torch.get_num_threads()} torch thread(s))")

    def _model(self, rcfg: RuntimeConfig, parts: Parts) -> Llama:
        if rcfg.checkpoint is not None:
            return load_checkpoint(rcfg.checkpoint, dtype=self.dtype, device=self.device)
        name = parts.profile.model.name
        try:
            cfg = LlamaConfig.preset(name)
        except (KeyError, ValueError):
            raise ValueError(f"model.name={name}: no model preset of that name for random weights "
                             f"(use tiny or llama-2-7b, or set runtime.checkpoint)") from None
        return random_weights(cfg, rcfg.seed, self.dtype, self.device)

    @staticmethod
    def _check_shape(cfg: LlamaConfig, parts: Parts) -> None:
        """The profile prices the model that runs: same layers, widths, heads and vocabulary."""
        m = parts.profile.model
        ours, theirs = cfg.architecture, m.architecture
        if ours != theirs:
            raise ValueError(f"profile {parts.profile.path or parts.profile.name} describes model {m.name} {theirs} "
                             f"(layers, hidden, intermediate, heads, kv heads, vocab) but the runtime's model is {ours}")

    def describe(self) -> dict:
        return {**asdict(self.rcfg), "kv_blocks": self.state.total_blocks, "host_blocks": self.state.host_total_blocks,
                "adapter_slots": self.state.adapter_slots, "merge": self.merge_strategy}

    # --- the executor protocol -------------------------------------------------------------------------
    def preload(self, adapters: Sequence[int]) -> None:
        for a in adapters:
            self._load(a)
        self._warmup()

    def run(self, step: Step) -> PhaseTimes:
        d, kv = step.decision, self.kv
        t = _PhaseTimer(self.device)
        for r in d.recompute:
            kv.release(r.id)
        t.mark()
        for r in d.swap_out:
            kv.swap_out(r.id)
        t.mark()
        for a in d.evict:
            self.pool.evict(self._slots.pop(a))
        t.mark()
        for a in d.load:
            self._load(a)
        t.mark()
        if d.merged != step.mode_from:
            if d.merged is None:
                self.merger.unmerge()
            else:
                self.merger.switch(str(d.merged), self.pool.deltas(str(d.merged)))
        t.mark()
        for r in step.swap_in:
            kv.swap_in(r.id)
        t.mark()
        if step.batch:   # a step may only change memory or mode (calibration times those alone)
            self._forward(step)
        t.mark()
        recompute, swap_out, evict, load, mode, swap_in, forward = t.seconds()
        return PhaseTimes(recompute, swap_out, evict, load, mode, swap_in, forward)

    def sync(self) -> None:
        """Wait for the device (timing of work outside `run`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release(self, requests: Sequence[Request]) -> None:
        for r in requests:
            self.kv.release(r.id)
            del self._tokens[r.id]

    # --- internals -------------------------------------------------------------------------------------
    def _load(self, adapter: int) -> None:
        free = sorted(set(range(self.pool.num_slots)) - set(self._slots.values()))
        self._slots[adapter] = free[0]
        self.pool.load(str(adapter), free[0])

    def _prompt(self, r: Request) -> list[int]:
        """Seeded synthetic prompt token ids: traces give lengths, not text."""
        return np.random.default_rng([self.rcfg.seed, r.id]).integers(0, self.vocab, r.prompt_tokens).tolist()

    def _forward(self, step: Step) -> None:
        kv, unmerged = self.kv, step.decision.merged is None
        prefills, decodes = [], []
        for r, pf in zip(step.batch, step.prefill):
            kv.grow(r.id, r.kv_blocks)
            slot = self._slots[r.adapter] if unmerged else -1
            tokens = self._tokens.get(r.id)
            if tokens is None:
                tokens = self._tokens[r.id] = self._prompt(r)
            if pf:
                prefills.append((r.id, tokens, slot))
            else:
                decodes.append((r.id, tokens[-1], len(tokens), slot))
        batch = FlatBatch.build(prefills, decodes, kv=kv)
        lora = LoRABatch.build(batch, self.pool, self.backend) if unmerged else None
        logits = self.model(batch, kv, lora, attention_backend=self.backend)
        nxt = logits.argmax(dim=-1).tolist()
        for (seq, *_), tok in zip([*prefills, *decodes], nxt):
            self._tokens[seq].append(tok)

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

    def check(self) -> None:
        """The device mirrors the state: every request's blocks where the state says, the same adapters."""
        self.kv.check()
        state = self.state
        flight = {id(r) for r in state.running}
        for r in state.queue:
            held = r.state == State.RESIDENT or id(r) in flight
            on_gpu = r.id in self.kv.sequences() and not self.kv.is_swapped(r.id)
            if held and r.kv_blocks and (not on_gpu or len(self.kv.block_table(r.id)) != r.kv_blocks):
                raise AssertionError(f"request {r.id}: state holds {r.kv_blocks} GPU blocks, the cache "
                                     f"{len(self.kv.block_table(r.id)) if on_gpu else 'none'}")
            if r.state == State.SWAPPED and not self.kv.is_swapped(r.id):
                raise AssertionError(f"request {r.id} is swapped in the state but not in the cache")
        if self.kv.num_free() != state.free_blocks and not state.running:
            raise AssertionError(f"free blocks: cache {self.kv.num_free()} vs state {state.free_blocks}")
        if set(self._slots) != set(state.resident) or set(self.pool.resident().values()) != {str(a) for a in self._slots}:
            raise AssertionError(f"adapter slots {sorted(self._slots)} vs state's resident {sorted(state.resident)}")
