"""Chunked prefill (Sarathi-style token budget) and prefill-priority admission, for every policy."""
from __future__ import annotations

import pytest

from sim_helpers import SYSTEMS, requests_csv, run_cfg
from dlora_sim.core.config import ConfigError
from dlora_sim.core.request import NS, Request, State, prefill_chunks
from dlora_sim.core.workload import RequestSpec, Workload
from test_engine_invariants import check_invariants

BUDGET = 2048
CHUNKED = [f"cluster.replica.max_num_batched_tokens={BUDGET}", "cluster.replica.chunked_prefill=true"]


def _ns(s: float) -> int:
    return int(round(s * NS))


@pytest.mark.parametrize("system,merged", [("slora", False), ("merged", True), ("dlora", None)])
@pytest.mark.parametrize("prompt,output", [(5000, 4), (4096, 1), (2049, 3)])
def test_a_chunked_prompt_takes_its_chunks_then_decodes(system, merged, prompt, output):
    """Closed form: chunks of the budget (the last one short) whose attention sums to prompt^2, each an
    iteration with no token; the last chunk yields the first token; then decodes."""
    wl = Workload.from_requests([RequestSpec(0.0, 0, prompt, output)], num_adapters=1)
    sim, res = run_cfg(f"system={system}", "cluster.num_replicas=1", "router=least_loaded", *CHUNKED, workload=wl)
    (r,) = res.requests
    cost, prof, rank = sim.cluster.cost, sim.cluster.profile, 16
    rows = res.recorder.rows
    merged = rows[0].merged is not None if merged is None else merged
    lora = (lambda tokens: dict(lora_rank_sum=0, lora_token_rank=0, lora_passes=0)) if merged else (lambda tokens: dict(lora_rank_sum=rank, lora_token_rank=tokens * rank, lora_passes=1))   # one adapter
    chunks = [BUDGET] * ((prompt - 1) // BUDGET) + [prompt - BUDGET * ((prompt - 1) // BUDGET)]
    t = _ns(cost.load_time(prof.adapter_bytes(rank)) + (cost.mode_change_time(None, 0) if merged else 0.0)
            + cost.iteration_time(prefill_tokens=chunks[0], prefill_sq=chunks[0] ** 2, num_seqs=1,
                                **lora(chunks[0])))
    done = chunks[0]
    for c in chunks[1:]:
        t += _ns(cost.iteration_time(prefill_tokens=c, prefill_sq=c * (2 * done + c), num_seqs=1, **lora(c)))
        done += c
    assert sum(c * (2 * p + c) for c, p in zip(chunks, [0, *[sum(chunks[:i + 1]) for i in range(len(chunks))]])) \
        == prompt ** 2
    assert r.first_token == t
    for g in range(1, output):
        t += _ns(cost.iteration_time(decode_seqs=1, decode_context=prompt + g, num_seqs=1, **lora(1)))
    assert r.finish == t
    assert res.recorder.num_iterations == len(chunks) + output - 1
    assert [row.prefill_tokens for row in rows[:len(chunks)]] == chunks   # prefill_tokens per iteration
    assert res.recorder.counters["prefill_chunks"] == len(chunks) - 1
    assert r.state == State.FINISHED and r.kv_blocks == 0 and r.prefilled == 0


def test_a_chunk_shares_the_budget_with_decodes_and_holds_its_kv():
    """Sarathi: decodes of running requests take a token each; the long prompt's chunk takes the rest."""
    wl = Workload.from_requests([RequestSpec(0.0, 0, 100, 60), RequestSpec(0.0, 0, 100, 60),
                                 RequestSpec(0.5, 1, 9000, 2)], num_adapters=2)
    sim, res = run_cfg("system=slora", "cluster.num_replicas=1", *CHUNKED, workload=wl)
    long = res.requests[2]
    mixed = [row for row in res.recorder.rows if row.prefill_tokens and row.decode_seqs]   # prefill tokens and decodes together
    assert sum(row.prefill_tokens for row in res.recorder.rows if row.start >= 0.5 * NS) >= 9000
    assert mixed and all(row.prefill_tokens + row.decode_seqs <= BUDGET for row in res.recorder.rows)
    assert any(row.prefill_tokens == BUDGET - 2 and row.decode_seqs == 2 for row in mixed)
    check_invariants(sim, res)
    assert long.first_token > long.first_scheduled


def test_prefill_chunks_is_the_rule_batches_follow():
    def req(i, state, prompt, prefilled=0):
        r = Request(i, 0, 0, prompt, 5)
        r.state, r.prefilled = state, prefilled
        return r
    batch = [req(0, State.RESIDENT, 10), req(1, State.QUEUED, 3000, prefilled=1000), req(2, State.QUEUED, 50)]
    assert prefill_chunks(batch, 1024, chunked=True) == ([1, 1023, 0], 0)
    assert prefill_chunks(batch, 1024, chunked=False) == ([1, 2000, 50], 1024 - 2051)


def test_prefill_priority_runs_prefills_alone_without_chunking():
    """vLLM's default scheduler: an admissible prefill runs in an iteration of its own, pausing decodes."""
    wl = Workload.from_requests([RequestSpec(0.0, 0, 50, 200), RequestSpec(0.3, 0, 50, 5)], num_adapters=1)
    _, plain = run_cfg("system=slora", "cluster.num_replicas=1", workload=wl)
    _, prio = run_cfg("system=slora", "cluster.num_replicas=1", "cluster.replica.prefill_priority=true", workload=wl)
    second = lambda res: [row for row in res.recorder.rows if row.prefill_tokens][1]   # the second request's prefill
    assert second(plain).decode_seqs == 1 and second(prio).decode_seqs == 0
    assert prio.requests[1].first_token < plain.requests[1].first_token   # a shorter iteration, no decode in it


@pytest.mark.parametrize("system", SYSTEMS)
def test_long_prompts_run_chunked_on_every_system(system):
    """Prompts up to 4x the budget on a small KV cache, under every policy: nothing is rejected, every
    prompt is prefilled exactly once (recomputes aside), memory is accounted after every step."""
    rows = [(0.1 * i, i % 3, 300 + 700 * (i % 5), 20 + 7 * (i % 4)) for i in range(30)]
    wl = Workload.from_requests([RequestSpec(*x) for x in rows], num_adapters=3)
    for priority in ("false", "true"):
        sim, res = run_cfg(f"system={system}", "cluster.num_replicas=1", "cluster.replica.max_num_batched_tokens=1024",
                           "cluster.replica.chunked_prefill=true", f"cluster.replica.prefill_priority={priority}",
                           "cluster.replica.max_kv_blocks=500", "cluster.replica.max_num_seqs=8", workload=wl)
        check_invariants(sim, res)
        assert res.recorder.counters["prefill_chunks"] > 0
        assert all(row.prefill_tokens + row.decode_seqs <= 1024 for row in res.recorder.rows)


def test_without_chunking_a_long_prompt_is_rejected_naming_the_option():
    wl = Workload.from_requests([RequestSpec(0.0, 0, 5000, 4)], num_adapters=1)
    _, res = run_cfg("system=slora", "cluster.num_replicas=1", f"cluster.replica.max_num_batched_tokens={BUDGET}",
                     "cluster.replica.chunked_prefill=false", workload=wl)
    assert res.requests[0].state == State.REJECTED and "chunked prefill" in res.requests[0].reject_reason


def test_auto_chunks_only_workloads_with_a_prompt_over_the_budget():
    """The default (auto) serves the long prompt in chunks; a workload whose prompts fit runs unchunked,
    byte for byte as with chunking off."""
    long = Workload.from_requests([RequestSpec(0.0, 0, 5000, 4), RequestSpec(0.1, 0, 100, 4)], num_adapters=1)
    _, res = run_cfg("system=slora", "cluster.num_replicas=1", f"cluster.replica.max_num_batched_tokens={BUDGET}",
                     workload=long)
    assert all(r.state == State.FINISHED for r in res.requests) and res.extra["chunked_prefill"] is True
    short = ["system=dlora", "workload.num_requests=60", "cluster.num_replicas=2"]
    _, auto = run_cfg(*short)
    _, off = run_cfg(*short, "cluster.replica.chunked_prefill=false")
    assert auto.extra["chunked_prefill"] is False
    assert requests_csv(auto) == requests_csv(off)
    assert auto.recorder.rows == off.recorder.rows


def test_chunked_prefill_accepts_only_true_false_or_auto():
    with pytest.raises(ConfigError, match="cluster.replica.chunked_prefill"):
        run_cfg("system=slora", "cluster.replica.chunked_prefill=sometimes")
