"""One "jobs done / total" line per finished job of a multirun, instead of parallel jobs' progress bars
overwriting each other. Works across launchers: the total is written into the sweep folder when the
multirun starts, and each job (in whatever process or machine runs it) counts the complete folders."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("dlora_sim")
TOTAL_FILE = ".jobs_total"


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs Hydra's basic sweeper will launch (command-line sweeps times `hydra.sweeper.params`),
    by Hydra's own override parser; None for other sweepers (the capacity search decides as it goes)."""
    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    by_key: dict[str, int] = {}
    for o in overrides:   # a command-line sweep of a key replaces the config's
        by_key[o.get_key_element()] = len(list(o.sweep_iterator())) if o.is_sweep_override() else 1
    return math.prod(by_key.values())


def complete_jobs(sweep_dir: Path) -> int:
    """Folders holding a summary.json (a rerun into an old sweep folder counts its runs too)."""
    return sum(1 for _ in sweep_dir.glob("*/summary.json"))


def check_before_launch(config: DictConfig) -> None:
    """Stop a sweep within seconds, with one line, when its workload needs a trace this machine lacks
    (before Hydra composes and launches any job)."""
    from dlora_sim.core.config import instantiated
    from dlora_sim.core.errors import UserError
    from dlora_sim.traces.workloads import require_traces

    try:
        require_traces(instantiated(config.workload, "workload"))
        _join_ray(config)
    except UserError as e:   # a ConfigError too
        print(f"dlora-sim: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _join_ray(config: DictConfig) -> None:
    """Hydra's Ray launcher joining a running cluster (`hydra/launcher=ray_join`): join it now, so a missing
    cluster is one line rather than Ray's traceback from inside the launcher (which then finds Ray up)."""
    from dlora_sim.core.errors import UserError
    launcher = config.get("hydra", {}).get("launcher", {})
    address = ((launcher.get("ray") or {}).get("init") or {}).get("address")
    if "RayLauncher" not in str(launcher.get("_target_", "")) or address is None:
        return
    import ray

    from dlora_sim.ray_join import unreachable
    if ray.is_initialized():
        return
    why = unreachable(address)
    if why is not None:
        raise UserError(f"hydra.launcher.ray.init.address={address}: no running Ray cluster to join ({why}); "
                        "start one (ray start --head) or use hydra/launcher=ray, which starts its own")
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"hydra.launcher.ray.init.address={address}: no running Ray cluster to join "
                        f"({str(e).splitlines()[0]}); start one (ray start --head) or use hydra/launcher=ray, "
                        "which starts its own") from None


RUNNING: dict[str, Path] = {}   # the sweep folder of the multirun in this process (for an interrupt's hint)


def interrupted(prog: str) -> int:
    """One line after Ctrl-C: what was kept and how to finish; the exit status to use (130)."""
    sweep = RUNNING.get("sweep")
    if sweep is not None:
        print(f"{prog}: interrupted; {complete_jobs(sweep)} finished job(s) kept in {sweep}; run the same command "
              f"with hydra.sweep.dir={sweep} to finish the rest (finished jobs are skipped)", file=sys.stderr)
    else:
        print(f"{prog}: interrupted; a run writes its results when it ends, so nothing of this one was kept",
              file=sys.stderr)
    return 130


class SweepProgress(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_before_launch(config)
        total = sweep_size(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        RUNNING["sweep"] = sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / TOTAL_FILE).write_text("" if total is None else str(total))
        done = complete_jobs(sweep_dir)
        if done:   # job logging is not set up yet in the launching process
            what = ("those of the same config are skipped" if config.get("resume", True)
                    else "resume=false reruns them")
            print(f"[dlora-sim] sweep {sweep_dir}: {done} folder(s) already hold a complete run; {what}",
                  file=sys.stderr)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        total_file = sweep_dir / TOTAL_FILE
        total = total_file.read_text().strip() if total_file.exists() else ""
        log.info("sweep: %d/%s jobs done", complete_jobs(sweep_dir), total or "?")
