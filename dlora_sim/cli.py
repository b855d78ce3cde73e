"""`dlora-sim`: one simulated run per Hydra job; results in the job's output folder."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dlora_sim.chart_layout import IGNORED
from dlora_sim.config import build_simulation
from dlora_sim.errors import reported
from dlora_sim.metrics import RESULT_FILES, SimResult, summarize, write_results
from dlora_sim.paths import CONF_DIR

log = logging.getLogger("dlora_sim")
UNCOMPARED = IGNORED   # keys that change no result: a run differing only in them is the same run


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


def run_job(cfg: DictConfig, out: Path, system: str, overrides: list[str]) -> dict:
    sim = build_simulation(cfg, out=out)
    try:
        return finish_job(cfg, out, system, overrides, sim.run)
    finally:
        if sim.stream is not None:
            sim.stream.abort()   # a no-op once the stream was closed into requests.csv


def finish_job(cfg: DictConfig, out: Path, system: str, overrides: list[str], run: Callable[[], SimResult],
               about: dict | None = None) -> dict:
    """Run, then write the results folder (summary.json last) and its charts; a failed run leaves no
    file that looks complete. `about` adds executor facts (the runtime's device, clock, versions)."""
    try:
        res = run()
        summary = {"system": system, "arm": cfg.get("arm"), "overrides": overrides, **(about or {}),
                   **summarize(res, float(cfg.slo_s_per_token)), "config": OmegaConf.to_container(cfg, resolve=True)}
        write_results(out, res, summary)
    except BaseException:
        for name in RESULT_FILES:   # never leave a folder that looks complete
            (out / name).unlink(missing_ok=True)
        raise
    if cfg.get("charts", True):
        from dlora_sim.plots import run_charts
        run_charts(out)
    return summary


def hydra_job(cfg: DictConfig) -> tuple[Path, str, list[str], float | None]:
    """The Hydra job's folder, system and overrides, and the objective of a complete run of this same
    config already there (then the job is skipped), for both `dlora-sim` and `dlora-serve`."""
    hc = HydraConfig.get()
    out, system = Path(hc.runtime.output_dir), hc.runtime.choices.get("system", "custom")
    done = completed_run(cfg, out)
    if done is not None:
        log.info("%s: complete in %s, skipped (resume=false reruns it)", system, out)
    return out, system, list(hc.overrides.task), None if done is None else (done["mean_s_per_token"] or 0.0)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
@reported("dlora-sim")
def _main(cfg: DictConfig) -> float:
    out, system, overrides, skipped = hydra_job(cfg)
    if skipped is not None:
        return skipped
    s = run_job(cfg, out, system, overrides)
    log.info("%s: %d/%d done, throughput %.3f req/s, mean latency %s s, p99 %s s, SLO %.1f%%, wall %.1f s -> %s",
             system, s["completed"], s["num_requests"], s["throughput_rps"], s["mean_latency_s"], s["p99_latency_s"],
             100 * s["slo_attainment"], s["sim_wall_s"], out)
    return s["mean_s_per_token"] or 0.0


def main() -> None:
    sys.exit(_main())


if __name__ == "__main__":
    main()
