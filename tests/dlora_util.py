"""Helpers for the dlora tests: a real replica state as the policy's view, and small Hydra-composed runs."""
from __future__ import annotations

from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.paths import PROFILES_DIR
from dlora_sim.core.profile import load_profile
from dlora_sim.core.replica_config import ReplicaConfig
from dlora_sim.core.replica_state import ReplicaState
from dlora_sim.core.request import NS, Request, State, blocks_for
from dlora_sim.core.results import Recorder
from dlora_sim.des.engine import build_simulation
from dlora_sim.policies.dlora import DLoRAScheduler
from sim_helpers import compose_cfg, iterations_csv, requests_csv

PROFILE = load_profile(PROFILES_DIR / "a100-80gb-llama-2-7b.yaml")


class ManualClock:
    """A replica's clock that a test sets by hand (ns)."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def make_replica(sched: DLoRAScheduler, *, seqs: int = 8, slots: int = 4, adapters: int = 4) -> ReplicaState:
    return ReplicaState(0, ReplicaConfig(max_num_seqs=seqs, gpu_adapter_slots=slots, chunked_prefill=False),
                        CostModel(PROFILE), [16] * adapters, Recorder(), lambda r: None, ManualClock(),
                        merges=sched.merges)


def set_time(rep: ReplicaState, ns: int) -> None:
    """Move a `make_replica` replica's clock to `ns`."""
    rep._clock.ns = ns


def add(rep: ReplicaState, adapters: list[int], *, start: int = 0, decoding: bool = True) -> list[Request]:
    """Enqueue one request per entry (arrival order = list order); decoding ones hold their KV."""
    out = []
    for i, a in enumerate(adapters):
        r = Request(start + i, a, (start + i) * 1000, 64, 32)
        if decoding:
            r.generated, r.state = 1, State.RESIDENT
            r.kv_blocks = blocks_for(r.context_len, rep.block_size)
            rep.free_blocks -= r.kv_blocks
        rep.enqueue(r)
        out.append(r)
    return out


def run(*overrides: str, workload=None, wrap=None):
    sim = build_simulation(compose_cfg(*overrides), workload)
    if wrap is not None:
        for rep in sim.cluster.replicas:
            wrap(rep)
    return sim, sim.run()


__all__ = ["NS", "add", "compose_cfg", "iterations_csv", "make_replica", "requests_csv", "run", "set_time"]
