"""The layers hold: import-linter's contracts (pyproject.toml) pass, and the runtime loads no SimPy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is not installed: `pip install -e '.[dev]'` brings import-linter")
    run = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("modules", ["dlora_gpu.engine, dlora_gpu.cli, dlora_gpu.executor",
                                     "dlora_sim.core.cluster, dlora_sim.core.config, dlora_sim.policies.dlora"])
def test_the_runtime_and_the_core_load_no_simpy(modules):
    code = f"import sys, {modules}; print(sorted(m for m in ('simpy', 'dlora_sim.des') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
