"""Profiles: everything the simulator knows about one (hardware, model) pair, with provenance.

A profile is a YAML file (`calibration/profiles/<hardware>-<model>.yaml`). Loading validates every
key: a missing, unknown or non-positive value is an error that names the file and the key, so a
typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from dlora_sim.core.errors import UserError
from dlora_sim.core.model_shape import ModelShape
from dlora_sim.core.paths import PROFILES_DIR


class ProfileError(ValueError, UserError):
    """A profile file is missing, malformed, or inconsistent."""


@dataclass(frozen=True)
class Provenance:
    source: str  # "measured" | "analytic"
    device: str
    date: str
    method: str
    software: str = ""
    anchors: tuple[str, ...] = ()
    # a measured CPU profile: the reference probe's median seconds while its points were timed (their
    # drift scaling refers to it; the runtime's `measured` clock scales to it too); 0 = none
    reference_probe_s: float = 0.0
    reference_probe: str = ""   # which probe that time is of (dlora_gpu.drift's describe()); "" = unknown


@dataclass(frozen=True)
class Hardware:
    name: str
    gpu_bytes: int
    hbm_bytes_per_s: float
    peak_flops: float


@dataclass(frozen=True)
class IterationCost:
    """t = overhead + per_seq*seqs + max(weight_read, per_token*tokens) + per_context_token*ctx
    + per_prefill_sq*sum(prompt^2) + multi_token [tokens >= 2]; plus the LoRA terms in unmerged mode."""

    overhead_s: float
    per_seq_s: float
    weight_read_s: float
    per_token_s: float
    per_context_token_s: float
    per_prefill_sq_s: float
    # a fixed cost every iteration of two or more tokens pays over a one-token one: BLAS runs a single
    # token's projections as matrix-vector products, cheaper than the matrix-matrix kernels of any
    # larger batch (the CPU runtime); 0 where one kernel serves every size (analytic profiles)
    multi_token_s: float = 0.0


@dataclass(frozen=True)
class LoraCost:
    """Unmerged LoRA compute of one implementation path: launches, adapter bytes read, per-token work.

    Paths (`LORA_PATHS`): `kernel` = batched multi-adapter kernels (Punica/S-LoRA/vLLM style): the
    adapter terms count the batch's distinct adapters and tokens; `einsum` = the dLoRA artifact's
    dense one-hot einsum: every token against every *resident* adapter, so both terms count the
    resident adapters whatever the batch uses."""

    overhead_s: float
    per_adapter_rank_s: float
    per_token_rank_s: float
    source: str = ""     # where these numbers come from (measured / derived / analytic, and how)
    # kernel path: a fixed cost per LoRA pass, whatever the rank -- what a loop over adapters pays (the
    # runtime's CPU torch backend, PEFT): one pass per distinct adapter of the decodes and one per distinct
    # adapter of the prefills (`Step.lora_passes`); 0 for batched kernels and analytic profiles
    per_adapter_s: float = 0.0
    # kernel path: a fixed cost per LoRA call, one for the prefills and one for the decodes of a batch (the
    # runtime's torch path calls each kind apart); 0 where one call serves the batch (analytic profiles)
    per_call_s: float = 0.0


LORA_PATHS = ("kernel", "einsum")


@dataclass(frozen=True)
class SwitchCost:
    """Drift-free passes over the merged weights (from a pristine copy); in-place merging derives its
    costs from merge_s (cost_model.MERGE_STRATEGIES)."""

    merge_s: float      # clean -> merged on a: one pass W = W0 + s*B*A (an in-place pass costs the same)
    unmerge_s: float    # merged on a -> clean: copy W = W0
    switch_s: float     # merged on a -> merged on b: one fused pass from W0


@dataclass(frozen=True)
class Transfers:
    host_to_gpu_bytes_per_s: float   # adapter (or whole-model) loads
    kv_swap_bytes_per_s: float       # KV swap between GPU and host
    kv_transfer_bytes_per_s: float   # KV transfer between replicas (migration)
    load_overhead_s: float = 0.0     # fixed cost per adapter load (measured profiles: per-slice copies)
    swap_overhead_s: float = 0.0     # fixed cost of an iteration that swaps (measured profiles)
    kv_transfer_overhead_s: float = 0.0   # fixed cost per migrated request's KV (export, ship, import calls)
    # the backing store behind a bounded host adapter cache (cluster.replica.host_adapter_cache): disk or a
    # remote object store; an adapter not in host memory is fetched from it first. 0 = none priced
    store_bytes_per_s: float = 0.0
    store_latency_s: float = 0.0     # fixed cost per fetch (a request to the store)


@dataclass(frozen=True)
class MemoryBudget:
    gpu_utilization: float           # fraction of GPU memory the engine may use
    activation_reserve_bytes: int    # workspace kept free of weights and KV


@dataclass(frozen=True)
class Profile:
    name: str
    provenance: Provenance
    hardware: Hardware
    model: ModelShape
    iteration: IterationCost
    lora_paths: Mapping[str, LoraCost]   # unmerged LoRA cost per implementation path the profile prices
    switch: SwitchCost
    transfers: Transfers
    memory: MemoryBudget
    path: str = ""
    lora_path: str = "kernel"            # the path this run is priced with (config key profile.lora)

    @property
    def lora(self) -> LoraCost:
        return self.lora_paths[self.lora_path]

    def with_lora_path(self, name: str) -> "Profile":
        if name not in self.lora_paths:
            raise ProfileError(f"{self.path or self.name}: no 'lora.{name}' cost in this profile; it prices "
                               f"{sorted(self.lora_paths)} (choose with profile.lora=...)")
        return dataclasses.replace(self, lora_path=name)

    def adapter_bytes(self, rank: int) -> int:
        return self.model.adapter_bytes_per_rank * rank


_SECTIONS: dict[str, type] = {
    "provenance": Provenance, "hardware": Hardware, "model": ModelShape, "iteration": IterationCost,
    "switch": SwitchCost, "transfers": Transfers, "memory": MemoryBudget,
}


def _build(cls: type, raw: Any, where: str, src: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{src}: '{where}' must be a mapping, got {type(raw).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ProfileError(f"{src}: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                           f"valid: {sorted(names)}")
    kwargs = {}
    for name, f in names.items():
        if name not in raw:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ProfileError(f"{src}: missing key '{where}.{name}'")
        value = raw[name]
        kind = f.type
        try:
            if kind in ("int",):
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                value = int(float(value))
            elif kind in ("float",):
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            elif kind == "str":
                value = str(value)
            elif kind.startswith("tuple"):
                value = tuple(str(v) for v in (value or ()))
        except (TypeError, ValueError):
            raise ProfileError(f"{src}: '{where}.{name}' must be {kind}, got {value!r}") from None
        if kind in ("int", "float") and value < 0:
            raise ProfileError(f"{src}: '{where}.{name}' must be >= 0, got {value}")
        kwargs[name] = value
    return cls(**kwargs)


def profile_from_dict(raw: Mapping[str, Any], src: str = "<dict>") -> Profile:
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{src}: a profile must be a mapping")
    allowed = set(_SECTIONS) | {"name", "lora"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ProfileError(f"{src}: unknown top-level key(s) {unknown}; valid: {sorted(allowed)}")
    for key in ["name", "lora", *_SECTIONS]:
        if key not in raw:
            raise ProfileError(f"{src}: missing key '{key}'")
    parts = {k: _build(cls, raw[k], k, src) for k, cls in _SECTIONS.items()}
    lora = raw["lora"]
    if not isinstance(lora, Mapping) or not lora:
        raise ProfileError(f"{src}: 'lora' must map one or more of {list(LORA_PATHS)} to their costs")
    bad = sorted(set(lora) - set(LORA_PATHS))
    if bad:
        raise ProfileError(f"{src}: unknown LoRA path(s) {', '.join(f'lora.{k}' for k in bad)}; valid: {list(LORA_PATHS)}")
    paths = {k: _build(LoraCost, v, f"lora.{k}", src) for k, v in lora.items()}
    for key in ("per_adapter_s", "per_call_s"):
        if "einsum" in paths and getattr(paths["einsum"], key):
            raise ProfileError(f"{src}: 'lora.einsum.{key}' must be 0: the einsum path has no loop over adapters "
                               "and one call for the batch")
    prof = Profile(name=str(raw["name"]), path=src, lora_paths=paths,
                   lora_path="kernel" if "kernel" in paths else next(iter(paths)), **parts)
    if prof.provenance.source not in ("measured", "analytic"):
        raise ProfileError(f"{src}: 'provenance.source' must be 'measured' or 'analytic', "
                           f"got {prof.provenance.source!r}")
    if not 0 < prof.memory.gpu_utilization <= 1:
        raise ProfileError(f"{src}: 'memory.gpu_utilization' must be in (0, 1]")
    for key in ("hbm_bytes_per_s", "peak_flops"):
        if getattr(prof.hardware, key) <= 0:
            raise ProfileError(f"{src}: 'hardware.{key}' must be > 0")
    for key in ("host_to_gpu_bytes_per_s", "kv_swap_bytes_per_s", "kv_transfer_bytes_per_s"):
        if getattr(prof.transfers, key) <= 0:
            raise ProfileError(f"{src}: 'transfers.{key}' must be > 0")
    if prof.model.kv_bytes_per_token <= 0 or prof.model.weight_bytes <= 0:
        raise ProfileError(f"{src}: 'model.kv_bytes_per_token' and 'model.weight_bytes' must be > 0")
    return prof


def load_profile(path_or_name: str | Path) -> Profile:
    """Load a profile by path, or by name from calibration/profiles/ (e.g. 'a100-80gb-llama-2-7b')."""
    p = Path(path_or_name)
    if not p.suffix:
        p = PROFILES_DIR / f"{p.name}.yaml"
    if not p.exists():
        avail = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))
        raise ProfileError(f"profile not found: {p}; available in {PROFILES_DIR}: {avail}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {e}") from None
    return profile_from_dict(raw, src=str(p))
