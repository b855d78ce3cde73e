"""Trace statistics: skew measures on known inputs, and stats of real traces recomputed independently."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import trace_files as tf
from dlora_sim.traces.stats import gini, save_charts, stats_from_requests, top_share, trace_stats
from dlora_sim.traces.raw import RawRequests


def test_gini_and_top_share_known_values():
    assert gini(np.ones(10)) == 0.0
    assert gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)  # (n-1)/n for one source with everything
    assert top_share(np.array([50] + [5] * 10)) == pytest.approx(55 / 100)  # top 10% of 11 sources = 2 sources
    assert top_share(np.ones(20)) == pytest.approx(0.1)


def test_stats_of_a_keyed_trace(tmp_path):
    raw = RawRequests(np.array([0.0, 10.0, 70.0, 130.0]), np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8]),
                      np.array(["a", "a", "a", "b"], dtype=object))
    s = stats_from_requests("t", raw, bin_s=60.0)
    assert s.requests == 4 and s.sources == 2 and s.top10_share == 0.75
    assert s.rate_series.tolist() == pytest.approx([2 / 60, 1 / 60, 1 / 60])
    assert s.prompt["p50"] == 2.5
    names = {p.name for p in save_charts(s, tmp_path)}
    assert names == {"t-rate.png", "t-lengths.png", "t-popularity.png"}


def test_azure_conv_stats_match_the_file(shared):
    path = tf.need(shared, "azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    prompt = np.array([int(r["ContextTokens"]) for r in rows])
    output = np.array([int(r["GeneratedTokens"]) for r in rows])
    s = trace_stats("azure_conv", path=str(path))
    assert s.requests == 19366
    for q in (50, 90, 99):
        assert s.prompt[f"p{q}"] == np.percentile(prompt, q)
        assert s.output[f"p{q}"] == np.percentile(output, q)
    assert s.mean_rate == pytest.approx(19366 / s.duration_s)


def test_servegen_large_stats_match_the_files(shared):
    folder = tf.need(shared, "servegen/data/language/m-large")
    total = 0.0
    per_client = []
    for p in folder.glob("chunk-*-trace.csv"):
        with open(p, newline="") as fh:
            c = sum(float(r[1]) * 600 for r in csv.reader(fh))
        total += c
        per_client.append(c)
    s = trace_stats("servegen_large", path=str(folder))
    assert s.requests == pytest.approx(total)
    assert s.sources == sum(c > 0 for c in per_client)
    assert s.gini == pytest.approx(gini(np.array([c for c in per_client if c > 0])))
