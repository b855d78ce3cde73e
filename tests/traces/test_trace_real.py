"""The loaders against the published traces: counts and statistics recomputed here independently."""
from __future__ import annotations

import csv
import json
from datetime import datetime

import numpy as np
import pytest

from dlora_sim.traces.azure_llm import load_azure_llm
from dlora_sim.traces.mooncake import load_mooncake
from dlora_sim.traces import servegen
from trace_files import need

AZURE = "azure-llm-inference-2023/AzureLLMInferenceTrace_{}.csv"
MOONCAKE = "mooncake-fast25/{}_trace.jsonl"
M_LARGE = "servegen/data/language/m-large"
M_SMALL = "servegen/data/language/m-small"


def _csv_reference(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ts = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]  # microseconds are enough here
    span = (max(ts) - min(ts)).total_seconds()
    return len(rows), np.mean([int(r["ContextTokens"]) for r in rows]), np.mean([int(r["GeneratedTokens"]) for r in rows]), span


@pytest.mark.parametrize("service,count", [("conv", 19366), ("code", 8819)])
def test_azure_llm_matches_file(shared, service, count):
    path = need(shared, AZURE.format(service))
    raw = load_azure_llm(path)
    n, mean_p, mean_o, span = _csv_reference(path)
    assert len(raw) == n == count
    assert raw.prompt_tokens.mean() == pytest.approx(mean_p)
    assert raw.output_tokens.mean() == pytest.approx(mean_o)
    assert raw.arrival_s[0] == 0.0 and np.all(np.diff(raw.arrival_s) >= 0)
    assert raw.arrival_s[-1] == pytest.approx(span, abs=1e-5)


@pytest.mark.parametrize("name,count", [("conversation", 12031), ("synthetic", 3993)])
def test_mooncake_matches_file(shared, name, count):
    path = need(shared, MOONCAKE.format(name))
    recs = [json.loads(line) for line in open(path)]
    raw = load_mooncake(path)
    assert len(raw) == len(recs) == count
    assert raw.prompt_tokens.sum() == sum(r["input_length"] for r in recs)
    assert raw.output_tokens.sum() == sum(r["output_length"] for r in recs)
    ts = [r["timestamp"] for r in recs]
    assert raw.arrival_s[-1] == pytest.approx((max(ts) - min(ts)) / 1000)


@pytest.fixture(scope="module")
def m_large(shared):
    return need(shared, M_LARGE)


def _day_counts(folder):
    """Recorded requests per client over day 1, read with the csv module (rate x 600 s)."""
    out = {}
    for p in folder.glob("chunk-*-trace.csv"):
        client = p.name.split("-")[1]
        with open(p, newline="") as fh:
            out[client] = sum(float(r[1]) * 600 for r in csv.reader(fh) if float(r[0]) < 86400)
    return out


def test_servegen_clients_keep_their_share_over_a_day(m_large):
    expected = _day_counts(m_large)
    total = sum(expected.values())
    scale = 0.002  # ~48k requests instead of 24 M
    raw = servegen.generate(m_large, seed=7, start_s=0.0, end_s=86400.0, rate_scale=scale)
    assert raw.arrival_s.min() >= 0 and raw.arrival_s.max() < 86400
    keys, counts = np.unique(raw.key.astype(str), return_counts=True)
    got = dict(zip(keys, counts))
    assert len(raw) == pytest.approx(total * scale, abs=len(expected))
    for client, exp in expected.items():
        share_exp = exp / total
        share_got = got.get(client, 0) / len(raw)
        assert abs(share_got - share_exp) <= 0.02 * max(share_exp, 1.0 / len(raw) * 50), client
        assert abs(got.get(client, 0) - exp * scale) <= 1.0 + 1e-6  # cumulative rounding: within one request


def test_servegen_unscaled_window_count_is_the_recorded_count(m_large):
    """At rate_scale 1 a window's generated count equals rate x 600 (the real count)."""
    series = servegen.read_client(m_large / "chunk-0-trace.csv", "0", end_s=3600)
    t = servegen.generate_arrivals(series, seed=1, start_s=0, end_s=3600)
    per_window = np.bincount((t // 600).astype(int), minlength=6)
    assert per_window.tolist() == np.round(series.rate * 600).astype(int).tolist()


def test_servegen_small_lengths_come_from_the_clients_distribution(shared):
    folder = need(shared, M_SMALL)
    path = folder / "chunk-0-dataset.json"
    doc = json.load(open(path))
    window = next(k for k, v in doc.items() if v["input_tokens"] != "{}")
    support = {int(k) for k in eval(doc[window]["input_tokens"], {"__builtins__": {}}).keys()}  # trusted test data
    t = np.full(500, float(window) + 10.0)
    prompts, outputs = servegen.sample_client_lengths(folder, "0", t, seed=3, fallback=None)
    assert set(prompts.tolist()) <= support
    assert outputs.min() >= 0
