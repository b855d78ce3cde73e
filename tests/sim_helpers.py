"""Shared helpers: compose the real Hydra config (conf/) and run small simulations."""
from __future__ import annotations

from dlora_sim.core.config import compose
from dlora_sim.core.results import REQUEST_COLUMNS, _csv_text, iteration_rows, request_rows
from dlora_sim.des.engine import build_simulation

SYSTEMS = ["slora", "merged", "peft", "vllm", "dlora"]


def compose_cfg(*overrides: str):
    return compose(overrides)


def run_cfg(*overrides: str, workload=None, debug=True):
    sim = build_simulation(compose_cfg(*overrides), workload)
    sim.cluster.debug_checks = debug
    return sim, sim.run()


def requests_csv(res) -> str:
    return _csv_text(REQUEST_COLUMNS, request_rows(res.requests))


def iterations_csv(res) -> str:
    cols, rows = iteration_rows(res.recorder)
    return _csv_text(cols, rows)


SMALL = ["workload.num_requests=150", "workload.rate=6", "cluster.num_replicas=2"]
