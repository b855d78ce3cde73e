"""The shared batching rules on constructed replica states."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from dlora_util import PROFILE
from dlora_sim.core.cost_model import CostModel
from dlora_sim.core.replica_config import ReplicaConfig
from dlora_sim.core.replica_state import ReplicaState
from dlora_sim.core.request import Request, State, blocks_for
from dlora_sim.core.results import Recorder
from dlora_sim.policies.batching import BatchPlan, _fill, _whole_queue, fill_batch


def _replica(blocks: int) -> ReplicaState:
    cfg = ReplicaConfig(max_num_seqs=8, max_kv_blocks=blocks, watermark=0.0, chunked_prefill=False)
    return ReplicaState(0, cfg, CostModel(PROFILE), [16], Recorder(), lambda r: None, lambda: 0)


def _resident(rep: ReplicaState, i: int, context: int) -> Request:
    """A decoding request whose KV holds context - 1 tokens; its next iteration writes token `context`."""
    r = Request(i, 0, i, context - 1, 100, generated=1, state=State.RESIDENT)
    r.kv_blocks = blocks_for(r.context_len - 1, rep.block_size)
    rep.free_blocks -= r.kv_blocks
    rep.enqueue(r)
    return r


def test_a_plan_that_swaps_in_recomputes_its_victims():
    """The oldest request is swapped out and runs again (a swap-in); a decode then needs a block that
    only a later request holds. That victim must be recomputed: one iteration never swaps both ways."""
    rep = _replica(blocks=10)
    swapped = Request(0, 0, 0, 31, 100, generated=1, state=State.SWAPPED, kv_blocks=2)
    rep.host_free_blocks -= 2
    rep.enqueue(swapped)
    grower = _resident(rep, 1, 65)      # 4 full blocks: its next token needs a fifth
    victim = _resident(rep, 2, 65)      # 4 blocks, the latest arrival
    assert rep.free_blocks == 2         # exactly the swap-in's blocks
    plan = fill_batch(rep, [swapped, grower])
    assert plan.batch == [swapped, grower]
    assert plan.swap_out == [] and plan.recompute == [victim]


def test_without_a_swap_in_the_victim_is_swapped_out():
    rep = _replica(blocks=8)
    grower = _resident(rep, 1, 65)
    victim = _resident(rep, 2, 65)
    assert rep.free_blocks == 0
    plan = fill_batch(rep, [grower])
    assert plan.batch == [grower] and plan.swap_out == [victim] and plan.recompute == []


@settings(max_examples=150, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 300), st.integers(0, 40), st.booleans(),
                               st.integers(0, 299)), max_size=14),
       seqs=st.integers(1, 12), budget=st.integers(16, 2048), blocks=st.integers(1, 200),
       watermark=st.sampled_from([0.0, 0.05]), chunked=st.booleans(), limit=st.sampled_from([None, 1, 2, 3, 8]))
def test_the_whole_queue_fast_path_makes_the_plan_fill_makes(reqs, seqs, budget, blocks, watermark, chunked, limit):
    """Whenever fill_batch takes a queue whole in its light pass, the plan is `_fill`'s own: the same
    requests in the same order, the same adapters in the same order, nobody preempted."""
    cfg = ReplicaConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, max_kv_blocks=blocks, watermark=watermark,
                        chunked_prefill=chunked)
    rep = ReplicaState(0, cfg, CostModel(PROFILE), [16] * 41, Recorder(), lambda r: None, lambda: 0)
    for i, (a, prompt, gen, decoding, prefilled) in enumerate(reqs):
        r = Request(i, a, i, prompt, 400, generated=gen)
        if decoding:   # resident: KV for every token but the one its next iteration writes
            r.state, r.generated = State.RESIDENT, gen + 1
            r.kv_blocks = blocks_for(r.context_len - 1, rep.block_size)
        elif chunked:   # a prompt part-way through its chunks
            r.prefilled = min(prefilled, r.context_len - 1)
            r.kv_blocks = blocks_for(r.prefilled, rep.block_size)
        if r.kv_blocks > rep.free_blocks:
            continue
        rep.free_blocks -= r.kv_blocks
        rep.enqueue(r)
    whole = _whole_queue(rep, limit)
    slow = _fill(rep, rep.queue, BatchPlan(), None, limit, True)
    if whole is not None:
        assert whole.batch == slow.batch == rep.queue and all(x is y for x, y in zip(whole.batch, slow.batch))
        assert list(whole.adapters) == list(slow.adapters)
        assert not slow.swap_out and not slow.recompute
