"""Trial runs of the benchmarks and of the profile generator leave the checkout as it was: recorded
results change only with --record (a result file is named for its device)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def git_status():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return _status()


def test_profile_generator_rewrites_committed_profiles_unchanged(git_status):
    from calibration.analytic import main as generate
    generate([])   # the default: into calibration/profiles, keeping each profile's recorded date
    assert _status() == git_status


def test_cpu_kernel_benchmark_writes_a_temporary_device_named_file(git_status):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "benchmarks/kernels.py", "--device", "cpu", "--quick", "--shapes",
                           "tiny", "--reps", "1", "--max-seconds", "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wrote = Path(next(ln for ln in proc.stdout.splitlines() if ln.startswith("wrote ")).split()[1])
    assert "(not recorded: --record writes benchmarks/results/)" in proc.stdout
    assert wrote.name == "kernels_cpu.csv" and ROOT not in wrote.parents and wrote.stat().st_size > 0
    assert _status() == git_status
