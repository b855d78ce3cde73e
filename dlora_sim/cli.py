"""`dlora-sim`: one simulated run per Hydra job; results in the job's output folder."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from dlora_sim.core.errors import reported
from dlora_sim.core.jobs import run_app
from dlora_sim.core.paths import CONF_DIR
from dlora_sim.des.engine import run_job

log = logging.getLogger("dlora_sim")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
@reported("dlora-sim")
def _main(cfg: DictConfig) -> float:
    return run_app(cfg, run_job, log)


def main() -> None:
    # an interrupted parallel sweep's worker pool leaves semaphores its tracker warns about: not the user's
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    try:
        sys.exit(_main())
    except KeyboardInterrupt:
        from dlora_sim.sweep_progress import interrupted
        sys.exit(interrupted("dlora-sim"))


if __name__ == "__main__":
    main()
