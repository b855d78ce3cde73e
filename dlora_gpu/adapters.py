"""LoRA adapters: PEFT files in and out, every workload adapter in host memory, a few GPU slots.

PEFT format (what ``PeftModel.save_pretrained`` writes for a Llama): a directory with
``adapter_config.json`` and ``adapter_model.safetensors`` holding, per adapted projection,
``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r]; the delta is ``scale * B @ A`` with scale = lora_alpha / r
(lora_alpha / sqrt(r) with ``use_rslora``). Only plain LoRA on a list of the seven projections is
accepted: every feature that would change that arithmetic (DoRA, biases, per-module ranks or
alphas, a subset of layers, regex targets, ...) is refused with `AdapterFormatError` naming the
file and the key, rather than served wrongly.

`AdapterPool` keeps every adapter of a workload on the host (pinned when CUDA is available) and a
fixed number of GPU slots: per layer one `LoRAStack` per projection group (`model.GROUPS`: qkv with
3 slices, o, gate_up with 2, down), padded to the largest adapter rank. A projection an adapter
does not target is a zero slice, and a group it does not target at all is rank 0 in that slot,
which the kernels skip.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from dlora_gpu.lora_stack import LoRAStack
from dlora_gpu.merge import Delta
from dlora_gpu.model import GROUP_OF, GROUPS, PROJECTIONS, LlamaConfig, hf_module_path
from dlora_gpu.weights import read_json
from dlora_sim.core.errors import UserError

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"

# PEFT config keys whose non-default values change the forward pass -> what they do.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "fan_in_fan_out": "transposed (Conv1D-style) LoRA weights",
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "adapting only some layers",
    "layer_replication": "replicated layers",
    "exclude_modules": "excluded modules",
    "target_parameters": "LoRA on parameters instead of modules",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "quantisation-aware LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA singular-value adaptation",
    "monteclora_config": "Monte Carlo LoRA",
    "arrow_config": "Arrow routing",
}


class AdapterFormatError(ValueError, UserError):
    """A LoRA adapter on disk that we cannot serve exactly; the message names the file and key."""


def peft_key(layer: int, projection: str, factor: str) -> str:
    """Tensor name PEFT uses for lora_A / lora_B of one projection."""
    return f"base_model.model.{hf_module_path(layer, projection)}.lora_{factor}.weight"


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter: per (layer, projection) it targets, A [r, in] and B [out, r]."""

    adapter_id: str
    rank: int
    scale: float
    weights: Mapping[tuple[int, str], tuple[Tensor, Tensor]]

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(name for _, name in self.weights)

    def to_host(self, dtype: torch.dtype) -> "LoRAAdapter":
        """A copy in `dtype`, contiguous, pinned when CUDA is available (for async slot loads)."""
        pin = torch.cuda.is_available()

        def host(t: Tensor) -> Tensor:
            t = t.detach().to("cpu", dtype).contiguous()
            return t.pin_memory() if pin else t

        return LoRAAdapter(self.adapter_id, self.rank, self.scale,
                           {key: (host(a), host(b)) for key, (a, b) in self.weights.items()})


def load_peft_adapter(path: str | Path, cfg: LlamaConfig, adapter_id: str | None = None) -> LoRAAdapter:
    """Read a PEFT LoRA directory for a model of shape `cfg` (fp32 or whatever dtype it was saved in)."""
    path = Path(path)
    config_file, tensors_file = path / CONFIG_FILE, path / TENSORS_FILE
    conf = read_json(config_file, AdapterFormatError)
    if not isinstance(conf, dict):
        raise AdapterFormatError(f"{config_file}: expected a JSON object")
    rank, scale, targets = _read_config(conf, config_file)
    if not tensors_file.is_file():
        raise AdapterFormatError(f"{tensors_file}: file not found (only safetensors adapters are "
                                 "supported)")
    try:
        tensors = load_file(tensors_file)
    except (SafetensorError, OSError) as e:
        raise AdapterFormatError(f"{tensors_file}: unreadable safetensors file ({e})") from None
    expected = {peft_key(i, name, f): (i, name, f) for i in range(cfg.num_layers)
                for name in targets for f in "AB"}
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterFormatError(f"{tensors_file}: unexpected key {extra[0]!r}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterFormatError(f"{tensors_file}: missing key {missing[0]!r}")
    for key, (_, name, factor) in expected.items():
        out_f, in_f = cfg.projection_shape(name)
        want = (rank, in_f) if factor == "A" else (out_f, rank)
        if tuple(tensors[key].shape) != want:
            raise AdapterFormatError(f"{tensors_file}: key {key!r} has shape "
                                     f"{tuple(tensors[key].shape)}, expected {want}")
    weights = {(i, name): (tensors[peft_key(i, name, "A")], tensors[peft_key(i, name, "B")])
               for i in range(cfg.num_layers) for name in targets}
    return LoRAAdapter(adapter_id or path.name, rank, scale, weights)


def _read_config(conf: dict, config_file: Path) -> tuple[int, float, list[str]]:
    """(rank, scale, target projections) from an adapter_config.json dict, or AdapterFormatError."""
    def bad(key: str, why: str) -> AdapterFormatError:
        return AdapterFormatError(f"{config_file}: key {key!r}: {why}")

    if conf.get("peft_type") != "LORA":
        raise bad("peft_type", f"{conf.get('peft_type')!r} is not 'LORA'")
    for key, meaning in _UNSUPPORTED.items():
        value = conf.get(key)
        if value not in (None, False, {}, []) and not (key == "bias" and value == "none"):
            raise bad(key, f"{value!r}: {meaning} is not supported")
    rank = conf.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise bad("r", f"{rank!r} is not a positive integer")
    alpha = conf.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise bad("lora_alpha", f"{alpha!r} is not a number")
    targets = conf.get("target_modules")
    if isinstance(targets, str):
        raise bad("target_modules", f"{targets!r}: a string is a regex (or 'all-linear'); "
                  f"list the projections instead, a subset of {list(PROJECTIONS)}")
    if not isinstance(targets, list) or not targets:
        raise bad("target_modules", f"{targets!r} is not a non-empty list")
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise bad("target_modules", f"{unknown} are not among {list(PROJECTIONS)}")
    scale = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank
    return rank, float(scale), [p for p in PROJECTIONS if p in targets]


def random_adapter(cfg: LlamaConfig, adapter_id: str, rank: int, alpha: float, *,
                   generator: torch.Generator, targets: Iterable[str] = PROJECTIONS,
                   use_rslora: bool = False) -> LoRAAdapter:
    """Random fp32 adapter: A ~ N(0, 1/in), B ~ N(0, 0.01/r), so the delta is ~0.1*scale*rms(x)
    per output -- visible in the logits, small beside a unit-scale base projection."""
    targets = [p for p in PROJECTIONS if p in set(targets)]
    weights = {}
    for i in range(cfg.num_layers):
        for name in targets:
            out_f, in_f = cfg.projection_shape(name)
            a = torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f)
            b = torch.randn(out_f, rank, generator=generator) * (0.1 / math.sqrt(rank))
            weights[(i, name)] = (a, b)
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    return LoRAAdapter(adapter_id, rank, scale, weights)


def write_peft_adapter(path: str | Path, cfg: LlamaConfig, rank: int, alpha: float, seed: int,
                       targets: Iterable[str] = PROJECTIONS, *, use_rslora: bool = False,
                       identity: bool = False) -> Path:
    """Write a random adapter (see `random_adapter`) as PEFT would save it; returns the directory.
    `identity`: B = 0, as PEFT initialises a new LoRA, so the adapter computes the base model."""
    path = Path(path)
    ad = random_adapter(cfg, path.name, rank, alpha, generator=torch.Generator().manual_seed(seed),
                        targets=targets, use_rslora=use_rslora)
    if identity:
        ad = replace(ad, weights={k: (a, torch.zeros_like(b)) for k, (a, b) in ad.weights.items()})
    path.mkdir(parents=True, exist_ok=True)
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "target_modules": sorted(ad.targets), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": use_rslora, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
            "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": None}
    (path / CONFIG_FILE).write_text(json.dumps(conf, indent=2) + "\n")
    tensors = {peft_key(i, name, f): t.contiguous() for (i, name), ab in ad.weights.items()
               for f, t in zip("AB", ab)}
    save_file(tensors, path / TENSORS_FILE, metadata={"format": "pt"})
    return path


@dataclass
class LayerStacks:
    """One layer's adapter slots: one `LoRAStack` per projection group of `model.GROUPS`."""

    qkv: LoRAStack
    o: LoRAStack
    gate_up: LoRAStack
    down: LoRAStack


class AdapterPool:
    """Every workload adapter on the host; `num_slots` of them resident on the device at a time."""

    def __init__(self, cfg: LlamaConfig, adapters: Iterable[LoRAAdapter], num_slots: int, *,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.host: dict[str, LoRAAdapter] = {}
        for ad in adapters:
            if ad.adapter_id in self.host:
                raise ValueError(f"adapter {ad.adapter_id!r} given twice")
            self.host[ad.adapter_id] = ad.to_host(dtype)
        if not self.host or num_slots <= 0:
            raise ValueError(f"need at least one adapter and one slot (got {len(self.host)}, {num_slots})")
        self.max_rank = max(ad.rank for ad in self.host.values())

        def stack(names: tuple[str, ...]) -> LoRAStack:
            in_f = cfg.projection_shape(names[0])[1]
            sizes = [cfg.projection_shape(n)[0] for n in names]
            return LoRAStack.empty(num_slots, in_f, sizes, self.max_rank, dtype, device)

        self.layers = [LayerStacks(**{g: stack(names) for g, names in GROUPS.items()})
                       for _ in range(cfg.num_layers)]
        self._slots: list[str | None] = [None] * num_slots

    @classmethod
    def from_dirs(cls, cfg: LlamaConfig, dirs: Mapping[str, str | Path], num_slots: int, *,
                  dtype: torch.dtype = torch.float16,
                  device: torch.device | str = "cpu") -> "AdapterPool":
        """Adapters from PEFT directories, keyed by adapter id."""
        return cls(cfg, [load_peft_adapter(p, cfg, aid) for aid, p in dirs.items()], num_slots,
                   dtype=dtype, device=device)

    @classmethod
    def random(cls, cfg: LlamaConfig, ranks: Mapping[str, int], seed: int, num_slots: int, *,
               dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
               targets: Iterable[str] = PROJECTIONS) -> "AdapterPool":
        """Random adapters (alpha = 2*rank) for workloads without adapter files."""
        g = torch.Generator().manual_seed(seed)
        targets = tuple(targets)
        return cls(cfg, [random_adapter(cfg, aid, r, 2.0 * r, generator=g, targets=targets)
                         for aid, r in ranks.items()], num_slots, dtype=dtype, device=device)

    def add(self, ad: LoRAAdapter) -> None:
        """A new adapter on the host (a server loads one while serving); its rank must fit the slots."""
        if ad.adapter_id in self.host:
            raise ValueError(f"adapter {ad.adapter_id!r} given twice")
        if ad.rank > self.max_rank:
            raise ValueError(f"adapter {ad.adapter_id!r}: rank {ad.rank} above the slots' maximum {self.max_rank}")
        self.host[ad.adapter_id] = ad.to_host(self.layers[0].qkv.A.dtype)

    def remove(self, adapter_id: str) -> None:
        """Forget an adapter's host copy (a slot holding it keeps its weights until evicted)."""
        self.host.pop(adapter_id, None)

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def load(self, adapter_id: str, slot: int) -> None:
        """Copy a host adapter into an empty slot."""
        if adapter_id not in self.host:
            raise KeyError(f"unknown adapter {adapter_id!r}")
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} outside 0..{self.num_slots - 1}")
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} holds {self._slots[slot]!r}; evict it first")
        if adapter_id in self._slots:
            raise ValueError(f"adapter {adapter_id!r} is already in slot {self.slot_of(adapter_id)}")
        ad = self.host[adapter_id]
        for i, stacks in enumerate(self.layers):
            for group, names in GROUPS.items():
                pairs = [ad.weights.get((i, n)) for n in names]
                if all(p is None for p in pairs):
                    getattr(stacks, group).clear(slot)
                else:
                    getattr(stacks, group).load(slot, [None if p is None else p[0] for p in pairs],
                                                [None if p is None else p[1] for p in pairs],
                                                ad.scale)
        self._slots[slot] = adapter_id

    def evict(self, slot: int) -> None:
        if self._slots[slot] is None:
            raise ValueError(f"slot {slot} is already empty")
        for stacks in self.layers:
            for group in GROUPS:
                getattr(stacks, group).clear(slot)
        self._slots[slot] = None

    def slot_of(self, adapter_id: str) -> int | None:
        return self._slots.index(adapter_id) if adapter_id in self._slots else None

    def resident(self) -> dict[int, str]:
        """{slot: adapter id} of the occupied slots."""
        return {s: aid for s, aid in enumerate(self._slots) if aid is not None}

    def deltas(self, adapter_id: str) -> dict[str, Delta]:
        """``{"layers.{i}.{proj}": (A, B, scale)}`` on the device, for `DriftFreeMerger.merge`.

        A resident adapter is read in place from its slot; another is copied from the host.
        """
        ad = self.host[adapter_id]
        slot = self.slot_of(adapter_id)
        device = self.layers[0].qkv.A.device
        out: dict[str, Delta] = {}
        for (i, name), (a, b) in ad.weights.items():
            if slot is not None:
                group = GROUP_OF[name]
                a, b = getattr(self.layers[i], group).slot_weights(slot)[GROUPS[group].index(name)]
            out[f"layers.{i}.{name}"] = (a.to(device), b.to(device), ad.scale)
        return out
