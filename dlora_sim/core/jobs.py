"""The plumbing every Hydra app shares (`dlora-sim`, `dlora-serve` and what comes next): the job's
folder and identity, resuming a complete run, and writing a run's results folder so that a failed
run never leaves files that look complete."""
from __future__ import annotations

import json
import logging
import multiprocessing
import signal
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from dlora_sim.core.results import RESULT_FILES, SimResult, summarize, write_results

log = logging.getLogger("dlora_sim")
UNCOMPARED = frozenset({"charts", "progress", "resume"})   # keys that change no result: the same run


def completed_run(cfg: DictConfig, out: Path) -> dict | None:
    """The summary of a complete run of this same config already in `out` (summary.json is written
    last, so its presence means complete), if `resume` is on; a sweep rerun into its folder then
    skips what is done. A folder holding another config's run is rerun (and overwritten)."""
    path = out / "summary.json"
    if not cfg.get("resume", True) or not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    now = OmegaConf.to_container(cfg, resolve=True)
    same = {k: v for k, v in (old.get("config") or {}).items() if k not in UNCOMPARED} == \
        {k: v for k, v in now.items() if k not in UNCOMPARED}
    if not same:
        log.warning("%s holds a run of another config; rerunning it", out)
    return old if same else None


def hydra_job(cfg: DictConfig) -> tuple[Path, str, list[str], float | None]:
    """The Hydra job's folder, system and overrides, and the objective of a complete run of this same
    config already there (then the job is skipped)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out, system = Path(hc.runtime.output_dir), hc.runtime.choices.get("system", "custom")
    done = completed_run(cfg, out)
    if done is not None:
        log.info("%s: complete in %s, skipped (resume=false reruns it)", system, out)
    return out, system, list(hc.overrides.task), None if done is None else (done["mean_s_per_token"] or 0.0)


Job = Callable[[DictConfig, Path, str, list[str]], dict]   # (config, folder, system, overrides) -> summary


def leave_ctrl_c_to_the_sweep() -> None:
    """In a worker process of a parallel sweep (joblib's loky pool), ignore Ctrl-C: the terminal sends it
    to the whole process group, the sweep's own process stops the pool and says what was kept, and a
    worker that took it too would print a traceback of its own (seen landing inside `gc.collect`)."""
    if multiprocessing.parent_process() is None:
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:   # not the worker's main thread: it cannot take the signal either
        pass


def run_app(cfg: DictConfig, job: Job, logger: logging.Logger, what: Callable[[dict], str] = lambda s: "") -> float:
    """The body of every app's Hydra main: skip a complete run of this config, else run `job` into the
    job's folder and log one line of its summary (`what` adds the app's own facts). Returns the sweep
    objective (mean s/token)."""
    leave_ctrl_c_to_the_sweep()
    out, system, overrides, skipped = hydra_job(cfg)
    if skipped is not None:
        return skipped
    s = job(cfg, out, system, overrides)
    slo = f", SLO {100 * s['slo_attainment']:.1f}%" if s.get("slo_attainment") is not None else ""
    label = system + (f" [arm {cfg.arm}]" if cfg.get("arm") else "")
    logger.info("%s%s: %d/%d done, throughput %.3f req/s, mean latency %s s, p99 %s s%s, wall %.1f s -> %s", label,
                what(s), s["completed"], s["num_requests"], s["throughput_rps"], s["mean_latency_s"],
                s["p99_latency_s"], slo, s["sim_wall_s"], out)
    return s["mean_s_per_token"] or 0.0


def finish_job(cfg: DictConfig, out: Path, system: str, overrides: list[str], run: Callable[[], SimResult],
               about: dict | None = None, charts: Callable[[Path], object] | None = None) -> dict:
    """Run, then write the results folder (summary.json last) and, if `charts` is on, its charts; a
    failed run leaves no file that looks complete. `about` adds executor facts (the runtime's device,
    clock, versions)."""
    try:
        res = run()
        summary = {"system": system, "arm": cfg.get("arm"), "overrides": overrides, **(about or {}),
                   **summarize(res, float(cfg.slo_s_per_token)), "config": OmegaConf.to_container(cfg, resolve=True)}
        write_results(out, res, summary)
    except BaseException:
        for name in RESULT_FILES:   # never leave a folder that looks complete
            (out / name).unlink(missing_ok=True)
        raise
    if charts is not None and cfg.get("charts", True):
        charts(out)
    return summary
