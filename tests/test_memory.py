"""What memory each replica gets: adapter slots sized by memory, and the merge strategy's pristine copy."""
from __future__ import annotations

import math

import pytest

from sim_helpers import compose_cfg
from dlora_sim.core.config import ConfigError
from dlora_sim.des.engine import build_simulation
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.profile import load_profile

PROFILE = load_profile("a100-80gb-llama-2-7b")
GIB = 1 << 30


def _replica(*overrides: str):
    return build_simulation(compose_cfg("cluster=single", *overrides)).cluster.replicas[0]


def test_auto_slots_hold_every_adapter_when_the_budget_allows_and_cost_kv_blocks():
    rep = _replica("system=slora", "workload.num_adapters=16")
    assert rep.adapter_slots == 16                      # 16 x 100.9 MB fit in 5% of 72 GiB
    fixed = _replica("system=slora", "workload.num_adapters=16", "cluster.replica.gpu_adapter_slots=8")
    assert fixed.adapter_slots == 8
    per_slot = PROFILE.adapter_bytes(16) / rep.layout.block_bytes
    assert fixed.total_blocks - rep.total_blocks == pytest.approx(8 * per_slot, abs=1)


def test_auto_slots_are_capped_by_the_memory_fraction():
    rep = _replica("system=slora", "workload.num_adapters=128")
    budget = 0.05 * PROFILE.hardware.gpu_bytes * PROFILE.memory.gpu_utilization
    assert rep.adapter_slots == math.floor(budget / PROFILE.adapter_bytes(16)) < 128
    more = _replica("system=slora", "workload.num_adapters=128", "cluster.replica.adapter_memory_fraction=0.2")
    assert more.adapter_slots == 128


def test_pristine_copy_takes_exactly_its_bytes_from_the_kv_cache_of_merging_replicas():
    slora = _replica("system=slora", "cluster.replica.merge=pristine_gpu")
    dlora = _replica("system=dlora", "cluster.replica.merge=pristine_gpu")
    inplace = _replica("system=dlora", "cluster.replica.merge=inplace")
    assert slora.merge_copy_bytes == 0 and inplace.merge_copy_bytes == 0   # slora never merges
    assert dlora.merge_copy_bytes == PROFILE.model.merge_bytes
    assert inplace.total_blocks == slora.total_blocks
    free = lambda rep, reserved: (CostModel(PROFILE).usable_bytes() - PROFILE.model.weight_bytes   # noqa: E731
                                  - PROFILE.memory.activation_reserve_bytes
                                  - rep.adapter_slots * PROFILE.adapter_bytes(16) - reserved)
    assert dlora.total_blocks == math.floor(free(dlora, PROFILE.model.merge_bytes) / dlora.layout.block_bytes)
    assert slora.total_blocks == math.floor(free(slora, 0) / slora.layout.block_bytes)
    assert PROFILE.model.merge_bytes == pytest.approx(12.9e9, rel=0.01)   # the 7 projections of Llama-2-7B


def test_merge_strategies_price_mode_changes():
    sw = PROFILE.switch
    inplace, gpu, host = (CostModel(PROFILE, merge=m) for m in ("inplace", "pristine_gpu", "pristine_host"))
    assert (inplace.mode_change_time(None, 1), inplace.mode_change_time(1, None), inplace.mode_change_time(1, 2)) == \
        (sw.merge_s, sw.merge_s, 2 * sw.merge_s)        # a switch is an unmerge and a merge
    assert (gpu.mode_change_time(None, 1), gpu.mode_change_time(1, None), gpu.mode_change_time(1, 2)) == \
        (sw.merge_s, sw.unmerge_s, sw.switch_s)          # one fused pass from the pristine copy
    pcie = PROFILE.model.merge_bytes / PROFILE.transfers.host_to_gpu_bytes_per_s
    assert host.mode_change_time(1, 2) == host.mode_change_time(None, 1) == pcie > 10 * sw.merge_s
    assert gpu.merge_copy_bytes() == PROFILE.model.merge_bytes and inplace.merge_copy_bytes() == 0


def test_bad_memory_settings_name_the_key():
    with pytest.raises(ConfigError, match="cluster.replica.merge"):
        build_simulation(compose_cfg("cluster.replica.merge=fused"))
    with pytest.raises(ConfigError, match="gpu_adapter_slots"):
        build_simulation(compose_cfg("cluster.replica.gpu_adapter_slots=0"))
    with pytest.raises(ConfigError, match="gpu_adapter_slots"):
        build_simulation(compose_cfg("system=vllm", "cluster.replica.gpu_adapter_slots=auto"))
    with pytest.raises(ConfigError, match="adapter_memory_fraction"):
        build_simulation(compose_cfg("cluster.replica.adapter_memory_fraction=1.5"))
