"""Base-model weights: Hugging Face safetensors checkpoints, or seeded random ones.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Tensors are read one at a time from the memory-mapped files and
copied into the fused layout, so loading needs no second copy of the model in host memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from dlora_gpu.model import Llama, LlamaConfig
from dlora_sim.core.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError, UserError):
    """A checkpoint we cannot load; the message names the file and, where one is at fault, the key."""


def read_json(file: Path, error: type[UserError]):
    """A JSON file's content; a missing or malformed file raises `error` naming it."""
    if not file.is_file():
        raise error(f"{file}: file not found")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON ({e})") from None


def read_config(path: str | Path) -> tuple[LlamaConfig, dict]:
    """(model config, the raw config.json dict) of a checkpoint directory."""
    file = Path(path) / "config.json"
    raw = read_json(file, CheckpointError)
    try:
        return LlamaConfig.from_hf(raw, source=str(file)), raw
    except ValueError as e:
        raise CheckpointError(str(e)) from None


class _LazyTensors(Mapping[str, Tensor]):
    """key -> tensor, read from its safetensors file on access; `aliases` read another key's tensor."""

    def __init__(self, files: dict[str, Path], aliases: dict[str, str]) -> None:
        self.files = files
        self.aliases = aliases

    def __getitem__(self, key: str) -> Tensor:
        try:
            with safe_open(self.files[key], framework="pt") as f:
                return f.get_tensor(self.aliases.get(key, key))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.files[key]}: cannot read key {key!r} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _tensor_files(path: Path) -> tuple[dict[str, Path], Path]:
    """Which file holds each tensor, and the file that lists them (the shard index or the single
    file)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: no valid 'weight_map' ({e})") from None
        files = {key: path / name for key, name in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{file}: file not found (listed in {index})")
        return files, index
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{single}: file not found (nor {INDEX_FILE})")
    try:
        with safe_open(single, framework="pt") as f:
            return {key: single for key in f.keys()}, single
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single}: unreadable safetensors file ({e})") from None


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float16,
                    device: torch.device | str = "cpu") -> Llama:
    """A `Llama` with a Hugging Face checkpoint's weights, converted to `dtype`.

    A config with ``tie_word_embeddings`` whose checkpoint has no ``lm_head.weight`` gets a copy
    of the embeddings as its (untied) head.
    """
    path = Path(path)
    cfg, raw = read_config(path)
    files, listing = _tensor_files(path)
    aliases = {}
    embed = "model.embed_tokens.weight"
    if raw.get("tie_word_embeddings") and "lm_head.weight" not in files and embed in files:
        files["lm_head.weight"] = files[embed]
        aliases["lm_head.weight"] = embed
    model = Llama(cfg, dtype, device)
    try:
        model.load_hf_state_dict(_LazyTensors(files, aliases), source=str(listing),
                                 files={k: str(v) for k, v in files.items()})
    except CheckpointError:
        raise
    except ValueError as e:  # a missing, extra or misshapen key, already named with its file
        raise CheckpointError(str(e)) from None
    return model


@torch.no_grad()
def random_weights(cfg: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float16,
                   device: torch.device | str = "cpu") -> Llama:
    """A `Llama` with seeded random weights whose activations stay O(1) at any width and depth.

    Every projection is N(0, 1/in_features), so each pre-activation has unit variance whatever the
    hidden size (a 2-layer tiny model and Llama-2-7B see the same statistics); embeddings are N(0, 1)
    and norms are ones. The residual stream then grows like sqrt(layers), to about 10 after 32
    layers, far inside fp16's range. Draws happen on `device` (fast on a GPU), so the same seed
    gives different weights on CPU and CUDA.
    """
    model = Llama(cfg, dtype, device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, w in model.named_parameters():
        if name.endswith("layernorm") or name == "norm":
            w.fill_(1.0)
            continue
        std = 1.0 if name == "embed_tokens" else 1.0 / math.sqrt(w.shape[1])
        w.copy_(torch.randn(w.shape, generator=g, device=device) * std)
    return model
