"""Running a benchmark's points on earlier code beside this code (`--baseline DIR`: a checkout, e.g. a
`git worktree`): each point runs as a child process of the benchmark's own script, which puts the
checkout's dlora_sim first on its path (`use_code_from_env`, called before dlora_sim is imported)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

CODE_ENV = "DLORA_BENCH_CODE"   # a child's dlora_sim comes from this checkout


def use_code_from_env() -> None:
    """In a child for the baseline: its checkout's dlora_sim before this repository's."""
    code = os.environ.get(CODE_ENV)
    if code:
        sys.path.insert(0, code)


def checkout(path: Path | None, required: bool = False) -> Path | None:
    """`--baseline`'s folder, resolved, or a one-line exit when it holds no dlora_sim/."""
    if path is None and not required:
        return None
    if path is None or not (path / "dlora_sim").is_dir():
        raise SystemExit(f"--baseline {path}: no dlora_sim/ there (give a checkout of the earlier code, "
                         "e.g. a git worktree)")
    return path.resolve()


def commit_of(path: Path) -> str:
    """The checkout's commit, for the report."""
    out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "not a git checkout"


def child_json(script: str, args: Sequence[str], code: Path | None = None, *, one_core: bool = False,
               extra_env: dict[str, str] | None = None) -> dict:
    """Run `script --child args` (on `code`'s dlora_sim if given; pinned to core 0 with `one_core` where
    taskset exists; with `extra_env` set) and return the JSON of its last line."""
    env = {**os.environ, "PYTHONHASHSEED": "0", **(extra_env or {})}
    env.pop(CODE_ENV, None)
    if code is not None:
        env[CODE_ENV] = str(code)
    cmd = ["taskset", "-c", "0"] if one_core and shutil.which("taskset") else []
    out = subprocess.run([*cmd, sys.executable, script, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
