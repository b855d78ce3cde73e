"""Shared by the runtime-model tests: a tiny HF Llama checkpoint and one-iteration stepping of ours."""

from __future__ import annotations

from pathlib import Path

import torch

from dlora_gpu.batch import FlatBatch, LoRABatch
from dlora_gpu.kv_cache import PagedKVCache
from dlora_gpu.model import Llama

# GQA (4 query heads, 2 kv heads), odd-ish widths. initializer_range 0.2 (HF's default is 0.02)
# makes attention peaky, so a wrong rotary layout, mask or block lookup changes the logits.
HF_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, initializer_range=0.2, rope_theta=10000.0)


def save_hf_checkpoint(path: Path, seed: int = 0, **save_kwargs) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_TINY))
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return path


def load_hf(path: Path):
    """A fresh HF model (PEFT modifies the model it wraps, so every use gets its own)."""
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_last_logits(model, tokens: list[list[int]], adapter_names: list[str] | None = None) -> torch.Tensor:
    """Last-token logits of each sequence by full recompute; equal lengths are batched together
    (PEFT's mixed-adapter forward when `adapter_names` is given)."""
    out = [None] * len(tokens)
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        by_len.setdefault(len(t), []).append(i)
    for idx in by_len.values():
        kwargs = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in idx]}
        logits = model(input_ids=torch.tensor([tokens[i] for i in idx]), **kwargs).logits[:, -1]
        for i, row in zip(idx, logits):
            out[i] = row
    return torch.stack(out)


def step(model: Llama, kv: PagedKVCache, prefills=(), decodes=(), pool=None,
         backend: str = "torch") -> torch.Tensor:
    """One iteration: grow every sequence's blocks to fit, build the batch, forward."""
    for seq, toks, _ in prefills:
        kv.grow(seq, kv.blocks_for(len(toks)))
    for seq, _, ctx, _ in decodes:
        kv.grow(seq, kv.blocks_for(ctx))
    batch = FlatBatch.build(prefills, decodes, kv=kv)
    lora = LoRABatch.build(batch, pool, backend) if pool is not None else None
    return model(batch, kv, lora, attention_backend=backend)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
