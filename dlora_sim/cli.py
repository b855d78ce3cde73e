"""`dlora-sim`: one simulated run per Hydra job; results in the job's output folder."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dlora_sim.core.errors import reported
from dlora_sim.core.jobs import finish_job, hydra_job
from dlora_sim.core.paths import CONF_DIR
from dlora_sim.des.engine import build_simulation

log = logging.getLogger("dlora_sim")


def charts(out: Path) -> None:
    from dlora_sim.plots import run_charts
    run_charts(out)


def run_job(cfg: DictConfig, out: Path, system: str, overrides: list[str]) -> dict:
    sim = build_simulation(cfg, out=out)
    try:
        return finish_job(cfg, out, system, overrides, sim.run, charts=charts)
    finally:
        if sim.stream is not None:
            sim.stream.abort()   # a no-op once the stream was closed into requests.csv


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
