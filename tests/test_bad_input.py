"""Bad input gets a clear error naming the file, line or key; nothing half-written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sim_helpers import compose_cfg
from dlora_sim.des.engine import run_job
from dlora_sim.core.config import ConfigError
from dlora_sim.des.engine import build_simulation
from dlora_sim.core.contracts import PolicyError
from dlora_sim.policies.unmerged import UnmergedOnly
from dlora_sim.core.profile import ProfileError, load_profile
from dlora_sim.core.paths import PROFILES_DIR
from dlora_sim.workload.trace_csv import TraceError, read_canonical_csv


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_trace_bad_number_names_file_and_line(tmp_path):
    f = _write(tmp_path / "t.csv", "arrival_s,adapter,prompt_tokens,output_tokens\n0.0,0,10,5\n0.5,1,ten,5\n")
    with pytest.raises(TraceError, match=rf"{f}:3: not a number"):
        read_canonical_csv(f)


def test_trace_missing_column_names_it(tmp_path):
    f = _write(tmp_path / "t.csv", "arrival_s,adapter,prompt_tokens\n0.0,0,10\n")
    with pytest.raises(TraceError, match=r"t.csv:1: missing column\(s\) \['output_tokens'\]"):
        read_canonical_csv(f)


@pytest.mark.parametrize("row,msg", [("0.5,0,10", "expected 4 fields"), ("-1,0,10,5", "arrival_s must be >= 0"),
                                     ("0.5,0,0,5", "must be >= 1")])
def test_trace_bad_rows(tmp_path, row, msg):
    f = _write(tmp_path / "t.csv", f"arrival_s,adapter,prompt_tokens,output_tokens\n0.0,0,10,5\n{row}\n")
    with pytest.raises(TraceError, match=rf"t.csv:3: .*{msg}"):
        read_canonical_csv(f)


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlora_sim", *args, f"hydra.run.dir={tmp}", "charts=false"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("group,valid", [("system", ["dlora", "peft", "slora", "vllm"]),
                                         ("scheduler", ["dlora", "merged_only", "unmerged_only"]),
                                         ("router", ["dlora", "least_loaded", "rr"])])
def test_unknown_policy_lists_valid_names(tmp_path, group, valid):
    p = _cli(tmp_path, f"{group}=nope")
    assert p.returncode != 0
    assert f"Could not find '{group}/nope'" in p.stderr
    for name in valid:
        assert name in p.stderr


def test_failed_run_leaves_no_complete_looking_folder(tmp_path):
    trace = _write(tmp_path / "bad.csv", "arrival_s,adapter,prompt_tokens,output_tokens\n0,0,1,1\nx,0,1,1\n")
    out = tmp_path / "run"
    p = _cli(out, "workload=csv", f"workload.path={trace}")
    assert p.returncode != 0 and "bad.csv:3" in p.stderr
    assert not (out / "summary.json").exists() and not (out / "requests.csv").exists()


class Duplicating(UnmergedOnly):
    """A buggy policy: after a while it puts one request in the batch twice."""

    calls = 0

    def schedule(self, view):
        d = super().schedule(view)
        Duplicating.calls += 1
        if Duplicating.calls > 50 and d.batch:
            d.batch.append(d.batch[0])
        return d


def test_failure_during_a_run_removes_stale_results(tmp_path):
    cfg = compose_cfg("system=slora", "workload.num_requests=50", "charts=false",
                      "scheduler._target_=test_bad_input.Duplicating")
    (tmp_path / "requests.csv").write_text("stale")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(PolicyError, match="appears twice"):
        run_job(cfg, tmp_path, "slora", [])
    assert not (tmp_path / "requests.csv").exists() and not (tmp_path / "summary.json").exists()


def test_unknown_cluster_key_is_named():
    with pytest.raises(ConfigError, match=r"cluster\.replica\.bogus"):
        build_simulation(compose_cfg("+cluster.replica.bogus=1"))


def test_impossible_cluster_value_is_named():
    with pytest.raises(ConfigError, match=r"cluster.replica.*max_num_seqs"):
        build_simulation(compose_cfg("cluster.replica.max_num_seqs=0"))


def test_profile_missing_and_unknown_keys(tmp_path):
    raw = yaml.safe_load((PROFILES_DIR / "a100-80gb-llama-2-7b.yaml").read_text())
    del raw["iteration"]["per_token_s"]
    f = _write(tmp_path / "p.yaml", yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"p.yaml: missing key 'iteration.per_token_s'"):
        load_profile(f)
    raw["iteration"]["per_token_s"] = 1e-5
    raw["lora"]["kernel"]["typo_s"] = 1.0
    f = _write(tmp_path / "p.yaml", yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"unknown key\(s\) lora.kernel.typo_s"):
        load_profile(f)
    raw["lora"]["kernel"].pop("typo_s")
    raw["lora"]["dense"] = raw["lora"]["einsum"]
    f = _write(tmp_path / "p.yaml", yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"unknown LoRA path\(s\) lora.dense"):
        load_profile(f)
    raw["lora"].pop("dense")
    raw["switch"]["merge_s"] = "fast"
    f = _write(tmp_path / "p.yaml", yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"'switch.merge_s' must be float"):
        load_profile(f)


def test_unknown_profile_lists_available():
    with pytest.raises(ProfileError, match=r"a100-80gb-llama-2-7b"):
        load_profile("no-such-gpu-model")


def test_rejected_requests_count_as_slo_misses():
    from sim_helpers import run_cfg
    from dlora_sim.core.results import summarize
    _, res = run_cfg("system=slora", "workload.num_requests=60", "cluster.replica.max_num_batched_tokens=256",
                     "cluster.replica.chunked_prefill=false")
    s = summarize(res, 0.5)
    assert s["rejected"] > 0 and s["rejected_share"] == round(s["rejected"] / 60, 6)
    met = sum(1 for r in res.requests if r.finish > 0 and (r.finish - r.arrival) / 1e9 / r.output_tokens <= 0.5)
    assert s["slo_attainment"] == round(met / 60, 6) <= 1 - s["rejected_share"]


def test_user_errors_print_one_line_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "dlora_sim.cli", "cluster.replica.max_num_seqs=0", f"hydra.run.dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2
    assert p.stderr.strip() == "dlora-sim: cluster.replica.max_num_seqs must be >= 1, got 0"
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr
