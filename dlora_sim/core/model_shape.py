"""The one description of a model's shape, shared by profiles (what the simulator prices), the analytic
profile generator (what it derives bytes and FLOPs from) and the runtime (what it builds).

A profile stores the byte counts it was made with (a measured profile counts what its runtime holds,
norms included); `ModelShape.of` derives them from the architecture for a datasheet-style profile.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    dtype_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    adapter_bytes_per_rank: int  # all seven projections, every layer
    merge_bytes: int             # weights a merge touches (the seven projections): a pristine copy's size

    @classmethod
    def of(cls, name: str, num_layers: int, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
           vocab: int, dtype_bytes: int = 2) -> "ModelShape":
        """A Llama-architecture shape with its byte counts derived: the projections and both embeddings."""
        kv = num_kv_heads * (hidden // num_heads)
        linear = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * intermediate   # q, o, k, v; gate, up, down
        lora = (hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + intermediate) * 3   # A and B per unit rank
        params = num_layers * linear + 2 * vocab * hidden
        return cls(name, num_layers, hidden, intermediate, num_heads, num_kv_heads, vocab, dtype_bytes,
                   weight_bytes=params * dtype_bytes, kv_bytes_per_token=2 * num_layers * kv * dtype_bytes,
                   adapter_bytes_per_rank=lora * num_layers * dtype_bytes,
                   merge_bytes=num_layers * linear * dtype_bytes)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def linear_params_per_layer(self) -> int:
        kv = self.num_kv_heads * self.head_dim
        return self.hidden * self.hidden * 2 + self.hidden * kv * 2 + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        return self.num_layers * self.linear_params_per_layer + 2 * self.vocab * self.hidden

    @property
    def lora_elems_per_rank_per_layer(self) -> int:
        """A (r x in) + B (out x r) for q, k, v, o, gate, up, down, per unit of rank."""
        h, i, kv = self.hidden, self.intermediate, self.num_kv_heads * self.head_dim
        return (h + h) * 2 + (h + kv) * 2 + (h + i) * 3

    @property
    def architecture(self) -> tuple[int, int, int, int, int, int]:
        """(layers, hidden, intermediate, heads, kv heads, vocab): what must match between a profile and
        the model a runtime builds."""
        return (self.num_layers, self.hidden, self.intermediate, self.num_heads, self.num_kv_heads, self.vocab)


# The shapes we know by name: the analytic profiles' models and the runtime's random-weight models.
SHAPES = {
    "tiny": ModelShape.of("tiny", 2, 256, 688, 4, 2, 512, dtype_bytes=4),   # the CPU runtime's test model
    "llama-2-7b": ModelShape.of("llama-2-7b", 32, 4096, 11008, 32, 32, 32000),
    "llama-2-13b": ModelShape.of("llama-2-13b", 40, 5120, 13824, 40, 40, 32000),
}
