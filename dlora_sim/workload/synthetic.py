"""Synthetic multi-adapter workloads: per-adapter Gamma arrivals at each adapter's share of the rate.

Each adapter draws its arrivals from its own random stream (spawned from the seed), fixing the
dLoRA artifact's shared-seed defect: adapters' bursts are independent.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlora_sim.workload.lengths import LengthDist
from dlora_sim.workload.popularity import popularity_weights
from dlora_sim.core.workload import PREFIX_BLOCK_TOKENS, RequestArrays, Workload, shared_prompt_prefixes


@dataclass
class SyntheticWorkload:
    num_adapters: int = 16
    num_requests: int = 2000
    rate: float = 8.0                  # requests per second, all adapters together
    cv: float = 1.0                    # coefficient of variation of inter-arrival times (1 = Poisson)
    popularity: str = "zipf"           # uniform | zipf | powerlaw
    popularity_param: float = 1.0      # zipf s, or power-law alpha
    rank: int = 16
    prompt: LengthDist = field(default_factory=lambda: LengthDist("uniform", low=8, high=512))
    output: LengthDist = field(default_factory=lambda: LengthDist("uniform", low=8, high=512))
    lengths: Any = None                # joint (prompt, output) pairs (dlora_sim.traces.lengths); replaces prompt/output
    name: str = "synthetic"
    # shared system prompts (prefix caching): each request opens with one of `shared_prefix_groups` prompts of
    # `shared_prefix_tokens` tokens (added to its drawn prompt length), drawn uniformly; 0 = none
    shared_prefix_groups: int = 0
    shared_prefix_tokens: int = 0
    prefix_block_tokens: int = PREFIX_BLOCK_TOKENS

    def __post_init__(self) -> None:
        if isinstance(self.prompt, dict):
            self.prompt = LengthDist(**self.prompt)
        if isinstance(self.output, dict):
            self.output = LengthDist(**self.output)
        if self.rate <= 0 or self.cv <= 0:
            raise ValueError(f"workload.rate and workload.cv must be > 0, got {self.rate}, {self.cv}")
        if self.num_requests < 1 or self.num_adapters < 1:
            raise ValueError("workload.num_requests and workload.num_adapters must be >= 1")
        if (self.shared_prefix_groups > 0) != (self.shared_prefix_tokens > 0) or self.shared_prefix_groups < 0:
            raise ValueError("workload.shared_prefix_groups and workload.shared_prefix_tokens must both be > 0 "
                             f"or both 0, got {self.shared_prefix_groups}, {self.shared_prefix_tokens}")

    def build(self, seed: int) -> Workload:
        weights = popularity_weights(self.popularity, self.num_adapters, self.popularity_param)
        root = np.random.SeedSequence(seed)
        arrival_seqs = root.spawn(self.num_adapters + 1)
        horizon = self.num_requests / self.rate
        shape = 1.0 / self.cv ** 2
        streams = [(a, self.rate * w, np.random.default_rng(ss), [], [0.0])
                   for a, (w, ss) in enumerate(zip(weights, arrival_seqs[:-1])) if self.rate * w > 0]
        until = horizon * 1.5   # overshoot, then keep the first num_requests overall
        while True:
            for a, rate, rng, chunks, last in streams:   # each adapter's stream continues where it stopped
                while last[0] < until:
                    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=max(16, int(rate * horizon * 0.5) + 16))
                    ts = last[0] + np.cumsum(gaps)
                    chunks.append(ts)
                    last[0] = float(ts[-1])
            # every stream covers [0, until): the first num_requests arrivals are final once that many fell in it
            if sum(int(np.searchsorted(np.concatenate(c), until)) for _, _, _, c, _ in streams) >= self.num_requests:
                break
            until *= 1.5
        times = [np.concatenate(c) for _, _, _, c, _ in streams]
        adapters = [np.full(ts.size, a, dtype=np.int64) for (a, *_), ts in zip(streams, times)]
        t_all, a_all = np.concatenate(times), np.concatenate(adapters)
        order = np.lexsort((a_all, t_all))[: self.num_requests]
        t_all, a_all = t_all[order], a_all[order]
        t_all -= t_all[0]
        lrng = np.random.default_rng(arrival_seqs[-1])
        if self.lengths is not None:
            prompts, outputs = self.lengths.sample(t_all.size, lrng)
        else:
            prompts = self.prompt.sample(lrng, t_all.size)
            outputs = self.output.sample(lrng, t_all.size)
        meta = {"rate": self.rate, "cv": self.cv, "popularity": self.popularity,
                "popularity_param": self.popularity_param}
        if not self.shared_prefix_groups:
            return Workload.from_arrays(RequestArrays(t_all, a_all, prompts, outputs), self.num_adapters, self.rank,
                                        name=self.name, meta=meta)
        groups = np.random.default_rng(root.spawn(self.num_adapters + 2)[-1]).integers(self.shared_prefix_groups,
                                                                                         size=t_all.size)
        prompts = np.asarray(prompts) + self.shared_prefix_tokens
        prefixes = shared_prompt_prefixes(groups, prompts, self.shared_prefix_tokens, self.prefix_block_tokens)
        w = Workload.from_arrays(RequestArrays(t_all, a_all, prompts, outputs), self.num_adapters, self.rank,
                                 name=self.name, meta={**meta, "shared_prefix_groups": self.shared_prefix_groups,
                                                       "shared_prefix_tokens": self.shared_prefix_tokens})
        return dataclasses.replace(w, prefixes=prefixes, prefix_block_tokens=self.prefix_block_tokens)
