"""experiment=production_stack varies only what it compares: every system of an arm gets the same cluster (slots,
memory, batch limits, host cache, prefix cache) but vLLM's rank padding, which uniform ranks make moot; every arm
changes only its own key; the workload is the same for all."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dlora_sim.core.config import compose

SYSTEMS = ("dlora", "vllm_lora", "vllm_gateway", "sglang_router")
ARMS = {"base": {}, "prefix_caching": {"prefix_caching": True}, "host_cache": {"host_adapter_cache": 32}}


def _cfg(system: str, arm: str):
    return compose(["experiment=production_stack", f"system={system}", f"+stack={arm}", "workload.num_adapters=256"])


@pytest.mark.parametrize("arm", list(ARMS))
def test_every_system_of_an_arm_gets_the_same_cluster_and_workload(arm):
    cfgs = {s: _cfg(s, arm) for s in SYSTEMS}
    clusters = {s: OmegaConf.to_container(c.cluster) for s, c in cfgs.items()}
    pads = {s: c["replica"].pop("max_lora_rank") for s, c in clusters.items()}
    assert pads == {"dlora": None, "vllm_lora": "max", "vllm_gateway": "max", "sglang_router": None}   # rank 16 only
    assert all(not c["preload"] for c in clusters.values())   # a cold start for all: dLoRA's placement loads nothing
    assert all(c == clusters["dlora"] for c in clusters.values())
    workloads = [OmegaConf.to_container(c.workload) for c in cfgs.values()]
    assert all(w == workloads[0] for w in workloads)
    assert workloads[0]["shared_prefix_by"] == "adapter" and workloads[0]["shared_prefix_tokens"] == 1024
    assert {c.arm for c in cfgs.values()} == {arm}
    base = OmegaConf.to_container(_cfg("dlora", "base").cluster)
    changed = {k: v for k, v in clusters["dlora"]["replica"].items() if base["replica"].get(k) != v}
    assert changed == ARMS[arm] and clusters["dlora"]["num_replicas"] == 8
