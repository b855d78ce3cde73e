"""`dlora-serve`: serve a workload on N replicas with the runtime, under the simulator's policies.

The same config groups as `dlora-sim` (system, scheduler, router, cluster, model, profile, workload)
plus `runtime` (cpu_tiny | h200_7b); the same results folder, with the executor, device, clock and
library versions in summary.json.
"""
from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dlora_gpu import require_runtime
from dlora_sim.run_charts import draw_run_charts
from dlora_sim.core.config import ConfigError, build_parts, keep_iterations, show_progress
from dlora_sim.core.errors import reported
from dlora_sim.core.jobs import finish_job, run_app
from dlora_sim.core.paths import CONF_DIR

log = logging.getLogger("dlora_gpu")


def build_engine(cfg: DictConfig, workload=None, *, keep_tokens: bool = False, stream=None):
    """The serving engine for a composed `serve` config (one place, for the CLI, the server and the
    tests); `stream`: requests.csv written as requests end (a server's, which runs without end)."""
    from dlora_gpu.engine import Clock, Engine
    from dlora_gpu.executor import runtime_config
    from dlora_gpu.workers import make_workers

    rcfg = runtime_config(cfg.get("runtime"))
    parts = build_parts(cfg, workload)
    try:
        clock = Clock(rcfg.clock)
        return Engine(parts, rcfg, lambda specs: make_workers(rcfg.workers, specs, rcfg.ray.address,
                                                                   rcfg.ray.num_gpus, rcfg.ray.num_cpus),
                      clock, progress=show_progress(cfg),
                      keep_iterations=keep_iterations(cfg, len(parts.workload.requests)) and stream is None,
                      keep_tokens=keep_tokens, stream=stream)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def about(engine) -> dict:
    """What ran: executor, workers, device, clock, versions."""
    import torch

    info = engine.info[0]
    devices = sorted({i["device"] for i in engine.info})
    return {"executor": "dlora_gpu", "device": ", ".join(devices), "clock": engine.clock.kind,
            "workers": engine.workers.kind, "runtime": info["runtime"],
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "triton": package_version("triton"), "cuda": torch.version.cuda}}


def serve_job(cfg: DictConfig, out: Path, system: str, overrides: list[str]) -> dict:
    """Serve a composed config into the results folder `out`; its summary."""
    engine = build_engine(cfg)
    try:
        return finish_job(cfg, out, system, overrides, engine.run, about(engine), charts=draw_run_charts)
    finally:
        engine.close()


@hydra.main(config_path=str(CONF_DIR), config_name="serve", version_base="1.3")
@reported("dlora-serve")
def _main(cfg: DictConfig) -> float:
    return run_app(cfg, serve_job, log, lambda s: (
        f" on {s['device']} ({s['clock']} clock{_replicas(s)}): mean TTFT {_ms(s['mean_ttft_s'])}, "
        f"mean TPOT {_ms(s['mean_tpot_s'])}, {s['output_tokens_per_s']:.1f} output tokens/s"))


def _replicas(s: dict) -> str:
    """Several replicas: where they ran and what co-migration did."""
    if s.get("num_replicas", 1) == 1:
        return ""
    moved = (f", {s['num_migrations']} migration(s) in {s['migration_rounds']} round(s), "
             f"{s['kv_transfers']} KV transfer(s)") if "migration_rounds" in s else ", no migrator"
    return f", {s['num_replicas']} replicas on {s['workers']} workers{moved}"


def package_version(package: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def main() -> None:
    require_runtime("dlora-serve")
    try:
        sys.exit(_main())
    except KeyboardInterrupt:
        from dlora_sim.sweep_progress import interrupted
        sys.exit(interrupted("dlora-serve"))


if __name__ == "__main__":
    main()
