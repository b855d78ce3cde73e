"""A new user's first commands: the README's own command lines run as written (in a fresh folder, no
traces on the machine), and a long sweep that shows its first result early, keeps what finished when
interrupted, and finishes the rest when rerun into its folder."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
LONG = ("experiment=skew_sweep",)   # run below, interrupted (the whole sweep takes minutes)
# a server runs until stopped, and the load generator needs one: tests/gpu/test_server_cli.py runs both (on a
# free port) and stops the server as a user does
SERVING = ("dlora-server", "dlora-bench")


def _env(tmp: Path) -> dict:
    env = {**os.environ, "DLORA_SHARED_TRACES": "", "XDG_CACHE_HOME": str(tmp / "cache")}
    env.pop("DLORA_TRACE_DIR", None)
    return env


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [ln.split("  #")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith(".venv/bin/")]


def test_the_readme_has_commands_to_start_with():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("line", [c for c in readme_commands() if not any(k in c for k in LONG + SERVING)])
def test_a_readme_command_works_or_says_in_one_line_what_is_missing(line, tmp_path):
    cmd = line.split()
    cmd[0] = str(BIN / Path(cmd[0]).name)
    run = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    if run.returncode == 0:
        assert list(tmp_path.glob("outputs/**/summary.json")) or list(tmp_path.glob("multirun/**/summary.json"))
    else:   # only what a user cannot have yet: their own trace file
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]
        assert "not found" in run.stderr


def test_an_interrupted_sweep_keeps_its_jobs_and_a_rerun_finishes_it(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [str(BIN / "dlora-sim"), "--multirun", "experiment=skew_sweep", "+skew_load=einsum_b16,kernel_b16",
           "workload.popularity_param=0,3", "seed=0", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.monotonic()
    while not list(sweep.glob("*/summary.json")):
        assert time.monotonic() - t0 < 30, "no finished job within 30 s"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C: the terminal signals the whole process group
    out, err = proc.communicate(timeout=120)
    kept = len(list(sweep.glob("*/summary.json")))
    assert proc.returncode == 130 and "Traceback" not in err and "leaked" not in err, err[-2000:]
    assert f"{kept} finished job(s) kept in {sweep}" in err and f"hydra.sweep.dir={sweep}" in err
    assert 1 <= kept < 12
    rerun = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list(sweep.glob("*/summary.json"))) == 12
    assert f"report: {sweep / 'report'}" in rerun.stdout and (sweep / "report" / "skew_sweep.md").exists()
