"""At the end of an experiment's multirun, its benchmark script's report (tables, charts) written into
the sweep folder, and where it is printed: every experiment sweep ends with something to read. The
scripts stay in `benchmarks/` (they also record results with --record); this runs them on the sweep."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dlora_sim.core.paths import REPO_ROOT


class ReportCallback(Callback):
    """`script`: the benchmark script (benchmarks/<script>.py) that reports this experiment; `args`: how
    it is told the sweep folder, `{sweep}` standing for it (default: the folder as its first argument)."""

    def __init__(self, script: str | None = None, args: list[str] | None = None):
        self.script, self.args = script, list(args or ["{sweep}"])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.script:
            return
        sweep = Path(config.hydra.sweep.dir).resolve()
        out = sweep / "report"
        cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / f"{self.script}.py"),
               *(a.replace("{sweep}", str(sweep)) for a in self.args), "--out", str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        (sweep / "report.log").write_text(run.stdout + run.stderr)
        if not any(out.glob("*.md")):   # (exit 1 alone may be a report saying a criterion is not met)
            print(f"dlora-sim: the {self.script} report failed (exit {run.returncode}); its output: "
                  f"{sweep / 'report.log'}", file=sys.stderr)
            return
        print(run.stdout, end="")
        print(f"report: {out} (tables, charts), its output in {sweep / 'report.log'}")
