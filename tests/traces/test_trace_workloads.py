"""Workload sources end to end: Hydra configs, determinism, ServeGen and Azure Functions on small files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hydra.utils import instantiate

import trace_files as tf
from dlora_sim.core.config import compose
from dlora_sim.traces import servegen
from dlora_sim.traces.lengths import FixedLengths, UniformLengths
from dlora_sim.traces.workloads import (AzureLLMWorkload, MAF2019Workload, MAF2021Workload,
                                        ServeGenWorkload)

NAMES = ["azure_conv", "azure_code", "mooncake", "servegen_large", "servegen_small", "maf2019", "maf2021"]


def _compose(name: str, *overrides: str):
    return compose([f"workload={name}", *overrides]).workload


@pytest.mark.parametrize("name", NAMES)
def test_every_config_instantiates(name):
    src = instantiate(_compose(name))
    assert callable(src.build)


def _signature(w):
    return [(r.arrival_s, r.adapter, r.prompt_tokens, r.output_tokens) for r in w.requests]


@pytest.fixture(scope="module")
def azure_conv_workload(shared):
    tf.need(shared, "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv")
    return instantiate(_compose("azure_conv")).build(0)


def test_azure_conv_config_builds_the_whole_trace(azure_conv_workload):
    w = azure_conv_workload
    assert len(w.requests) == 19366 and len(w.adapters) == 32
    assert w.meta["trace"] == "azure_conv"


def test_same_seed_same_workload_other_seed_other_mapping(shared, azure_conv_workload):
    src = instantiate(_compose("azure_conv"))
    assert _signature(src.build(0)) == _signature(azure_conv_workload)
    other = src.build(1)
    assert [r.arrival_s for r in other.requests] == [r.arrival_s for r in azure_conv_workload.requests]
    assert [r.adapter for r in other.requests] != [r.adapter for r in azure_conv_workload.requests]


def test_azure_window_time_and_rate_scale(shared):
    path = tf.need(shared, "azure-llm-inference-2023/AzureLLMInferenceTrace_code.csv")
    base = AzureLLMWorkload(service="code", path=str(path), start_s=600, end_s=1800).build(3)
    fast = AzureLLMWorkload(service="code", path=str(path), start_s=600, end_s=1800, time_scale=0.5).build(3)
    half = AzureLLMWorkload(service="code", path=str(path), start_s=600, end_s=1800, rate_scale=0.5).build(3)
    assert base.duration_s < 1200
    np.testing.assert_allclose([r.arrival_s for r in fast.requests], [r.arrival_s / 2 for r in base.requests])
    cb = np.bincount([r.adapter for r in base.requests], minlength=32)
    ch = np.bincount([r.adapter for r in half.requests], minlength=32)
    assert np.all(np.abs(ch - cb / 2) <= 1)


def test_servegen_large_config(shared):
    tf.need(shared, "servegen/data/language/m-large")
    src = instantiate(_compose("servegen_large"))
    w = src.build(0)
    assert 5_000 < len(w.requests) < 30_000
    assert w.duration_s < 3600
    assert w.meta["num_keys"] == len(w.adapters)
    assert _signature(src.build(0)) == _signature(w)


# ---- ServeGen on a small generated folder ----

@pytest.fixture
def servegen_folder(tmp_path):
    d = tmp_path / "m-test"
    d.mkdir()
    tf.servegen_csv(d / "chunk-0-trace.csv", [(0, 0.5, 1.0, "Gamma", 1.0, 2.0), (600, 0, 0, "", 0, 0), (1200, 0.1, 3.0, "Weibull", 0.4, 1.0)])
    tf.servegen_csv(d / "chunk-1-trace.csv", [(0, 0.05, 1.0, "Gamma", 1.0, 20.0), (600, 0.2, 2.0, "Gamma", 0.25, 20.0), (1200, 0.0, 0, "", 0, 0)])
    tf.servegen_csv(d / "chunk-2-trace.csv", [(0, 0.01, 1.0, "Gamma", 1.0, 100.0), (600, 0.01, 1.0, "Gamma", 1.0, 100.0), (1200, 0.01, 1.0, "", 0, 0)])
    (d / "chunk-0-dataset.json").write_text(json.dumps({
        "0": {"input_tokens": "{100: 0.5, 200: 0.5}", "output_tokens": "{7: 1.0}"},
        "21600": {"input_tokens": "{}", "output_tokens": "{}"}}))
    return d


def test_servegen_counts_mapping_and_lengths(servegen_folder):
    w = ServeGenWorkload(path=str(servegen_folder), start_s=0, end_s=1800, lengths=FixedLengths(50, 5)).build(0)
    # exact recorded counts: client 0: 300 + 60, client 1: 30 + 120, client 2: 6 + 6 + 6
    by_key = {k: 0 for k in "012"}
    for key, adapter in w.meta["adapter_of_key"].items():
        by_key[key] = sum(r.adapter == adapter for r in w.requests)
    assert by_key == {"0": 360, "1": 150, "2": 18}
    a0 = w.meta["adapter_of_key"]["0"]
    assert a0 == 0  # most popular client -> adapter 0
    assert {r.prompt_tokens for r in w.requests if r.adapter == a0} == {100, 200}
    assert {(r.prompt_tokens, r.output_tokens) for r in w.requests if r.adapter != a0} == {(50, 5)}


def test_servegen_client_streams_are_independent(servegen_folder):
    all_clients = servegen.generate(servegen_folder, seed=5, end_s=1800)
    only_1 = servegen.generate(servegen_folder, seed=5, end_s=1800, clients=["1"])
    np.testing.assert_array_equal(all_clients.arrival_s[all_clients.key == "1"], only_1.arrival_s)


def test_servegen_map_stride_over_clients(servegen_folder):
    w = ServeGenWorkload(path=str(servegen_folder), end_s=1800, mapping="map_stride", num_adapters=2,
                         map_stride=1, lengths=FixedLengths()).build(0)
    assert w.meta["adapter_of_key"] == {"0": 0, "1": 1, "2": 0}


def test_servegen_without_lengths_needs_a_fallback(servegen_folder):
    with pytest.raises(ValueError, match="no length distribution"):
        ServeGenWorkload(path=str(servegen_folder), end_s=1800).build(0)


# ---- Azure Functions workloads on generated files ----

def test_maf2019_workload(tmp_path):
    p = tf.maf2019_csv(tmp_path / "d01.csv", {f"f{i}": {m: max(0, 20 - i) for m in range(1, 61)} for i in range(12)})
    src = MAF2019Workload(path=str(p), end_s=3600, num_adapters=4, map_stride=2, top_functions=10,
                          lengths=UniformLengths(8, 512, 8, 512))
    w = src.build(0)
    assert len(w.requests) == sum(max(0, 20 - i) * 60 for i in range(10))
    counts = np.bincount([r.adapter for r in w.requests], minlength=4)
    # stride 2: ranks {0,1,8,9} -> 0, {2,3} -> 1, {4,5} -> 2, {6,7} -> 3
    per_rank = [(20 - i) * 60 for i in range(10)]
    expected = [per_rank[0] + per_rank[1] + per_rank[8] + per_rank[9], per_rank[2] + per_rank[3],
                per_rank[4] + per_rank[5], per_rank[6] + per_rank[7]]
    assert counts.tolist() == expected
    assert all(8 <= r.prompt_tokens < 512 for r in w.requests)
    assert _signature(src.build(0)) == _signature(w)
    half = MAF2019Workload(path=str(p), end_s=3600, num_adapters=4, map_stride=2, top_functions=10,
                           rate_scale=0.1, lengths=FixedLengths()).build(0)
    assert abs(len(half.requests) - len(w.requests) * 0.1) <= 10


def test_maf2021_workload(tmp_path):
    rows = [("a", f"f{i % 3}", 100.0 + i, 0.5) for i in range(30)]
    p = tf.maf2021_csv(tmp_path / "t.txt", rows)
    w = MAF2021Workload(path=str(p), num_adapters=2, end_s=None, lengths=FixedLengths(16, 4)).build(0)
    assert len(w.requests) == 30 and len(w.adapters) == 2
    assert w.requests[0].arrival_s == 0.0 and w.requests[-1].arrival_s == pytest.approx(29.0)


def test_trace_without_lengths_and_no_lengths_source_is_an_error(tmp_path):
    p = tf.maf2021_csv(tmp_path / "t.txt", [("a", "f", 1.0, 0.5)])
    with pytest.raises(ValueError, match="no token lengths"):
        MAF2021Workload(path=str(p), lengths=None).build(0)


def test_a_system_prompt_per_client_opens_each_of_its_requests(servegen_folder):
    """`shared_prefix_tokens`: every request of a client opens with that client's prompt (added to its length); its
    whole blocks hash alike within a client and differ between clients, the rest of each prompt is its own."""
    w = ServeGenWorkload(path=str(servegen_folder), start_s=0, end_s=1800, lengths=FixedLengths(50, 5),
                         shared_prefix_tokens=1100).build(0)
    assert {r.prompt_tokens - 1100 for r in w.requests} == {50, 100, 200}   # client 0's own lengths, the fallback
    by_client: dict = {}
    for r, p in zip(w.requests, w.prefixes):
        assert len(p) == 3 and p[2] < 0   # 1,150-1,300 tokens: two shared 512-token blocks, then its own
        by_client.setdefault(r.adapter, set()).add(p[:2])
    assert all(len(v) == 1 for v in by_client.values()) and len(set().union(*by_client.values())) == len(by_client)
    assert len({p[2] for p in w.prefixes}) == len(w.requests)


def test_a_system_prompt_per_client_needs_a_trace_that_names_clients(tmp_path):
    from dlora_sim.traces.workloads import MooncakeWorkload
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n')
    with pytest.raises(ValueError, match="shared_prefix_tokens"):
        MooncakeWorkload(path=str(p), num_adapters=1, shared_prefix_tokens=512).build(0)


def test_a_system_prompt_per_adapter_on_a_trace_without_clients(tmp_path):
    """`shared_prefix_by=adapter`: each adapter's requests open with its own prompt, on a trace that names no
    clients (Azure conv); the key-less trace by key is still an error naming the alternative."""
    rows = [(f"2023-11-16 18:15:{i:02d}.0000000", 600 + i, 5) for i in range(40)]
    p = tf.azure_llm_csv(tmp_path / "conv.csv", rows)
    w = AzureLLMWorkload(path=str(p), num_adapters=4, mapping="uniform", shared_prefix_tokens=1024,
                         shared_prefix_by="adapter").build(0)
    assert [r.prompt_tokens for r in w.requests] == [r[1] + 1024 for r in rows]
    by_adapter: dict = {}
    for r, pre in zip(w.requests, w.prefixes):
        assert len(pre) == 4 and pre[2] < 0 and pre[3] < 0   # 1,624-1,663 tokens: two shared blocks, two its own
        by_adapter.setdefault(r.adapter, set()).add(pre[:2])
    assert len(by_adapter) == 4 and all(len(v) == 1 for v in by_adapter.values())
    assert len(set().union(*by_adapter.values())) == 4
    with pytest.raises(ValueError, match="shared_prefix_by=adapter"):
        AzureLLMWorkload(path=str(p), num_adapters=4, shared_prefix_tokens=1024).build(0)
    with pytest.raises(ValueError, match="shared_prefix_by must be"):
        AzureLLMWorkload(path=str(p), num_adapters=4, shared_prefix_tokens=1024, shared_prefix_by="client").build(0)
