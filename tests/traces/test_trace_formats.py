"""Loaders on small files written in the published formats, and malformed input naming file + line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dlora_sim.traces import TraceFormatError
from dlora_sim.traces.azure_functions import generate_maf2019, load_maf2021, read_maf2019
from dlora_sim.traces.azure_llm import load_azure_llm
from dlora_sim.traces.mapping import AdapterMapping
from dlora_sim.traces.mooncake import load_mooncake
from dlora_sim.traces import servegen
import trace_files as formats


def test_azure_llm_small(tmp_path):
    p = formats.azure_llm_csv(tmp_path / "a.csv", [("2023-11-16 18:00:00.5000000", 10, 2),
                                                   ("2023-11-16 18:00:02.0000000", 20, 3),
                                                   ("2023-11-16 18:01:00.2500000", 30, 4)])
    raw = load_azure_llm(p)
    assert raw.arrival_s.tolist() == pytest.approx([0.0, 1.5, 59.75])
    assert raw.prompt_tokens.tolist() == [10, 20, 30] and raw.output_tokens.tolist() == [2, 3, 4]


def test_mooncake_small(tmp_path):
    raw = load_mooncake(formats.mooncake_jsonl(tmp_path / "m.jsonl", [(1000, 5, 1), (500, 7, 2)]))
    assert raw.arrival_s.tolist() == [0.0, 0.5]  # sorted, relative, seconds
    assert raw.prompt_tokens.tolist() == [7, 5]


def test_mooncake_keeps_each_requests_hash_ids_through_sorting_windowing_and_capping(tmp_path):
    """hash_ids become the workload's prefixes, still beside their own request after the trace is sorted by
    arrival, windowed and capped (prefix caching matches on them)."""
    from dlora_sim.traces.workloads import MooncakeWorkload
    p = tmp_path / "m.jsonl"
    rows = [(3000, 1100, 2, [9, 8, 7]), (1000, 600, 2, [1, 2]), (2000, 50, 2, [1]), (4000, 600, 2, [5, 6])]
    p.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": o, "hash_ids": h}) + "\n"
                         for t, n, o, h in rows))
    assert [tuple(x) for x in load_mooncake(p).prefix] == [(1, 2), (1,), (9, 8, 7), (5, 6)]
    w = MooncakeWorkload(path=str(p), num_adapters=2, start_s=1.0, max_requests=2).build(seed=0)
    assert [(r.prompt_tokens, pre) for r, pre in zip(w.requests, w.prefixes)] == [(50, (1,)), (1100, (9, 8, 7))]
    assert w.prefix_block_tokens == 512


def test_mooncake_hash_ids_that_are_not_integers_are_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, "x"]}\n')
    with pytest.raises(TraceFormatError, match="hash_ids") as err:
        load_mooncake(p)
    _assert_names(err, p, 1)


def _assert_names(err, path, line):
    msg = str(err.value)
    assert str(path) in msg and f":{line}" in msg, msg
    assert err.value.line == line


AZ_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZ_OK = "2023-11-16 18:00:00.5000000,10,2\n"


@pytest.mark.parametrize("body,line,column", [
    (AZ_OK + "2023-13-45 99:00:00.1,10,2\n", 3, "TIMESTAMP"),       # bad timestamp
    (AZ_OK + "yesterday,10,2\n", 3, "TIMESTAMP"),
    (AZ_OK + AZ_OK + "2023-11-16 18:00:01.0,-5,2\n", 4, "ContextTokens"),  # negative length
    (AZ_OK + "2023-11-16 18:00:01.0,10,abc\n", 3, "GeneratedTokens"),
    (AZ_OK + "2023-11-16 18:00:01.0,10", 3, None),                  # truncated row
])
def test_azure_llm_malformed(tmp_path, body, line, column):
    p = tmp_path / "bad.csv"
    p.write_text(AZ_HEADER + body)
    with pytest.raises(TraceFormatError) as err:
        load_azure_llm(p)
    _assert_names(err, p, line)
    assert err.value.column == column


def test_missing_column_names_file_and_column(tmp_path):
    p = tmp_path / "nocol.csv"
    p.write_text("TIMESTAMP,ContextTokens\n" + "2023-11-16 18:00:00.5,10\n")
    with pytest.raises(TraceFormatError, match="GeneratedTokens") as err:
        load_azure_llm(p)
    assert str(p) in str(err.value)


@pytest.mark.parametrize("lines,bad_line,what", [
    (['{"timestamp": 0, "input_length": 5, "output_length": 1}', '{"timestamp": 10, "input_len'], 2, "JSON"),
    (['{"timestamp": 0, "input_length": 5, "output_length": 1}', '{"timestamp": 10, "input_length": -3, "output_length": 1}'], 2, "input_length"),
    (['{"timestamp": "noon", "input_length": 5, "output_length": 1}'], 1, "timestamp"),
    (['{"timestamp": 0, "input_length": 5, "output_length": 1}', '', '{"timestamp": 3, "input_length": 5}'], 3, "output_length"),
])
def test_mooncake_malformed(tmp_path, lines, bad_line, what):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines))
    with pytest.raises(TraceFormatError, match=what) as err:
        load_mooncake(p)
    _assert_names(err, p, bad_line)


@pytest.mark.parametrize("row,column", [
    ("600,-1,1,Gamma,1,1", "rate"),
    ("600,1,1,Lognormal,1,1", "family"),
    ("600,1,1,Gamma,0,1", "shape"),
    ("oops,1,1,Gamma,1,1", "window_start_s"),
    ("600,1,1", None),  # truncated
])
def test_servegen_malformed(tmp_path, row, column):
    p = tmp_path / "chunk-3-trace.csv"
    p.write_text("0,0.1,1.0,Gamma,1.0,10.0\n" + row + "\n")
    with pytest.raises(TraceFormatError) as err:
        servegen.read_client(p, "3")
    _assert_names(err, p, 2)
    assert err.value.column == column


def test_servegen_truncated_dataset_json(tmp_path):
    p = tmp_path / "chunk-3-dataset.json"
    p.write_text('{"0": {"input_tokens": "{5: 1.0}", "output_tokens": "{2: 1.0}"},\n "21600": {"inp')
    with pytest.raises(TraceFormatError) as err:
        servegen.read_lengths(str(p))
    assert str(p) in str(err.value) and err.value.line == 2


def test_maf2019_malformed(tmp_path):
    p = formats.maf2019_csv(tmp_path / "d01.csv", {"f1": {1: 3}, "f2": {2: 1}})
    lines = p.read_text().splitlines()
    lines[2] = lines[2].replace(",1,", ",-1,", 1)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError, match="must be >= 0") as err:
        read_maf2019(p)
    _assert_names(err, p, 3)
    p.write_text("\n".join(lines[:2] + [lines[2][:50]]))  # truncated last row
    with pytest.raises(TraceFormatError, match="truncated") as err:
        read_maf2019(p)
    _assert_names(err, p, 3)


def test_maf2021_malformed(tmp_path):
    p = formats.maf2021_csv(tmp_path / "t.txt", [("a", "f", 10.0, 1.0), ("a", "f", "later", 1.0)])
    with pytest.raises(TraceFormatError) as err:
        load_maf2021(p)
    _assert_names(err, p, 3)
    assert err.value.column == "end_timestamp"


def test_maf2019_counts_become_arrivals_in_their_minute(tmp_path):
    p = formats.maf2019_csv(tmp_path / "d01.csv", {"hot": {1: 30, 3: 12}, "warm": {2: 5}, "cold": {1440: 1}})
    raw = generate_maf2019(p, seed=0)
    keys = raw.key.astype(str)
    for fn, minute, n in [("hot", 0, 30), ("hot", 2, 12), ("warm", 1, 5), ("cold", 1439, 1)]:
        t = raw.arrival_s[keys == fn]
        assert ((t >= minute * 60) & (t < minute * 60 + 60)).sum() == n
    assert len(raw) == 48
    # the dLoRA mapping: hot (rank 0) -> adapter 0, warm -> 1, cold -> 0 with 2 adapters, stride 1
    adapters, k = AdapterMapping("map_stride", 2, 1).assign(raw.key, len(raw), np.random.default_rng(0))
    assert k == 2
    assert set(adapters[keys == "hot"]) == {0} and set(adapters[keys == "warm"]) == {1} and set(adapters[keys == "cold"]) == {0}


def test_maf2019_gamma_cv_is_kept(tmp_path):
    """Many arrivals in one minute: CV of the gaps follows the configured Gamma CV."""
    p = formats.maf2019_csv(tmp_path / "d01.csv", {"f": {1: 20000}})
    for cv in (0.5, 2.0):
        gaps = np.diff(generate_maf2019(p, seed=1, cv=cv).arrival_s)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_maf2021_arrival_is_end_minus_duration(tmp_path):
    p = formats.maf2021_csv(tmp_path / "t.txt", [("a", "f1", 10.0, 4.0), ("a", "f2", 7.0, 0.5), ("b", "f1", 20.0, 1.0)])
    raw = load_maf2021(p)
    assert raw.arrival_s.tolist() == [0.0, 0.5, 13.0]
    assert raw.key.tolist() == ["f1", "f2", "f1"]
