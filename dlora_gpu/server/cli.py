"""`dlora-server`: serve the OpenAI API with dLoRA's (or a baseline's) scheduling until Ctrl-C.

    dlora-server system=dlora server.port=8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "adapter-0", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0}'

On Ctrl-C (or SIGTERM) the server stops taking requests, cancels those in flight, and writes its
results folder (requests.csv, summary.json) into its run folder.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dlora_gpu import require_runtime
from dlora_sim.core.errors import reported, require_extra
from dlora_sim.core.paths import CONF_DIR

log = logging.getLogger("dlora_gpu.server")
SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client", "transformers")


def require_server(prog: str) -> None:
    """Exit with one line naming the install command when the `server` extra is missing."""
    require_extra(prog, "the server", SERVER_MODULES, "server", "`make install-server` (docs/server.md)")


@hydra.main(config_path=str(CONF_DIR), config_name="server", version_base="1.3")
@reported("dlora-server")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from dlora_gpu.server.settings import check_server_config

    check_server_config(cfg)   # before torch and the web stack load: a mistake is refused at once
    from dlora_gpu.server.run import serve

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    s = serve(cfg, out, hc.runtime.choices.get("system", "custom"))
    log.info("stopped: %d request(s) finished, %d cancelled or rejected; results in %s", s["completed"],
             s["rejected"], out)


def main() -> None:
    require_runtime("dlora-server")
    require_server("dlora-server")
    sys.exit(_main())


if __name__ == "__main__":
    main()
