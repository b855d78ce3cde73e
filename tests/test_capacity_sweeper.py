"""The capacity sweeper (dlora_sim/capacity.py) end to end through Hydra, and its report when the bisected knob is
not the request rate (a trace's rate_scale): capacities in req/s from the met runs' offered rates."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from dlora_sim.capacity import Search, write_results

ROOT = Path(__file__).resolve().parents[1]
SIM = str(Path(sys.executable).parent / "dlora-sim")


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_small_capacity_sweep_brackets_each_arms_capacity(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([SIM, "--multirun", "hydra/sweeper=capacity", "hydra/launcher=basic", "system=slora,merged",
                           "cluster.num_replicas=1", "workload.num_adapters=4", "hydra.sweeper.rate_low=0.5",
                           "hydra.sweeper.rate_high=64", "hydra.sweeper.rounds=4", "hydra.sweeper.run_lengths=[20]",
                           "hydra.sweeper.fixed_loads=[2]", "charts=false", "progress=false", "keep_iterations=false", f"hydra.sweep.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    caps = {r["arm"]: r for r in _rows(out / "capacity.csv")}
    assert set(caps) == {"system=slora", "system=merged"}
    probes = _rows(out / "capacity_probes.csv")
    assert len(probes) == 2 * 4
    for arm, row in caps.items():
        mine = [p for p in probes if p["arm"] == arm]
        met = [float(p["rate"]) for p in mine if p["met"] == "True"]
        missed = [float(p["rate"]) for p in mine if p["met"] == "False"]
        cap = float(row["capacity_rps"]) if row["capacity_rps"] else None
        assert cap == (max(met) if met else None)
        assert all(r > (cap or 0) for r in missed) and float(row["first_failed_rps"]) == min(missed, default=64.0)
        assert all(int(p["num_requests"]) == max(1, round(20 * float(p["rate"]))) for p in mine)
    assert (out / "capacity.png").exists()
    fixed = _rows(out / "fixed_load.csv")   # every arm first ran at the same load, 20 x 2 requests
    assert sorted(r["arm"] for r in fixed) == ["system=merged", "system=slora"]
    assert all(float(r["workload.rate"]) == 2 and r["num_requests"] == r["completed"] == "40" and r["p99_ttft_s"]
               for r in fixed)
    assert len({r["folder"] for r in fixed} | {p["folder"] for p in probes}) == 2 + 2 * 4


def test_a_knob_other_than_the_rate_reports_capacity_as_the_met_runs_offered_rate(tmp_path):
    s = Search(["system=slora"], 100.0, 0.01, 1.0)
    s.probes = [{"rate": 0.1, "num_requests": 500, "offered_rps": 2.5, "mean_s_per_token": 0.1, "rejected_share": 0.0,
                 "met": True, "folder": "a"},
                {"rate": 0.3, "num_requests": 1500, "offered_rps": 7.4, "mean_s_per_token": 0.9, "rejected_share": 0.0,
                 "met": False, "folder": "b"}]
    s.lo, s.lo_met, s.hi = 0.1, True, 0.3
    (row,) = write_results(tmp_path, [s], 0.5, "workload.rate_scale")
    assert row["capacity_rps"] == 2.5 and row["capacity_rate_scale"] == 0.1 and row["first_failed_rate_scale"] == 0.3
    assert _rows(tmp_path / "capacity_probes.csv")[0]["offered_rps"] == "2.5"


@pytest.mark.skipif(not (ROOT.parent / "shared" / "traces" / "servegen").exists(), reason="ServeGen trace not here")
def test_a_trace_is_bisected_on_its_rate_scale(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([SIM, "--multirun", "hydra/sweeper=capacity", "hydra/launcher=basic", "system=slora",
                           "workload=servegen_small", "workload.end_s=72600", "cluster.num_replicas=2",
                           "hydra.sweeper.rate_key=workload.rate_scale", "hydra.sweeper.count_key=null",
                           "hydra.sweeper.rate_low=0.0005", "hydra.sweeper.rate_high=0.05", "hydra.sweeper.rounds=3",
                           "charts=false", "progress=false", "keep_iterations=false", f"hydra.sweep.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = _rows(out / "capacity.csv")
    probes = _rows(out / "capacity_probes.csv")
    assert "capacity_rate_scale" in row and len(probes) == 3
    if row["capacity_rps"]:
        met = next(p for p in probes if p["met"] == "True" and float(p["rate"]) == float(row["capacity_rate_scale"]))
        assert float(row["capacity_rps"]) == float(met["offered_rps"])
