"""The Python API: simulate() equals the CLI run, load() reads every kind of results folder with typed
columns, load_sweep() tabulates a multirun, traces.load() gives the canonical request table, a bad
override raises the CLI's one-line error, and the worked example in docs/ runs."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import dlora_sim
import dlora_sim.traces as traces
from dlora_sim.core.config import ConfigError

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
SMALL = ["workload.num_requests=150", "cluster.num_replicas=2"]


def _cli(tmp: Path, app: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / app), *args], cwd=tmp, capture_output=True, text=True, timeout=300)


def test_simulate_gives_the_cli_runs_files_and_frames(tmp_path):
    run = _cli(tmp_path, "dlora-sim", "system=dlora", *SMALL, "seed=3", "charts=false", f"hydra.run.dir={tmp_path / 'cli'}")
    assert run.returncode == 0, run.stderr[-2000:]
    res = dlora_sim.simulate("dlora", overrides=SMALL, seed=3, out=tmp_path / "api")
    for name in ("requests.csv", "iterations.csv"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    cli = dlora_sim.load(tmp_path / "cli")
    pd.testing.assert_frame_equal(res.requests, cli.requests)
    pd.testing.assert_frame_equal(res.iterations, cli.iterations)
    assert res.summary["system"] == "dlora" and res.config["seed"] == 3 and len(res.requests) == 150


def test_frames_have_typed_columns(tmp_path):
    res = dlora_sim.simulate("dlora", overrides=[*SMALL, "workload.rate=40", "cluster.replica.max_kv_blocks=300"],
                             out=tmp_path)
    r, it = res.requests, res.iterations
    assert r["status"].dtype == "category" and set(r["status"].cat.categories) == {"finished", "rejected", "unfinished"}
    assert r["replica"].dtype == "Int64" and r["reject_reason"].dtype == "string"
    assert all(r[c].dtype == "float64" for c in r if c.endswith("_s"))
    assert all(r[c].dtype == "int64" for c in ("id", "adapter", "prompt_tokens", "output_tokens", "preempted"))
    assert it["mode"].dtype == "category" and it["merged_adapter"].dtype == "Int64" and it["forced"].dtype == bool
    assert it.loc[it["mode"] == "unmerged", "merged_adapter"].isna().all()
    assert it.loc[it["mode"] == "merged", "merged_adapter"].notna().all()
    assert ((r["latency_s"] - (r["finish_s"] - r["arrival_s"])).abs() < 2e-6).all()   # written to the microsecond
    assert r["preempted"].sum() > 0 and it["theta_right"].dtype == "float64"


def test_load_a_streamed_run_and_a_runtime_run(tmp_path):
    streamed = dlora_sim.simulate("slora", overrides=[*SMALL, "stream_requests=true", "keep_iterations=false"],
                                  out=tmp_path / "streamed")
    assert len(streamed.requests) == 150 and streamed.iterations.empty
    assert list(streamed.iterations.columns)[:3] == ["replica", "start_s", "duration_s"]
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the runtime is not installed")
    run = _cli(tmp_path, "dlora-serve", "system=slora", "workload.num_requests=6", "charts=false",
               f"hydra.run.dir={tmp_path / 'served'}")
    assert run.returncode == 0, run.stderr[-2000:]
    served = dlora_sim.load(tmp_path / "served")
    assert served.summary["executor"] == "dlora_gpu" and len(served.requests) == 6
    assert served.iterations["wall_s"].dtype == "float64" and (served.iterations["wall_s"] > 0).all()


def test_load_sweep_gives_a_row_per_job(tmp_path):
    run = _cli(tmp_path, "dlora-sim", "--multirun", "system=slora,dlora", "workload.num_requests=60,90",
               f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert run.returncode == 0, run.stderr[-2000:]
    df = dlora_sim.load_sweep(tmp_path / "sweep")
    assert len(df) == 4 and set(df["system"]) == {"slora", "dlora"} and df["system"].dtype == "category"
    assert sorted(df["workload.num_requests"]) == [60, 60, 90, 90] and df["workload.num_requests"].dtype == "int64"
    assert (df["completed"] == df["workload.num_requests"]).all() and df["throughput_rps"].dtype == "float64"
    table = pd.read_csv(tmp_path / "sweep" / "comparison.csv")   # dlora-compare's table is this frame's columns
    assert list(table["throughput_rps"]) == list(df["throughput_rps"])


def test_a_bad_override_raises_the_clis_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        dlora_sim.simulate("dlora", overrides=["workload.rate=abc"])
    run = _cli(tmp_path, "dlora-sim", "system=dlora", "workload.rate=abc")
    assert run.stderr.strip() == f"dlora-sim: {e.value}"
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        dlora_sim.load(tmp_path)


def test_traces_load_gives_the_canonical_request_table(tmp_path):
    df = traces.load("default", "workload.num_requests=50")
    assert list(df.columns) == ["arrival_s", "adapter", "prompt_tokens", "output_tokens"] and len(df) == 50
    assert df["arrival_s"].is_monotonic_increasing and df["adapter"].dtype == "int64"
    csv = tmp_path / "t.csv"
    df.to_csv(csv, index=False)
    pd.testing.assert_frame_equal(traces.load(str(csv)), df)
    with pytest.raises(FileNotFoundError, match="neither a file nor a workload"):
        traces.load("no_such_thing")


def test_the_worked_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("two_systems", REPO / "docs" / "examples" / "two_systems.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from dlora_sim.traces.registry import is_present
    workload = "azure_conv" if is_present("azure_conv") else "default"
    png = example.main(["--workload", workload, "--requests", "200", "--out", str(tmp_path)])
    assert png.exists() and (tmp_path / "dlora" / "summary.json").exists()


def test_the_simulators_start_does_not_import_pandas():
    run = subprocess.run([sys.executable, "-c", "import sys, dlora_sim.cli, dlora_sim.des.engine, dlora_sim.compare; "
                          "print('pandas' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr
