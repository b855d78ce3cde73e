"""dlora-compare on run folders and sweep folders; results JSON is strict (no bare NaN)."""
from __future__ import annotations

import json
import math

import pytest

from sim_helpers import compose_cfg
from dlora_sim.des.engine import run_job
from dlora_sim.compare import main as compare_main
from dlora_sim.core.results import json_text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for i, system in enumerate(("slora", "dlora")):
        cfg = compose_cfg(f"system={system}", "workload.num_requests=40", "charts=false")
        run_job(cfg, root / str(i), system, [f"system={system}"])
    return root


def test_compare_a_single_run_folder(runs, capsys):
    assert compare_main([str(runs / "0")]) == 0
    assert "slora" in capsys.readouterr().out and (runs / "0" / "comparison.png").exists()


def test_compare_several_folders_into_one_table(runs, tmp_path, capsys):
    assert compare_main([str(runs / "0"), str(runs / "1"), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "slora" in table and "dlora" in table and (tmp_path / "comparison.csv").read_text().count("\n") == 3
    with pytest.raises(SystemExit):
        compare_main([str(runs / "0"), str(runs / "1")])           # several folders need --out


def test_compare_an_empty_folder_fails(tmp_path, capsys):
    assert compare_main([str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err


def test_results_json_has_no_bare_nan(runs):
    text = (runs / "0" / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in summary.json"))
    strict = json_text({"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    assert json.loads(strict) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


def test_the_main_job_gives_a_verdict_per_case_naming_the_winner(tmp_path):
    """`make run`'s sweep (fewer requests): one verdict per case, each naming the winner or a tie, with
    the best baseline, the change in % and why; verdicts.md and verdicts.png in the sweep folder."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "dlora_sim", "--multirun", "experiment=compare",
                          "workload.num_requests=160", f"hydra.sweep.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("verdict [")]
    assert len(lines) == 4   # {einsum, kernel} x {uniform, Zipf 2}
    systems = ("vllm", "peft", "merged", "slora", "dlora")
    for ln in lines:
        best = ln.split("best baseline ", 1)[1].split(":", 1)[0]
        assert best in systems[:-1]
        assert "-> dlora wins" in ln or f"-> {best} wins" in ln or f"-> tie (dlora and {best})" in ln
        assert "mean s/token " in ln and "%" in ln and "unmerged LoRA adds" in ln
    assert (tmp_path / "verdicts.md").read_text().count("\n- ") == 4 and (tmp_path / "verdicts.png").exists()
