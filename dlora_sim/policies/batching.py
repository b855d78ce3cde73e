"""Shared mechanics of building a batch under the replica's limits, for every local policy.

A policy chooses *whose* requests to consider and in which order; these helpers apply the limits
every engine has: sequences and tokens per iteration, KV blocks with an admission watermark,
preemption (swap-out to bounded host memory, else recompute) of the lowest-priority resident
request when a selected decode needs a block, never a swap-in and a swap-out in one iteration (a
victim is recomputed once the plan swaps someone in; a swapped request waits once it swaps someone
out), and GPU adapter slots.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from dlora_sim.core.contracts import ReplicaView
from dlora_sim.core.request import Request, State, blocks_for, prefill_chunks


@dataclass(slots=True)
class BatchPlan:
    batch: list[Request] = field(default_factory=list)
    swap_out: list[Request] = field(default_factory=list)
    recompute: list[Request] = field(default_factory=list)
    adapters: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.batch)


def fill_batch(view: ReplicaView, candidates: Iterable[Request], *, plan: BatchPlan | None = None,
               limit: int | None = None, adapter_limit: int | None = None) -> BatchPlan:
    """Walk `candidates` in priority order and take each that fits; returns the (extended) plan.

    `limit` caps how many this call adds; `adapter_limit` caps distinct adapters in the whole batch.
    Resident requests outside the batch stay resident; one is preempted only when a selected,
    higher-priority decode needs a block that is not free. With the replica's `prefill_priority`,
    the candidates' prefills are taken first; without chunked prefill such an iteration then runs
    prefills only (vLLM's default scheduler), with it decodes fill the rest of the token budget.
    """
    if plan is None:
        if candidates is view.queue and limit is None and not view.prefill_priority:
            whole = _whole_queue(view, adapter_limit)
            if whole is not None:
                return whole
        plan = BatchPlan()
    if not view.prefill_priority:
        return _fill(view, candidates, plan, limit, adapter_limit, True)
    candidates = candidates if isinstance(candidates, list) else list(candidates)
    before = len(plan.batch)
    _fill(view, [r for r in candidates if r.state == _QUEUED], plan, limit, adapter_limit, False)
    added = len(plan.batch) - before
    if added and not view.chunked_prefill:
        return plan
    return _fill(view, candidates, plan, None if limit is None else limit - added, adapter_limit, True)


def _whole_queue(view: ReplicaView, adapter_limit: int | None) -> BatchPlan | None:
    """The plan `_fill` makes of the whole queue when the whole queue surely fits, else None (then
    `_fill` decides; it may still take it whole).

    The common decision (a queue that fits one batch) in one light pass. Sufficient: the queue fits the
    seats and the adapter limit, nobody is swapped out, its tokens fit the budget and all its new KV
    blocks fit the free ones (above the watermark when it prefills); then `_fill` takes every candidate
    in turn, adding their adapters to the plan's set one by one in order of first appearance."""
    queue = view.queue
    by_adapter = view.by_adapter()   # adapters in order of their oldest request: first appearance in FCFS
    if len(queue) > view.max_num_seqs or (adapter_limit is not None and len(by_adapter) > adapter_limit):
        return None
    bs, chunked = view.block_size, view.chunked_prefill
    tokens = need = 0
    prefills = False
    for r in queue:   # hot loop: blocks_for inlined, as in _fill
        state = r.state
        n = r.prompt_tokens + r.generated
        if state == _RESIDENT:
            tokens += 1
            add = -(-n // bs) - r.kv_blocks
        elif state == _QUEUED:
            prefills = True
            tokens += n - r.prefilled
            add = -(-n // bs) - r.kv_blocks if chunked else -(-n // bs)
        else:
            return None
        if add < 0:
            return None
        need += add
    if tokens > view.max_num_batched_tokens or need > view.free_blocks - (view.watermark_blocks if prefills else 0):
        return None
    adapters: set[int] = set()
    for a in by_adapter:   # one by one, as _fill adds them (a set built at once may iterate otherwise)
        adapters.add(a)
    return BatchPlan(list(queue), adapters=adapters)


def _fill(view: ReplicaView, candidates: Iterable[Request], plan: BatchPlan, limit: int | None,
          adapter_limit: int | None, make_room: bool) -> BatchPlan:
    # Requests hash by identity (eq=False), so sets of them are sets of objects, not of values
    batch, taken = plan.batch, set(plan.batch)
    preempted = set(plan.swap_out) | set(plan.recompute)
    bs = view.block_size
    seats = view.max_num_seqs - len(batch)
    added = 0
    chunked = view.chunked_prefill
    chunks, tokens = prefill_chunks(batch, view.max_num_batched_tokens, chunked)
    free = view.free_blocks - sum(_new_blocks(r, c, bs) for r, c in zip(batch, chunks))
    free += sum(view.freed_by(r) for r in plan.swap_out) + sum(view.freed_by(r) for r in plan.recompute)
    host_free = view.host_free_blocks - sum(r.kv_blocks for r in plan.swap_out)
    # one iteration never swaps both ways: once the plan swaps a request in, victims are recomputed
    swapping_in = any(r.state == _SWAPPED for r in batch)
    admit_prefill = True
    watermark = view.watermark_blocks
    victims: list[Request] | None = None
    blocked: Request | None = None   # the first candidate that only memory kept out
    for r in candidates:   # hot loop: plain attribute arithmetic
        if seats <= 0 or (limit is not None and added >= limit):
            break
        if r in taken or r in preempted:
            continue
        a = r.adapter
        if adapter_limit is not None and a not in plan.adapters and len(plan.adapters) >= adapter_limit:
            continue
        state = r.state
        n = r.prompt_tokens + r.generated
        if state == _RESIDENT:
            if tokens < 1:
                continue
            need = -(-n // bs) - r.kv_blocks   # blocks_for, inlined (the policies' hot loop)
            if need > free:
                if victims is None:
                    victims = [v for v in view.queue if _holds_gpu_kv(v)]
                while need > free:
                    v = _pop_victim(victims, r, taken, preempted)
                    if v is None:
                        break
                    preempted.add(v)
                    free += view.freed_by(v)
                    if not swapping_in and v.kv_blocks <= host_free and v.state == _RESIDENT:
                        host_free -= v.kv_blocks
                        plan.swap_out.append(v)
                    else:
                        plan.recompute.append(v)
                if need > free:
                    blocked = blocked or r
                    continue
            tokens -= 1
        elif state == _SWAPPED:
            if plan.swap_out or tokens < 1:
                continue
            need = -(-n // bs)   # blocks_for, inlined
            if need > free:
                blocked = blocked or r
                continue
            tokens -= 1
            swapping_in = True
        elif state == _QUEUED:
            if not admit_prefill:
                continue
            if chunked:   # a chunk of what the budget leaves (request.prefill_chunks)
                c = n - r.prefilled
                if c > tokens:
                    c = tokens
                need = -(-(r.prefilled + c) // bs) - r.kv_blocks   # blocks_for, inlined
                if c < 1 or free - need < watermark:
                    admit_prefill = False  # FCFS among prefills
                    if c >= 1:
                        blocked = blocked or r
                    continue
                tokens -= c
            else:
                need = -(-n // bs)   # blocks_for, inlined
                if (n > tokens and batch) or free - need < watermark:
                    admit_prefill = False  # FCFS among prefills: nobody jumps the first that does not fit
                    if n <= tokens or not batch:
                        blocked = blocked or r
                    continue
                tokens -= n
        else:
            raise ValueError(f"request {r.id} in state {state.name} cannot be scheduled")
        free -= need
        batch.append(r)
        taken.add(r)
        plan.adapters.add(a)
        seats -= 1
        added += 1
    if make_room and not batch and blocked is not None and seats > 0:
        _make_room(view, plan, blocked, free, host_free)
    return plan


def _make_room(view: ReplicaView, plan: BatchPlan, r: Request, free: int, host_free: int) -> None:
    """Nothing can run, yet memory is held by resident requests the policy did not select (say, other
    adapters' requests while merged): preempt them, latest first, so the chosen request runs. Victims
    of a swap-in are recomputed, since one iteration never swaps both ways, and so are prompts part-way
    through chunked prefill."""
    (chunk,), _ = prefill_chunks([r], view.max_num_batched_tokens, view.chunked_prefill)
    need = _new_blocks(r, chunk, view.block_size)
    victims = [v for v in view.queue if _holds_gpu_kv(v) and v is not r and v.kv_blocks > 0]
    swap_in = r.state == State.SWAPPED
    chosen_swap, chosen_recompute = [], []
    while need > free and victims:
        v = victims.pop()
        free += view.freed_by(v)
        if not swap_in and v.kv_blocks <= host_free and v.state == _RESIDENT:
            host_free -= v.kv_blocks
            chosen_swap.append(v)
        else:
            chosen_recompute.append(v)
    if need > free:
        return
    plan.swap_out.extend(chosen_swap)
    plan.recompute.extend(chosen_recompute)
    plan.batch.append(r)
    plan.adapters.add(r.adapter)


_QUEUED, _RESIDENT, _SWAPPED = State.QUEUED, State.RESIDENT, State.SWAPPED


def _holds_gpu_kv(r: Request) -> bool:
    """Resident, or a prompt part-way through chunked prefill: what a preemption can free."""
    return r.state == _RESIDENT or (r.state == _QUEUED and r.kv_blocks > 0)


def _new_blocks(r: Request, tokens: int, bs: int) -> int:
    """Blocks `r` adds when it runs `tokens` tokens (prefill_chunks) this iteration."""
    if r.state == _QUEUED:
        return blocks_for(r.prefilled + tokens, bs) - r.kv_blocks
    return blocks_for(r.context_len, bs) - (r.kv_blocks if r.state == _RESIDENT else 0)


def _pop_victim(victims: list[Request], for_req: Request, taken: set[Request], preempted: set[Request]) -> Request | None:
    """The latest-arriving resident request, outside the batch, of lower priority than `for_req`."""
    key = for_req.sort_key()
    while victims:
        v = victims[-1]
        if v.sort_key() <= key:
            return None
        victims.pop()
        if v not in taken and v not in preempted and v.kv_blocks > 0:
            return v
    return None


def batch_adapter_slots(view: ReplicaView, plan: BatchPlan, *,
                        lru: Callable[[], Sequence[int]] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`plan_adapter_slots` for a planned batch's adapters (in batch order); nothing to load in the
    common case, when all of them are resident, without a pass over the batch. `lru` is called only
    when an eviction order is needed."""
    resident = view.resident
    if all(a in resident for a in plan.adapters):
        return (), ()
    return plan_adapter_slots(view, (r.adapter for r in plan.batch), lru=lru() if lru is not None else None)


def plan_adapter_slots(view: ReplicaView, needed: Iterable[int], *, lru: Sequence[int] | None = None
                       ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Loads for `needed` adapters that are not resident, and the evictions that make room.

    Victims are resident adapters this iteration does not need: by default the one with the fewest
    outstanding requests on the replica (dLoRA); with `lru` (least recent first), the least recently used.
    """
    needed = list(dict.fromkeys(needed))
    need_set = set(needed)
    loads = tuple(a for a in needed if a not in view.resident)
    overflow = len(view.resident) + len(loads) - view.adapter_slots
    if overflow <= 0:
        return loads, ()
    spare = [a for a in view.resident if a not in need_set]
    if lru is not None:
        order = {a: i for i, a in enumerate(lru)}
        spare.sort(key=lambda a: order.get(a, -1))
    else:
        outstanding = Counter(r.adapter for r in view.queue)
        spare.sort(key=lambda a: (outstanding.get(a, 0), a))
    if overflow > len(spare):
        raise ValueError(f"replica {view.id}: {len(need_set)} adapters needed but only {view.adapter_slots} slots")
    return loads, tuple(spare[:overflow])


def adapter_prefetch(view: ReplicaView, load: Sequence[int], evict: Sequence[int]) -> tuple[int, ...]:
    """S-LoRA's prefetch (`cluster.replica.adapter_prefetch`), the same for every policy: the queue's adapters not
    in GPU slots once this decision's loads and evictions are done, oldest request first, only as many as host
    memory holds beside the GPU's adapters (a prefetch that evicted a more urgent one would be wasted). The
    replica starts those not already in host memory or on their way (core/adapter_tiers.py)."""
    cache = view.host_adapter_cache
    if not view.adapter_prefetch or cache is None:   # validation refuses a prefetch without a host cache
        return ()
    resident = (set(view.resident) - set(evict)) | set(load)
    room = max(cache - len(resident), 1)
    return tuple([a for a in view.by_adapter() if a not in resident][:room])
