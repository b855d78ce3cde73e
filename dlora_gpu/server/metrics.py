"""`GET /metrics`: Prometheus exposition under vLLM's names, so what reads vLLM's (dashboards, the
Kubernetes Gateway API inference extension's endpoint picker) reads ours, plus dLoRA's own.

Gauges and dLoRA's counters are read from the engine when scraped (`LiveEngine.snapshot`, taken
between steps); latency histograms and token counters are observed as each request finishes. Each
replica is an `engine` label, as vLLM labels its data-parallel engines.
"""
from __future__ import annotations

import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dlora_gpu.live import LiveEngine
from dlora_sim.core.request import NS, Request

# vLLM's buckets for these histograms (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
OURS = {"iterations": ("dlora:iterations", "iterations (steps) run, over all replicas"),
        "switches": ("dlora:mode_switches", "merge, unmerge and switch operations"),
        "forced_iterations": ("dlora:forced_iterations", "iterations the starvation guard forced"),
        "adapter_loads": ("dlora:adapter_loads", "adapters loaded into GPU slots"),
        "migrations": ("dlora:migrations", "requests moved between replicas by co-migration"),
        "preemptions": ("dlora:preemptions", "requests preempted (recomputed or swapped out)")}
ALSO_VLLM = {"preemptions": ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.")}


class _Engine:
    """The collector that reads the engine at scrape time."""

    def __init__(self, live: LiveEngine, model: str):
        self.live, self.model = live, model

    def collect(self) -> Iterable[Metric]:
        snap = self.live.snapshot(timeout_s=10.0)
        labels = ["model_name", "engine"]
        gauges = {"running": GaugeMetricFamily("vllm:num_requests_running", "Requests holding KV on the device.",
                                               labels=labels),
                  "waiting": GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting (new, preempted, "
                                               "swapped out).", labels=labels),
                  "kv_usage": GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV-cache usage: 1 means 100 percent.",
                                                labels=labels),
                  "kv_usage_v1": GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent "
                                                   "(vLLM V1's name for the same gauge).", labels=labels)}
        for j in range(len(snap.running)):
            for key, fam in gauges.items():
                fam.add_metric([self.model, str(j)], getattr(snap, key.removesuffix("_v1"))[j])
        yield from gauges.values()
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting LoRA adapters (the value is the "
                                 "time of the reading).",
                                 labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"])
        info.add_metric([",".join(snap.running_adapters), str(snap.max_lora), ",".join(snap.waiting_adapters)],
                        time.time())
        yield info
        merged = GaugeMetricFamily("dlora:merged_adapter_info", "1 for the adapter merged into each replica's "
                                   "weights (adapter=\"\" when it runs unmerged).", labels=["model_name", "engine",
                                                                                             "adapter"])
        for j, name in enumerate(snap.merged):
            merged.add_metric([self.model, str(j), name or ""], 1.0)
        yield merged
        for key, (name, doc) in [*OURS.items(), *ALSO_VLLM.items()]:
            c = CounterMetricFamily(name, doc[0].upper() + doc[1:].rstrip(".") + ".", labels=["model_name"])
            c.add_metric([self.model], snap.counters[key])
            yield c


class Metrics:
    """A registry of its own per server (several servers may live in one process: tests)."""

    def __init__(self, live: LiveEngine, model: str):
        """Observes `live`'s finished requests from now on (as its `on_finished`)."""
        self.model = model
        self.registry = CollectorRegistry()
        reg, lab = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", lab, registry=reg,
                              buckets=TTFT_BUCKETS)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time between a request's consecutive output "
                              "tokens (one observation per token after the first).", lab, registry=reg,
                              buckets=TPOT_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", lab, registry=reg,
                             buckets=E2E_BUCKETS)
        self.prompt = Counter("vllm:prompt_tokens", "Prefill tokens processed.", lab, registry=reg)
        self.generation = Counter("vllm:generation_tokens", "Generation tokens processed.", lab, registry=reg)
        self.success = Counter("vllm:request_success", "Requests finished.", ["model_name", "finished_reason"],
                               registry=reg)
        reg.register(_Engine(live, model))
        live.on_finished = self.finished
        live.on_token_gap = self.tpot.labels(model).observe

    def finished(self, r: Request, reason: str) -> None:
        """Observe a finished request (called on the engine's thread; prometheus_client is thread-safe)."""
        m = self.model
        self.ttft.labels(m).observe((r.first_token - r.arrival) / NS)
        self.e2e.labels(m).observe((r.finish - r.arrival) / NS)
        self.prompt.labels(m).inc(r.prompt_tokens)
        self.generation.labels(m).inc(r.generated)
        self.success.labels(m, reason).inc()
