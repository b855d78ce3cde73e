"""Sweeps: resumable (a complete job of the same config is skipped), one jobs-done line instead of
parallel progress bars, and the same sweep through Hydra's submitit launcher (submitit_local)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from dlora_sim.core.config import compose

from dlora_sim.sweep_progress import sweep_size

SWEEP = ["system=slora,dlora", "workload.num_requests=30", "charts=false"]


def _sweep(out: Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dlora_sim.cli", "--multirun", *SWEEP, *extra,
                           f"hydra.sweep.dir={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _mtimes(out: Path) -> list[int]:
    return [(out / str(i) / "summary.json").stat().st_mtime_ns for i in range(2)]


def test_a_rerun_sweep_skips_complete_jobs_and_reruns_changed_ones(tmp_path):
    log = _sweep(tmp_path)
    assert "sweep: 2/2 jobs done" in log
    first = _mtimes(tmp_path)
    log = _sweep(tmp_path)
    assert log.count(", skipped (resume=false") == 2 and _mtimes(tmp_path) == first and "2 folder(s) already hold" in log
    (tmp_path / "1" / "summary.json").unlink()          # an incomplete job is run again, the other kept
    _sweep(tmp_path)
    again = _mtimes(tmp_path)
    assert again[0] == first[0] and (tmp_path / "1" / "summary.json").exists()
    log = _sweep(tmp_path, "seed=1")                     # another config in the same folders: rerun
    assert "another config" in log and all(a > b for a, b in zip(_mtimes(tmp_path), again))


def test_sweep_size_counts_the_experiments_jobs():
    cfg = compose(["experiment=skew_sweep"], hydra_config=True)
    assert sweep_size(cfg) == 8 * 3 * 6 * 5
    cfg.hydra.overrides.task = ["experiment=skew_sweep", "seed=0,1", "system=dlora"]
    assert sweep_size(cfg) == 8 * 1 * 6 * 2            # command-line values replace the config's sweeps


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher not installed (the dev extra has it)")
def test_a_sweep_through_submitit_local(tmp_path):
    _sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert all((tmp_path / str(i) / "summary.json").exists() for i in range(2))
    assert (tmp_path / "comparison.csv").read_text().count("\n") == 3
    assert any("sweep: " in p.read_text() for p in tmp_path.glob(".submitit/*/*_log.out"))
