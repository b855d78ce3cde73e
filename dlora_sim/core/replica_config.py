"""A replica's and a cluster's configuration, and the capacity rules every executor and policy shares:
which requests no replica can ever serve, how many adapters fit in GPU slots, how many a replica may host."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from dlora_sim.core.cost_model import MERGE_STRATEGIES, CostModel
from dlora_sim.core.request import Request, blocks_for

GIB = 1 << 30


@dataclass(frozen=True)
class ReplicaConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    watermark: float = 0.01          # fraction of KV blocks kept free when admitting prefills
    host_swap_bytes: int = 16 * GIB  # per replica
    gpu_adapter_slots: int | str = "auto"   # adapters resident on the GPU at once, or "auto": by memory
    adapter_memory_fraction: float = 0.05   # with "auto": the share of usable GPU memory for adapter slots
    weights: str = "lora"            # "lora" | "full_copy" (a whole merged model per adapter)
    merge: str = "inplace"           # how merged weights are kept: inplace | pristine_gpu | pristine_host
    fast_forward: bool = True
    max_kv_blocks: int | None = None # cap on KV blocks (a smaller KV budget than the GPU allows)
    chunked_prefill: bool | str = "auto"   # Sarathi-style: prompts split across iterations; "auto": only
                                           # if some prompt exceeds the token budget (see resolve_chunked_prefill)
    prefill_priority: bool = False   # vLLM's default: admissible prefills go first (alone, unless chunked)
    # adapter tiers (core/adapter_tiers.py): adapters held in host memory, an LRU (vLLM's max_cpu_loras, SGLang's
    # max_loaded_loras); null = every adapter, no backing store. A miss is fetched from the profile's store
    host_adapter_cache: int | None = None
    adapter_prefetch: bool = False   # fetch queued requests' adapters from the store ahead of their load (S-LoRA)
    overlap_loads: bool = False      # host-to-GPU adapter loads overlap the iteration's compute (SGLang's
                                     # --enable-lora-overlap-loading)
    prefix_caching: bool = False     # reuse the KV of cached prompt prefixes, keyed by adapter (core/prefix_cache.py)
    # vLLM's max_lora_rank: adapter slots are this rank and the LoRA kernels compute over all of it, so a smaller
    # adapter costs as a rank-max_lora_rank one (its load still copies its own bytes); adapters above it are refused.
    # "max" = the workload's largest rank (how vLLM must be configured to serve it); null = each adapter at its own
    # rank (S-LoRA/Punica, SGLang's per-adapter-rank kernels)
    max_lora_rank: int | str | None = None

    def __post_init__(self) -> None:
        if self.weights not in ("lora", "full_copy"):
            raise ValueError(f"cluster.replica.weights must be 'lora' or 'full_copy', got {self.weights!r}")
        if self.merge not in MERGE_STRATEGIES:
            raise ValueError(f"cluster.replica.merge must be one of {list(MERGE_STRATEGIES)}, got {self.merge!r}")
        if self.gpu_adapter_slots == "auto":
            if self.weights == "full_copy":
                raise ValueError("cluster.replica.gpu_adapter_slots must be a number of model copies with "
                                 "weights=full_copy, not 'auto'")
        elif isinstance(self.gpu_adapter_slots, str) or isinstance(self.gpu_adapter_slots, bool) \
                or self.gpu_adapter_slots < 1:
            raise ValueError(f"cluster.replica.gpu_adapter_slots must be >= 1 or 'auto', got {self.gpu_adapter_slots!r}")
        if not 0 < self.adapter_memory_fraction < 1:
            raise ValueError(f"cluster.replica.adapter_memory_fraction must be in (0, 1), "
                             f"got {self.adapter_memory_fraction}")
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"cluster.replica.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_kv_blocks is not None and self.max_kv_blocks < 1:
            raise ValueError(f"cluster.replica.max_kv_blocks must be >= 1 or null, got {self.max_kv_blocks}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"cluster.replica.watermark must be in [0, 1), got {self.watermark}")
        if self.host_adapter_cache is not None and (isinstance(self.host_adapter_cache, bool)
                                                    or self.host_adapter_cache < 1):
            raise ValueError(f"cluster.replica.host_adapter_cache must be >= 1 or null, got {self.host_adapter_cache!r}")
        if self.adapter_prefetch and self.host_adapter_cache is None:
            raise ValueError("cluster.replica.adapter_prefetch=true needs a bounded cluster.replica.host_adapter_cache "
                             "(with every adapter in host memory there is nothing to fetch ahead)")
        if self.max_lora_rank not in (None, "max") and (isinstance(self.max_lora_rank, bool)
                                                         or not isinstance(self.max_lora_rank, int)
                                                         or self.max_lora_rank < 1):
            raise ValueError(f"cluster.replica.max_lora_rank must be >= 1, max or null, got {self.max_lora_rank!r}")
        if not (isinstance(self.chunked_prefill, bool) or self.chunked_prefill == "auto"):
            raise ValueError(f"cluster.replica.chunked_prefill must be true, false or auto, got {self.chunked_prefill!r}")


def rank_pad(cfg: ReplicaConfig, ranks: Sequence[int]) -> int | None:
    """The rank every adapter's LoRA compute and slot is priced at (vLLM's max_lora_rank), or None: each its own."""
    if cfg.max_lora_rank is None:
        return None
    pad = max(ranks, default=1) if cfg.max_lora_rank == "max" else int(cfg.max_lora_rank)
    above = [(a, r) for a, r in enumerate(ranks) if r > pad]
    if above:
        raise ValueError(f"cluster.replica.max_lora_rank={cfg.max_lora_rank}: adapter {above[0][0]} has rank "
                         f"{above[0][1]} ({len(above)} adapter(s) above it); raise it, or set max or null")
    return pad


def resolve_chunked_prefill(cfg: ReplicaConfig, longest_prompt: int) -> ReplicaConfig:
    """`auto` becomes true only when some prompt exceeds max_num_batched_tokens (it would be rejected
    otherwise), so a workload whose prompts all fit runs exactly as the paper's vLLM did, unchunked."""
    if cfg.chunked_prefill != "auto":
        return cfg
    return replace(cfg, chunked_prefill=longest_prompt > cfg.max_num_batched_tokens)


def reject_reason(r: Request, cfg: ReplicaConfig, kv_blocks: int) -> str:
    """Why no replica can ever serve `r` ('' if one can); reasons are categories (summary.json counts
    them), the request's own numbers are in requests.csv."""
    if r.prompt_tokens > cfg.max_num_batched_tokens and not cfg.chunked_prefill:
        return f"prompt longer than max_num_batched_tokens ({cfg.max_num_batched_tokens}) without chunked prefill"
    if blocks_for(r.prompt_tokens + r.output_tokens, cfg.block_size) > kv_blocks:
        return f"prompt + output need more KV blocks than a replica has ({kv_blocks})"
    return ""



@dataclass(frozen=True)
class ClusterConfig:
    num_replicas: int = 1
    gpus_per_replica: int = 1
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    # load the adapters a router's placement puts on each replica before the first request (dLoRA's does); false:
    # every replica starts with empty adapter slots and host cache, as routers without a placement leave them
    preload: bool = True

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.gpus_per_replica < 1:
            raise ValueError("cluster.num_replicas and cluster.gpus_per_replica must be >= 1")


def adapter_slots(cfg: ReplicaConfig, cost: CostModel, ranks: Sequence[int], slot_bytes: int) -> int:
    """GPU adapter slots: the configured number, or with "auto" as many as `adapter_memory_fraction` of
    the usable memory holds (vLLM's max_loras, LoRAX's adapter memory fraction), at most one per adapter."""
    if cfg.gpu_adapter_slots != "auto":
        return int(cfg.gpu_adapter_slots)
    fit = int(cfg.adapter_memory_fraction * cost.usable_bytes() // slot_bytes)
    return max(1, min(len(ranks), fit))



def hosting_capacity(adapter_slots: int, num_adapters: int, num_replicas: int) -> int:
    """Adapters a replica may host: its GPU slots, or more when the slots of all replicas cannot hold
    every adapter once (then hosted adapters beyond the slots swap in from host memory on demand)."""
    return max(adapter_slots, math.ceil(num_adapters / max(num_replicas, 1)))
