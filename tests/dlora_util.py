"""Helpers for the dlora tests: a real Replica as the policy's view, and small Hydra-composed runs."""
from __future__ import annotations

import simpy
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dlora_sim.config import build_simulation
from dlora_sim.cost_model import CostModel
from dlora_sim.metrics import REQUEST_COLUMNS, Recorder, _csv_text, iteration_rows, request_rows
from dlora_sim.paths import CONF_DIR, PROFILES_DIR
from dlora_sim.policies.dlora import DLoRAScheduler
from dlora_sim.profile import load_profile
from dlora_sim.replica import Replica, ReplicaConfig
from dlora_sim.request import NS, Request, State

PROFILE = load_profile(PROFILES_DIR / "a100-80gb-llama-2-7b.yaml")


def make_replica(sched: DLoRAScheduler, *, seqs: int = 8, slots: int = 4, adapters: int = 4) -> Replica:
    return Replica(0, simpy.Environment(), ReplicaConfig(max_num_seqs=seqs, gpu_adapter_slots=slots),
                   CostModel(PROFILE), sched, [16] * adapters, Recorder(), lambda r: None)


def add(rep: Replica, adapters: list[int], *, start: int = 0, decoding: bool = True) -> list[Request]:
    """Enqueue one request per entry (arrival order = list order); decoding ones hold their KV."""
    out = []
    for i, a in enumerate(adapters):
        r = Request(start + i, a, (start + i) * 1000, 64, 32)
        if decoding:
            r.generated, r.state = 1, State.RESIDENT
            r.kv_blocks = -(-r.context_len // rep.block_size)
            rep.free_blocks -= r.kv_blocks
        rep.enqueue(r)
        out.append(r)
    return out


def compose_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def run(*overrides: str, workload=None, wrap=None):
    sim = build_simulation(compose_cfg(*overrides), workload)
    if wrap is not None:
        for rep in sim.replicas:
            wrap(rep)
    return sim, sim.run()


def requests_csv(res) -> str:
    return _csv_text(REQUEST_COLUMNS, request_rows(res.requests))


def iterations_csv(res) -> str:
    cols, rows = iteration_rows(res.recorder)
    return _csv_text(cols, rows)


__all__ = ["NS", "add", "compose_cfg", "iterations_csv", "make_replica", "requests_csv", "run"]
