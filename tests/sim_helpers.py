"""Shared helpers: compose the real Hydra config (conf/) and run small simulations."""
from __future__ import annotations


from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dlora_sim.config import build_simulation
from dlora_sim.metrics import REQUEST_COLUMNS, _csv_text, iteration_rows, request_rows
from dlora_sim.paths import CONF_DIR

SYSTEMS = ["slora", "merged", "peft", "vllm", "dlora"]


def compose_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def run_cfg(*overrides: str, workload=None, debug=True):
    sim = build_simulation(compose_cfg(*overrides), workload)
    sim.debug_checks = debug
    return sim, sim.run()


def requests_csv(res) -> str:
    return _csv_text(REQUEST_COLUMNS, request_rows(res.requests))


def iterations_csv(res) -> str:
    cols, rows = iteration_rows(res.recorder)
    return _csv_text(cols, rows)


SMALL = ["workload.num_requests=150", "workload.rate=6", "cluster.num_replicas=2"]
