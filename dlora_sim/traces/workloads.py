"""Workload sources that Hydra `workload` configs instantiate: one class per trace format.

Each is a dataclass whose `build(seed)` returns the canonical `Workload`. They share one pipeline:
load or generate requests in trace time -> keep the slice [start_s, end_s) -> map requests to
adapters -> fill lengths (from the trace, the source's own distributions, or `lengths`) ->
scale the rate per adapter -> scale time -> cap at max_requests. Files are found by
`registry.resolve` unless `path` is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlora_sim.traces import registry
from dlora_sim.traces.lengths import LengthSource, TraceLengths
from dlora_sim.traces.mapping import AdapterMapping
from dlora_sim.traces.raw import RawRequests
from dlora_sim.traces.transform import scale_rate, time_scale
from dlora_sim.core.workload import PREFIX_BLOCK_TOKENS, RequestSpec, Workload, shared_prompt_prefixes

# Purposes of the RNG streams derived from the seed (fixed so results never depend on call order).
_MAPPING, _LENGTHS, _RATE = 1, 2, 3


@dataclass
class TraceWorkload:
    """Options every trace source has (see the module docstring for the order they apply in).

    mapping: identity | map_stride | uniform | zipf | powerlaw | explicit (see traces.mapping);
    skew: Zipf s or power-law alpha; time_scale multiplies arrivals (0.5 = twice as fast);
    rate_scale multiplies the number of requests keeping each adapter's share.
    """

    num_adapters: int | None = 32
    mapping: str = "zipf"
    map_stride: int = 1
    skew: float = 1.0
    mapping_file: str | None = None
    start_s: float = 0.0
    end_s: float | None = None
    time_scale: float = 1.0
    rate_scale: float = 1.0
    max_requests: int | None = None
    rank: int = 16
    path: str | None = None
    lengths: LengthSource | None = None
    # a system prompt of this many tokens opens each request (added to the prompt; its whole 512-token blocks are
    # shared, for prefix caching); 0 = none. One prompt per `shared_prefix_by`: key (the trace's client or function)
    # or adapter (each adapter's application has its own prompt; any trace)
    shared_prefix_tokens: int = 0
    shared_prefix_by: str = "key"

    trace_name = ""  # registry entry; set by subclasses

    def adapter_mapping(self) -> AdapterMapping:
        return AdapterMapping(kind=self.mapping, num_adapters=self.num_adapters, map_stride=self.map_stride,
                              skew=self.skew, file=self.mapping_file)

    def _finish(self, raw: RawRequests, seed: int, name: str, windowed: bool = False,
                lengths_drawn: bool = False, **meta) -> Workload:
        """Shared tail of the pipeline.

        `windowed`: the source already applied start/end and rate_scale while generating.
        `lengths_drawn`: the source already drew lengths (with `lengths` as its fallback).
        """
        mapping = self.adapter_mapping()  # validate options before any heavy work
        if self.shared_prefix_by not in ("key", "adapter"):
            raise ValueError(f"{name}: workload.shared_prefix_by must be key or adapter, got {self.shared_prefix_by!r}")
        if not windowed:
            end = np.inf if self.end_s is None else self.end_s
            raw = raw.take((raw.arrival_s >= self.start_s) & (raw.arrival_s < end))
            raw = RawRequests(raw.arrival_s - self.start_s, raw.prompt_tokens, raw.output_tokens, raw.key, raw.prefix)
        adapters, k = mapping.assign(raw.key, len(raw), _rng(seed, _MAPPING))
        if not (lengths_drawn and raw.has_lengths) and (self.lengths is not None or not raw.has_lengths):
            if self.lengths is None:
                raise ValueError(f"{name}: the trace has no token lengths; set `lengths` "
                                 f"(e.g. dlora_sim.traces.lengths.TraceLengths with trace azure_conv)")
            prompt, output = self.lengths.sample(len(raw), _rng(seed, _LENGTHS))
        else:
            prompt, output = raw.prompt_tokens, raw.output_tokens
        clamped = int((prompt < 1).sum() + (output < 1).sum())
        shared_prefixes = None
        if self.shared_prefix_tokens:
            if raw.key is None and self.shared_prefix_by == "key":
                raise ValueError(f"{name}: workload.shared_prefix_tokens by key needs a trace whose requests name their "
                                 "client or function (ServeGen, Azure Functions); this one names none "
                                 "(workload.shared_prefix_by=adapter gives each adapter a prompt)")
            if raw.prefix is not None:
                raise ValueError(f"{name}: workload.shared_prefix_tokens on a trace that has its own prefixes")
            groups = (adapters if self.shared_prefix_by == "adapter"
                      else np.unique(raw.key.astype(str), return_inverse=True)[1])
            prompt = np.maximum(prompt, 1) + self.shared_prefix_tokens
            shared_prefixes = shared_prompt_prefixes(groups, prompt, self.shared_prefix_tokens,
                                                     PREFIX_BLOCK_TOKENS)
        reqs = [RequestSpec(float(t), int(a), int(max(p, 1)), int(max(o, 1)))
                for t, a, p, o in zip(raw.arrival_s, adapters, prompt, output)]
        info = {"source": type(self).__name__, "trace": self.trace_name, "seed": seed,
                "mapping": self.mapping, "zero_lengths_clamped_to_1": clamped, **meta}
        if raw.key is not None:
            keys, first = np.unique(raw.key.astype(str), return_index=True)
            info["num_keys"] = int(keys.size)
            if keys.size <= 1000:
                info["adapter_of_key"] = {str(kk): int(adapters[i]) for kk, i in zip(keys, first)}
        w = Workload.from_requests(reqs, num_adapters=k, rank=self.rank, name=name, meta=info)
        # raw is sorted by arrival, and from_requests' sort is stable: rows align
        if raw.prefix is not None and prompt is raw.prompt_tokens:   # hashes describe the trace's own prompts
            w = Workload(w.requests, w.adapters, w.name, w.meta, prefixes=tuple(raw.prefix))
        elif shared_prefixes is not None:
            w = Workload(w.requests, w.adapters, w.name, {**w.meta, "shared_prefix_tokens": self.shared_prefix_tokens},
                         prefixes=shared_prefixes)
        if self.rate_scale != 1.0 and not windowed:
            w = scale_rate(w, self.rate_scale, seed=int(_rng(seed, _RATE).integers(2**31)))
        if self.time_scale != 1.0:
            w = time_scale(w, self.time_scale)
        if self.max_requests is not None and len(w.requests) > self.max_requests:
            w = Workload(w.requests[: self.max_requests], w.adapters, w.name, {**w.meta, "max_requests": self.max_requests},
                         prefixes=None if w.prefixes is None else w.prefixes[: self.max_requests],
                         prefix_block_tokens=w.prefix_block_tokens)
        return w


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, purpose]))


@dataclass
class AzureLLMWorkload(TraceWorkload):
    """Azure LLM inference 2023: real arrivals and lengths; adapters from a popularity model."""

    service: str = "conv"

    @property
    def trace_name(self) -> str:  # type: ignore[override]
        return f"azure_{self.service}"

    def build(self, seed: int) -> Workload:
        from dlora_sim.traces.azure_llm import load_azure_llm

        path = registry.resolve(self.trace_name, path=self.path)
        return self._finish(load_azure_llm(path), seed, self.trace_name, path=str(path))


@dataclass
class MooncakeWorkload(TraceWorkload):
    """Mooncake FAST'25 JSONL (conversation or synthetic): long-context arrivals and lengths."""

    trace: str = "mooncake_conversation"

    @property
    def trace_name(self) -> str:  # type: ignore[override]
        return self.trace

    def build(self, seed: int) -> Workload:
        from dlora_sim.traces.mooncake import load_mooncake

        path = registry.resolve(self.trace, path=self.path)
        return self._finish(load_mooncake(path), seed, self.trace, path=str(path))


@dataclass
class ServeGenWorkload(TraceWorkload):
    """ServeGen per-client rate series, one client = one adapter by default (mapping identity).

    Requests are generated for [start_s, end_s) of trace time (end_s defaults to start_s + 1 day)
    at rate_scale x the recorded rates. Lengths: the client's own distributions when the folder has
    them (m-small), else `lengths`.
    """

    model: str = "m-large"
    mapping: str = "identity"
    num_adapters: int | None = None
    clients: list[str] | None = None
    client_lengths: bool = True
    iat: str = "fitted"  # "fitted" (per-window Gamma/Weibull) or "cv" (Gamma with the window's CV)

    @property
    def trace_name(self) -> str:  # type: ignore[override]
        return {"m-large": "servegen_large", "m-small": "servegen_small"}.get(self.model, f"servegen_{self.model}")

    def folder(self) -> Path:
        entry = registry.get_entry(self.trace_name)
        return registry.resolve(self.trace_name, relpath=entry.root, path=self.path)

    def build(self, seed: int) -> Workload:
        from dlora_sim.traces import servegen

        folder = self.folder()
        end = self.start_s + 86400.0 if self.end_s is None else self.end_s
        clients = None if self.clients is None else [str(c) for c in self.clients]
        raw = servegen.generate(folder, seed, self.start_s, end, self.rate_scale, clients, self.iat)
        rel = raw.arrival_s - self.start_s
        if self.client_lengths:
            prompt = np.empty(len(raw), dtype=np.int64)
            output = np.empty(len(raw), dtype=np.int64)
            for c in np.unique(raw.key.astype(str)):
                sel = raw.key == c
                prompt[sel], output[sel] = servegen.sample_client_lengths(
                    folder, c, rel[sel], seed, self.lengths, start_s=self.start_s)
            raw = RawRequests(rel, prompt, output, raw.key)
        else:
            raw = RawRequests(rel, key=raw.key)
        return self._finish(raw, seed, self.trace_name, windowed=True, lengths_drawn=self.client_lengths,
                            path=str(folder), window_s=[self.start_s, end], rate_scale=self.rate_scale)


@dataclass
class MAF2019Workload(TraceWorkload):
    """Azure Functions 2019 per-minute counts, as dLoRA replays them: map_stride over functions,
    Gamma arrivals within each minute (CV `cv`), lengths from `lengths`."""

    day: int = 1
    cv: float = 1.0
    top_functions: int | None = None
    mapping: str = "map_stride"
    trace_name = "maf2019"

    def build(self, seed: int) -> Workload:
        from dlora_sim.traces.azure_functions import generate_maf2019

        path = registry.resolve("maf2019", relpath=f"invocations_per_function_md.anon.d{self.day:02d}.csv",
                                path=self.path)
        end = 86400.0 if self.end_s is None else self.end_s
        raw = generate_maf2019(path, seed, self.start_s, end, self.rate_scale, self.cv, self.top_functions)
        raw = RawRequests(raw.arrival_s - self.start_s, key=raw.key)
        return self._finish(raw, seed, "maf2019", windowed=True, path=str(path), day=self.day,
                            window_s=[self.start_s, end], rate_scale=self.rate_scale)


@dataclass
class MAF2021Workload(TraceWorkload):
    """Azure Functions 2021 per-invocation trace: real arrivals per function; lengths from `lengths`."""

    mapping: str = "map_stride"
    trace_name = "maf2021"

    def build(self, seed: int) -> Workload:
        from dlora_sim.traces.azure_functions import load_maf2021

        path = registry.resolve("maf2021", relpath="AzureFunctionsInvocationTraceForTwoWeeksJan2021.txt",
                                path=self.path)
        return self._finish(load_maf2021(path), seed, "maf2021", path=str(path))


def require_traces(source) -> None:
    """Raise TraceNotFoundError (one line: which trace, how to fetch it or point at it) if a trace this
    workload source reads is not on this machine: checked before a sweep launches anything."""
    needed = []
    if getattr(source, "trace_name", "") and getattr(source, "path", None) is None:
        entry = registry.get_entry(source.trace_name)
        needed.append((source.trace_name, entry.root if isinstance(source, ServeGenWorkload) else None))
    lengths = getattr(source, "lengths", None)
    if isinstance(lengths, TraceLengths) and lengths.path is None:
        needed.append((lengths.trace, None))
    for name, rel in needed:
        registry.resolve(name, rel)
