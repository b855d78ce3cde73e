"""The runtime serving traces with the simulator's policies: the virtual clock reproduces dlora-sim byte
for byte, the real clock gives a complete, ordered results folder, the measured clock advances by each step's
own (drift-scaled) time, and what it cannot serve is refused."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from dlora_gpu.cli import build_engine
from dlora_sim.core.config import ConfigError, compose
from dlora_sim.des.engine import build_simulation
from dlora_sim.core.results import REQUEST_COLUMNS, _csv_text, request_rows
from dlora_sim.core.request import State, to_ns

# 8 adapters in 4 slots (loads), 40 KV blocks of 16 tokens and a little host swap (swap-outs, swap-ins
# and recomputes), arrivals fast enough that the batch is full.
PRESSURE = ["cluster.replica.max_kv_blocks=40", "cluster.replica.host_swap_bytes=200000", "workload.rate=20",
            "workload.output.high=160", "workload.num_requests=40"]


def _cfg(*overrides: str):
    return compose(["charts=false", *overrides], "serve")


def _csv(res) -> str:
    return _csv_text(REQUEST_COLUMNS, request_rows(res.requests))


def _checked(engine):
    """Check that the device mirrors the state after every iteration, and the state's own accounting."""
    engine.check_memory = True
    engine.cluster.debug_checks = True
    return engine


@pytest.mark.parametrize("system", ["slora", "merged", "peft", "dlora"])
def test_virtual_clock_reproduces_the_simulator_byte_for_byte(system):
    overrides = [f"system={system}", "runtime.clock=virtual", *PRESSURE]
    engine = _checked(build_engine(_cfg(*overrides)))
    served = engine.run()
    simulated = build_simulation(_cfg(*overrides)).run()
    counters = served.recorder.counters
    assert counters["adapter_loads"] > 0
    if system != "peft":   # PEFT's one-adapter batches are too small to press on 40 blocks
        assert counters["swap_outs"] > 0 and counters["swap_ins"] > 0 and counters["recomputes"] > 0
    assert _csv(served) == _csv(simulated)
    assert served.recorder.num_iterations == simulated.recorder.num_iterations


def test_virtual_clock_reproduces_the_simulator_with_adapter_tiers(tmp_path):
    """A bounded host cache, prefetch and overlapped loads live in the shared replica state: the runtime's
    virtual clock prices them as the simulator does (the CPU profile with a backing store added: it measured
    none)."""
    from dlora_sim.core.paths import PROFILES_DIR
    raw = yaml.safe_load((PROFILES_DIR / "cpu-tiny.yaml").read_text())
    raw["transfers"].update(store_bytes_per_s=5e6, store_latency_s=0.002)
    (tmp_path / "cpu-store.yaml").write_text(yaml.safe_dump(raw))
    overrides = ["system=slora", "runtime.clock=virtual", *PRESSURE, f"profile.path={tmp_path / 'cpu-store.yaml'}",
                 "cluster.replica.host_adapter_cache=3", "cluster.replica.adapter_prefetch=true",
                 "cluster.replica.overlap_loads=true"]
    served = _checked(build_engine(_cfg(*overrides))).run()
    simulated = build_simulation(_cfg(*overrides)).run()
    counters = served.recorder.counters
    assert counters["adapter_loads_store"] > 0 and counters["adapter_prefetches"] > 0
    assert _csv(served) == _csv(simulated)
    assert served.recorder.num_iterations == simulated.recorder.num_iterations


def test_merge_strategies_serve_the_same_tokens():
    """In-place and drift-free merging run the same greedy tokens (fp32, a tiny model: no rounding flips
    an argmax); their clocks differ by the strategies' prices."""
    tokens = []
    for merge in ("inplace", "pristine_gpu"):
        engine = _checked(build_engine(_cfg("system=merged", "runtime.clock=virtual", f"cluster.replica.merge={merge}",
                                            "workload.num_requests=16"), keep_tokens=True))
        res = engine.run()
        assert res.recorder.counters["switches"] > 2
        tokens.append(engine.tokens.finished)
    assert len(tokens[0]) == 16 and tokens[0] == tokens[1]


def test_real_clock_serves_every_request_once_in_order(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlora_gpu.cli", "system=dlora", "workload.num_requests=24", "progress=false",
           f"hydra.run.dir={out}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["executor"] == "dlora_gpu" and summary["clock"] == "real" and summary["device"].startswith("CPU")
    assert summary["versions"]["torch"] and summary["completed"] == 24
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert sorted(int(r["id"]) for r in rows) == list(range(24)) and {r["status"] for r in rows} == {"finished"}
    for r in rows:
        t = [float(r[k]) for k in ("arrival_s", "dispatch_s", "first_scheduled_s", "first_token_s", "finish_s")]
        assert t == sorted(t), r
    its = list(csv.DictReader((out / "iterations.csv").open()))
    end = 0.0
    for it in its:
        start, dur = float(it["start_s"]), float(it["duration_s"])
        assert start >= end - 1e-6 and dur > 0
        end = start + dur
        assert float(it["wall_s"]) > 0 and "policy_s" in it
        # the step's cost-model features: every decode has at least one token of context
        assert int(it["decode_context"]) >= int(it["decode_seqs"]) and int(it["prefill_sq"]) >= int(it["prefill_tokens"])
        assert int(it["resident_rank_sum"]) >= int(it["rank_sum"]) >= 0
    assert (out / "latency.png").exists()


def test_the_real_clock_starts_when_serving_starts_not_when_the_engine_is_built():
    """Building the model (and anything between that and `run`) is not serving time: requests that
    arrive at 0 are not already late when the first iteration starts."""
    import time
    engine = build_engine(_cfg("system=slora", "workload.num_requests=4"))
    time.sleep(0.3)
    res = engine.run()
    first = min(row.start for row in res.recorder.rows)
    assert first < to_ns(0.3) and all(r.done for r in res.requests)


def _profile_with_reference(tmp_path, reference_s: float, probe: str | None = None) -> str:
    import torch

    from dlora_gpu.drift import reference_probe
    from dlora_gpu.model import LlamaConfig
    from dlora_gpu.weights import random_weights
    probe = (reference_probe(random_weights(LlamaConfig.preset("tiny"), 0, torch.float32)).describe() if probe is None
             else probe)
    from dlora_sim.core.paths import PROFILES_DIR
    raw = yaml.safe_load((PROFILES_DIR / "cpu-tiny.yaml").read_text())
    raw["provenance"]["reference_probe_s"] = reference_s
    raw["provenance"]["reference_probe"] = probe
    path = tmp_path / "cpu-tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_measured_clock_advances_by_each_steps_own_time_scaled_to_the_profiles_reference(tmp_path, monkeypatch):
    """Every request once, dispatched at its arrival (waits jump); each iteration lasts at least the
    executor's wall time x the drift factor (a probe twice as fast as the reference: factor 2)."""
    from dlora_gpu import drift
    monkeypatch.setattr(drift.StepProbe, "__call__", lambda self: 0.0005)
    engine = build_engine(_cfg("system=dlora", "runtime.clock=measured", "workload.num_requests=12",
                               f"profile.path={_profile_with_reference(tmp_path, 0.001)}"))
    res = engine.run()
    assert sorted(r.id for r in res.requests) == list(range(12)) and all(r.done for r in res.requests)
    assert all(r.dispatch == r.arrival <= r.first_scheduled <= r.first_token <= r.finish for r in res.requests)
    scaling = engine._summary_extra()["clock_scaling"]
    assert scaling["scaled"] and scaling["factor_median"] == scaling["factor_min"] == scaling["factor_max"] == 2.0
    rows = res.recorder.rows
    assert scaling["factors"] == len(rows) > 0
    end = 0
    for row in rows:
        assert row.start >= end and row.duration >= to_ns(2.0 * row.info["wall_s"]) - 1
        end = row.start + row.duration


def test_measured_clock_without_a_reference_is_unscaled_and_says_why(tmp_path):
    engine = build_engine(_cfg("runtime.clock=measured", "workload.num_requests=4",
                               f"profile.path={_profile_with_reference(tmp_path, 0.0)}"))   # 0: none recorded
    res = engine.run()
    assert all(r.done for r in res.requests)
    scaling = engine._summary_extra()["clock_scaling"]
    assert not scaling["scaled"] and "provenance.reference_probe_s" in scaling["why"]


def test_measured_clock_refuses_a_reference_timed_with_another_probe(tmp_path):
    """A reference time is only comparable with the probe that measured it: another probe's (an older
    profile's 384x384 matmul alone) leaves the clock unscaled and names the key and the remedy."""
    engine = build_engine(_cfg("runtime.clock=measured", "workload.num_requests=4",
                               f"profile.path={_profile_with_reference(tmp_path, 0.0015, '384x384 float32 matmul')}"))
    res = engine.run()
    assert all(r.done for r in res.requests)
    scaling = engine._summary_extra()["clock_scaling"]
    assert not scaling["scaled"] and "provenance.reference_probe" in scaling["why"]
    assert "384x384 float32 matmul" in scaling["why"] and "dlora-calibrate" in scaling["why"]


@pytest.mark.parametrize("override,key", [
    ("runtime.workers=threads", "runtime.workers"),
    ("+runtime.ray.bogus=1", "runtime.ray.bogus"),
    ("system=vllm", "cluster.replica.weights"),
    ("cluster.replica.merge=pristine_host", "cluster.replica.merge"),
    ("runtime.dtype=float64", "runtime.dtype"),
    ("runtime.device=cuda", "runtime.device"),
    ("+runtime.bogus=1", "runtime.bogus"),
    ("cluster.replica.chunked_prefill=true", "cluster.replica.chunked_prefill"),
    ("cluster.replica.max_num_batched_tokens=32", "cluster.replica.chunked_prefill"),   # auto turns it on
    ("cluster.replica.host_adapter_cache=2", "cluster.replica.host_adapter_cache"),   # tiers: virtual clock only
    ("cluster.replica.prefix_caching=true", "cluster.replica.prefix_caching"),
    ("cluster.replica.max_lora_rank=16", "cluster.replica.max_lora_rank"),   # rank padding: virtual clock only
])
def test_what_the_runtime_cannot_serve_is_refused_naming_the_key(override, key):
    if override == "runtime.device=cuda":
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is here")
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        build_engine(_cfg(override)).run()


def test_rejected_requests_are_reported_not_served():
    engine = build_engine(_cfg("runtime.clock=virtual", "workload.num_requests=8",
                               "cluster.replica.max_num_batched_tokens=32", "cluster.replica.chunked_prefill=false"))
    res = engine.run()
    rejected = [r for r in res.requests if r.state == State.REJECTED]
    assert rejected and all("max_num_batched_tokens" in r.reject_reason for r in rejected)
    assert all(r.state in (State.FINISHED, State.REJECTED) for r in res.requests)
