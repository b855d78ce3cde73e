"""Helpers for the dlora tests: a real Replica as the policy's view, and small Hydra-composed runs."""
from __future__ import annotations

import simpy

from dlora_sim.config import build_simulation
from dlora_sim.cost_model import CostModel
from dlora_sim.metrics import Recorder
from dlora_sim.paths import PROFILES_DIR
from dlora_sim.policies.dlora import DLoRAScheduler
from dlora_sim.profile import load_profile
from dlora_sim.replica import Replica
from dlora_sim.replica_state import ReplicaConfig
from dlora_sim.request import NS, Request, State
from sim_helpers import compose_cfg, iterations_csv, requests_csv

PROFILE = load_profile(PROFILES_DIR / "a100-80gb-llama-2-7b.yaml")


def make_replica(sched: DLoRAScheduler, *, seqs: int = 8, slots: int = 4, adapters: int = 4) -> Replica:
    return Replica(0, simpy.Environment(), ReplicaConfig(max_num_seqs=seqs, gpu_adapter_slots=slots, chunked_prefill=False),
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


def run(*overrides: str, workload=None, wrap=None):
    sim = build_simulation(compose_cfg(*overrides), workload)
    if wrap is not None:
        for rep in sim.replicas:
            wrap(rep)
    return sim, sim.run()


__all__ = ["NS", "add", "compose_cfg", "iterations_csv", "make_replica", "requests_csv", "run"]
