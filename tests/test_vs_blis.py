"""benchmarks/vs_blis.py hands BLIS the very requests ours replays, in the layout BLIS reads, with our load cost
(BLIS itself is not installed here: it is built offline, ../shared/blis/README.md)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import vs_blis  # noqa: E402
from dlora_sim.core.profile import load_profile  # noqa: E402


def test_the_trace_is_the_request_list_in_microseconds_with_adapter_names(tmp_path):
    case = vs_blis.Case(2, 4)
    rows = vs_blis.requests(case, per_replica=50)
    header, data, lora = vs_blis.write_blis_inputs(rows, case, tmp_path)
    assert yaml.safe_load(header.read_text())["trace_version"] == 3
    with data.open(newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == vs_blis.TRACE_COLUMNS and len(lines) == len(rows) + 1 == 101
    assert all(len(line) == len(vs_blis.TRACE_COLUMNS) for line in lines)
    col = {name: i for i, name in enumerate(lines[0])}
    for line, (t, a, p, o) in zip(lines[1:], rows):
        assert int(line[col["arrival_time_us"]]) == round(t * 1e6)
        assert (int(line[col["input_tokens"]]), int(line[col["output_tokens"]])) == (p, o)
        assert line[col["adapter"]] == f"a{a}"
        assert line[col["send_time_us"]] == line[col["server_input_tokens"]] == "0"   # either would override
    reg = yaml.safe_load(lora.read_text())["lora"]
    prof = load_profile("a100-80gb-llama-2-7b")
    assert reg["adapter_capacity"] == 4
    assert reg["footprint_bytes_per_rank"] == prof.model.adapter_bytes_per_rank
    assert reg["load_bandwidth_bytes_us"] * 1e6 == pytest.approx(prof.transfers.host_to_gpu_bytes_per_s)
    assert {a["id"] for a in reg["adapters"]} >= {f"a{a}" for _, a, _, _ in rows}   # BLIS's replay checks no names


def test_without_lora_no_request_names_an_adapter_and_no_registry_is_written(tmp_path):
    case = vs_blis.Case(1, None)
    rows = vs_blis.requests(case, per_replica=20)
    _, data, lora = vs_blis.write_blis_inputs(rows, case, tmp_path)
    with data.open(newline="") as f:
        assert {r["adapter"] for r in csv.DictReader(f)} == {""}
    assert lora is None and not (tmp_path / "lora.yaml").exists()


def test_a_missing_blis_build_is_named(tmp_path):
    with pytest.raises(SystemExit, match="not a BLIS binary in its source folder"):
        vs_blis.main(["--blis", str(tmp_path / "blis")])
