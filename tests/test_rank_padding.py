"""vLLM's rank padding (cluster.replica.max_lora_rank): LoRA compute at the padded rank, loads at the adapter's own
bytes, adapters above it refused naming the key; off (null) it changes nothing."""
from __future__ import annotations

import pytest

from sim_helpers import iterations_csv, requests_csv, run_cfg
from dlora_sim.core.config import ConfigError
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.profile import load_profile
from dlora_sim.core.workload import RequestSpec, Workload

ONE = ("system=slora", "cluster.num_replicas=1", "router=least_loaded")


def _one_request(ranks: list[int]) -> Workload:
    """One request of adapter 0 (decoded a few steps), among adapters of the given ranks."""
    return Workload.from_requests([RequestSpec(0.0, 0, 64, 4)], num_adapters=len(ranks), rank=ranks)


def test_a_small_adapter_computes_as_the_padded_rank_and_loads_its_own_bytes():
    _, padded = run_cfg(*ONE, "cluster.replica.max_lora_rank=max", workload=_one_request([8, 64]))
    _, own = run_cfg(*ONE, workload=_one_request([8, 64]))
    _, big = run_cfg(*ONE, workload=_one_request([64, 64]))
    computes = [[r.compute for r in res.recorder.rows] for res in (padded, own, big)]
    assert computes[0] == computes[2] and computes[0][0] > computes[1][0]   # rank 64's price, above rank 8's
    prof = load_profile("a100-80gb-llama-2-7b")
    load8 = CostModel(prof).load_time(prof.adapter_bytes(8))
    assert padded.recorder.rows[0].load == own.recorder.rows[0].load == pytest.approx(load8, rel=1e-12)
    assert big.recorder.rows[0].load > load8


def test_a_number_pads_to_it_and_null_changes_nothing():
    wl = _one_request([8, 16])
    _, padded = run_cfg(*ONE, "cluster.replica.max_lora_rank=16", workload=wl)
    _, sixteen = run_cfg(*ONE, workload=_one_request([16, 16]))
    assert [r.compute for r in padded.recorder.rows] == [r.compute for r in sixteen.recorder.rows]
    _, off = run_cfg(*ONE, "cluster.replica.max_lora_rank=null", workload=wl)
    _, default = run_cfg(*ONE, workload=wl)
    assert (requests_csv(off), iterations_csv(off)) == (requests_csv(default), iterations_csv(default))


@pytest.mark.parametrize("value,match", [("8", "adapter 1 has rank 16"), ("0", "max_lora_rank"),
                                         ("big", "max_lora_rank")])
def test_bad_padding_is_named(value, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        run_cfg(*ONE, f"cluster.replica.max_lora_rank={value}", workload=_one_request([8, 16]))


def test_slots_are_sized_for_the_padded_rank():
    """With slots sized by memory, padding rank-16 adapters to 64 leaves room for a quarter as many."""
    wl = Workload.from_requests([RequestSpec(0.0, 0, 64, 4)], num_adapters=2000, rank=16)
    sim_own, _ = run_cfg(*ONE, workload=wl)
    sim_pad, _ = run_cfg(*ONE, "cluster.replica.max_lora_rank=64", workload=wl)
    own, pad = sim_own.cluster.replicas[0].adapter_slots, sim_pad.cluster.replicas[0].adapter_slots
    assert pad < own and pad == pytest.approx(own / 4, rel=0.02)
