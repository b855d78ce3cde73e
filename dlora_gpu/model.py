"""A Llama decoder in one file, laid out for serving many LoRA adapters.

Hugging Face's weight names and rotary layout (rotate_half over the two halves of head_dim) are kept,
so HF checkpoints and PEFT adapters load without permuting q/k rows. Per layer the projections are
stored fused -- ``qkv_proj`` [q_out + 2*kv_out, hidden] and ``gate_up_proj`` [2*intermediate, hidden]
-- so each group is one GEMM and one LoRA launch pair; `state_dict_hf` splits them back into HF names.

One `forward` serves one iteration's flat mixed batch (see `dlora_gpu.batch.FlatBatch`): prefill
tokens first (each prefill starts at position 0, attention by SDPA on the fresh K/V), then one token
per decoding sequence (attention over the paged KV cache by `decode_attention`). Every token's K/V
is written into the cache. Unmerged LoRA is added after each projection group; merged mode is the
plain base weights after `DriftFreeMerger` has written the adapter into them (see `merge_targets`).

This module imports nothing from the files that come after it in a request's path (weights,
adapters, kv_cache, batch): the cache and the LoRA metadata are used through their attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlora_gpu.decode_attention import decode_attention
from dlora_gpu.lora_ops import Backend, lora_apply
from dlora_sim.core.model_shape import SHAPES, ModelShape

if TYPE_CHECKING:
    from dlora_gpu.batch import FlatBatch, LoRABatch
    from dlora_gpu.kv_cache import PagedKVCache

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# One fused weight (and one LoRA stack) per group; its slices are these projections, in this order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF = {p: g for g, names in GROUPS.items() for p in names}


def hf_module_path(layer: int, projection: str) -> str:
    """Hugging Face's module path of a projection, e.g. ``model.layers.3.mlp.up_proj``."""
    part = "self_attn" if GROUP_OF[projection] in ("qkv", "o") else "mlp"
    return f"model.layers.{layer}.{part}.{projection}"


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 4096

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of one projection, e.g. ``k_proj`` -> (kv_heads*head_dim, hidden)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                  "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        if name not in shapes:
            raise KeyError(f"unknown projection {name!r}; expected one of {PROJECTIONS}")
        return shapes[name]

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        """A model the serving core knows by name (`dlora_sim.core.model_shape.SHAPES`)."""
        if name not in SHAPES:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(SHAPES)}")
        return cls.from_shape(SHAPES[name])

    @classmethod
    def from_shape(cls, shape: ModelShape) -> "LlamaConfig":
        """The runtime's config of a profile's model (rotary and norm constants: Llama's defaults)."""
        return cls(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                   num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads)

    @property
    def architecture(self) -> tuple[int, int, int, int, int, int]:
        """As `ModelShape.architecture`: (layers, hidden, intermediate, heads, kv heads, vocab)."""
        return (self.num_layers, self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                self.vocab_size)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Read a Hugging Face ``config.json`` dict; refuses what this model does not implement.

        ``rope_theta`` is read at the top level (transformers 4) or from ``rope_parameters``
        (transformers 5).
        """
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "vocab_size", "rms_norm_eps", "max_position_embeddings")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"{source}: missing key {missing[0]!r}")
        rope = config.get("rope_parameters") or {}
        theta = config.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{source}: missing key 'rope_theta' (top level or in 'rope_parameters')")
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        supported = {  # key -> the values this model implements (absent, None or {} also pass)
            "model_type": ("llama",), "hidden_act": ("silu",), "attention_bias": (False,),
            "mlp_bias": (False,), "rope_scaling": (), "head_dim": (head_dim,),
        }
        for key, ok in supported.items():
            if config.get(key) not in (None, {}) and config[key] not in ok:
                raise ValueError(f"{source}: key {key!r} = {config[key]!r} is not supported by "
                                 "dlora_gpu.model.Llama")
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: key 'rope_parameters' = {rope!r}: only the default rotary "
                             "embedding is supported")
        heads = config["num_attention_heads"]
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                   intermediate_size=config["intermediate_size"],
                   num_layers=config["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads") or heads,
                   rope_theta=float(theta), rms_norm_eps=float(config["rms_norm_eps"]),
                   max_position=config["max_position_embeddings"])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's RMSNorm: normalise in fp32, round to x's dtype, then scale."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, head_dim]; cos/sin [T, head_dim] (HF layout: the two halves share frequencies)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _weight(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    """Uninitialised and frozen: inference only, and merging writes into it in place."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class LlamaLayer(nn.Module):
    """One decoder layer's weights as plain attributes (fused qkv and gate_up)."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

        def weight(*shape: int) -> nn.Parameter:
            return _weight(shape, dtype, device)

        self.input_layernorm = weight(h)
        self.qkv_proj = weight((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h)
        self.o_proj = weight(h, cfg.num_heads * d)
        self.post_attention_layernorm = weight(h)
        self.gate_up_proj = weight(2 * i, h)
        self.down_proj = weight(h, i)


class Llama(nn.Module):
    """Llama for serving. Weights start uninitialised: fill them with `dlora_gpu.weights`."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float16,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg

        def weight(*shape: int) -> nn.Parameter:
            return _weight(shape, dtype, device)

        self.embed_tokens = weight(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = weight(cfg.hidden_size)
        self.lm_head = weight(cfg.vocab_size, cfg.hidden_size)
        # Computed on the CPU in fp32 as HF does, so both models see the same frequencies.
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    # ---- weights by name -------------------------------------------------------------------------

    def projections(self, layer: int) -> dict[str, Tensor]:
        """The seven projections of one layer as [out, in] views (row slices of the fused weights)."""
        cfg, lw = self.cfg, self.layers[layer]
        views: dict[str, Tensor] = {}
        for group, names in GROUPS.items():
            sizes = [cfg.projection_shape(n)[0] for n in names]
            views.update(zip(names, getattr(lw, f"{group}_proj").detach().split(sizes)))
        return views

    def merge_targets(self, modules: tuple[str, ...] = PROJECTIONS) -> dict[str, Tensor]:
        """``{"layers.{i}.{proj}": live weight view}`` for `DriftFreeMerger`.

        The merger keeps a pristine copy of every weight it is given (all seven projections of
        Llama-2-7B are 12.9 GB in fp16), so pass only the modules the workload's adapters target.
        """
        unknown = set(modules) - set(PROJECTIONS)
        if unknown:
            raise KeyError(f"unknown projections {sorted(unknown)}; expected a subset of {PROJECTIONS}")
        return {f"layers.{i}.{name}": w for i in range(self.cfg.num_layers)
                for name, w in self.projections(i).items() if name in modules}

    def state_dict_hf(self) -> dict[str, Tensor]:
        """Weights under Hugging Face names. q/k/v and gate/up are views into the fused weights
        (clone them before `safetensors.torch.save_file`, which refuses shared storage)."""
        sd = {"model.embed_tokens.weight": self.embed_tokens.detach()}
        for i, lw in enumerate(self.layers):
            pre = f"model.layers.{i}."
            for name, w in self.projections(i).items():
                sd[f"{hf_module_path(i, name)}.weight"] = w
            sd[pre + "input_layernorm.weight"] = lw.input_layernorm.detach()
            sd[pre + "post_attention_layernorm.weight"] = lw.post_attention_layernorm.detach()
        sd["model.norm.weight"] = self.norm.detach()
        sd["lm_head.weight"] = self.lm_head.detach()
        return sd

    @torch.no_grad()
    def load_hf_state_dict(self, sd: Mapping[str, Tensor], *, source: str = "state dict",
                           files: Mapping[str, str] | None = None) -> None:
        """Copy HF-named weights in (converting dtype); every key must be present with its shape.

        Errors name ``files[key]`` (where a key came from) or else ``source``. Values are read one
        at a time, so ``sd`` may be a mapping that loads tensors on access.
        """
        dest = self.state_dict_hf()

        def where(key: str) -> str:
            return (files or {}).get(key, source)

        extra = sorted(set(sd) - set(dest))
        if extra:
            raise ValueError(f"{where(extra[0])}: unexpected key {extra[0]!r}")
        missing = sorted(set(dest) - set(sd))
        if missing:
            raise ValueError(f"{where(missing[0])}: missing key {missing[0]!r}")
        for key, target in dest.items():
            value = sd[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{where(key)}: key {key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(value)

    # ---- forward ---------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch: "FlatBatch", kv: "PagedKVCache", lora: "LoRABatch | None" = None, *,
                attention_backend: Backend = "auto") -> Tensor:
        """Logits [num_seqs, vocab] of every sequence's last token, in `batch.seqs` order."""
        cfg = self.cfg
        if kv.dtype != self.dtype:
            raise ValueError(f"KV cache dtype {kv.dtype} differs from the model's {self.dtype}")
        n_pre, d = batch.num_prefill_tokens, cfg.head_dim
        freqs = batch.positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d

        def project(x: Tensor, lw: LlamaLayer, group: str, i: int) -> Tensor:
            y = F.linear(x, getattr(lw, f"{group}_proj"))
            if lora is not None:
                stack = getattr(lora.layers[i], group)
                if lora.prefill_segments is not None:
                    lora_apply(y[:n_pre], x[:n_pre], stack, segments=lora.prefill_segments,
                               backend=lora.backend)
                if lora.decode_slot_ids is not None:
                    lora_apply(y[n_pre:], x[n_pre:], stack, slot_ids=lora.decode_slot_ids,
                               backend=lora.backend)
            return y

        h = self.embed_tokens[batch.token_ids]
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.input_layernorm, cfg.rms_norm_eps)
            qkv = project(x, lw, "qkv", i)
            q, k, v = qkv.split([q_out, kv_out, kv_out], dim=-1)
            q = apply_rope(q.reshape(-1, cfg.num_heads, d), cos, sin)
            k = apply_rope(k.reshape(-1, cfg.num_kv_heads, d), cos, sin)
            v = v.reshape(-1, cfg.num_kv_heads, d)
            kv.write(i, batch.slot_mapping, k, v)
            attn = torch.empty_like(q)
            for start, length in batch.prefill_spans:
                span = slice(start, start + length)
                out = F.scaled_dot_product_attention(
                    q[span].transpose(0, 1)[None], k[span].transpose(0, 1)[None],
                    v[span].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
                attn[span] = out[0].transpose(0, 1)
            if batch.num_decodes:
                k_cache, v_cache = kv.layer(i)
                attn[n_pre:] = decode_attention(q[n_pre:], k_cache, v_cache, batch.block_tables,
                                                batch.context_lens, backend=attention_backend)
            h = h + project(attn.reshape(-1, q_out), lw, "o", i)
            x = rms_norm(h, lw.post_attention_layernorm, cfg.rms_norm_eps)
            gate, up = project(x, lw, "gate_up", i).chunk(2, dim=-1)
            h = h + project(F.silu(gate) * up, lw, "down", i)
        last = rms_norm(h[batch.last_token_index], self.norm, cfg.rms_norm_eps)
        return F.linear(last, self.lm_head)

