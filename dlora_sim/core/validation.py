"""The rules a decision must keep before a replica applies it, and the memory accounting a replica must
keep after: a buggy policy fails loudly here, naming the replica and the rule, before any memory moves."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from dlora_sim.core.contracts import Decision, PolicyError
from dlora_sim.core.request import State, blocks_for, prefill_chunks

if TYPE_CHECKING:
    from dlora_sim.core.replica_state import ReplicaState

_QUEUED, _SWAPPED, _FINISHED = State.QUEUED, State.SWAPPED, State.FINISHED


def validate(rep: "ReplicaState", d: Decision) -> None:
    """Reject a decision that breaks a capacity or consistency rule (one pass over the batch)."""
    cfg, batch = rep.cfg, d.batch
    if len(batch) > cfg.max_num_seqs:
        raise PolicyError(f"replica {rep.id}: batch of {len(batch)} exceeds max_num_seqs {cfg.max_num_seqs}")
    members = set(batch)   # requests hash by identity
    if len(members) != len(batch):
        raise PolicyError(f"replica {rep.id}: a request appears twice in the batch")
    tokens, rid, swap_in = 0, rep.id, False
    adapters: set[int] = set()
    for r in batch:
        state = r.state
        if r.replica != rid or state >= _FINISHED:
            raise PolicyError(f"replica {rep.id}: request {r.id} is not runnable here")
        tokens += r.prompt_tokens + r.generated - r.prefilled if state == _QUEUED else 1
        swap_in = swap_in or state == _SWAPPED
        adapters.add(r.adapter)
    if rep.chunked_prefill:
        chunks, left = prefill_chunks(batch, cfg.max_num_batched_tokens, True)
        if left < 0 or (chunks and min(chunks) < 1):
            raise PolicyError(f"replica {rep.id}: the batch's decodes and prefill chunks exceed "
                              f"max_num_batched_tokens {cfg.max_num_batched_tokens} (a prefill gets no token)")
    elif tokens > cfg.max_num_batched_tokens and len(batch) > 1:
        raise PolicyError(f"replica {rep.id}: {tokens} tokens exceed max_num_batched_tokens")
    if d.prefetch and not cfg.adapter_prefetch:
        raise PolicyError(f"replica {rep.id}: a decision prefetches adapters without cluster.replica.adapter_prefetch")
    for r in d.swap_out:
        if r.state != State.RESIDENT or r in members or r.replica != rep.id:
            raise PolicyError(f"replica {rep.id}: cannot preempt request {r.id} ({r.state.name})")
    for r in d.recompute:   # a resident request, or a prompt part-way through chunked prefill
        if not (r.state == State.RESIDENT or (r.state == State.QUEUED and r.kv_blocks)) or r in members \
                or r.replica != rep.id:
            raise PolicyError(f"replica {rep.id}: cannot preempt request {r.id} ({r.state.name})")
    if d.swap_out and swap_in:
        raise PolicyError(f"replica {rep.id}: swap-in and swap-out in the same iteration")
    resident = rep.resident
    if d.evict or d.load:
        resident = dict(resident)
        for a in d.evict:
            if a not in resident:
                raise PolicyError(f"replica {rep.id}: evicting adapter {a}, which is not resident")
            del resident[a]
        for a in d.load:
            if a in resident:
                raise PolicyError(f"replica {rep.id}: loading adapter {a}, which is already resident")
            resident[a] = None
        if len(resident) > rep.adapter_slots:
            raise PolicyError(f"replica {rep.id}: {len(resident)} resident adapters exceed "
                              f"{rep.adapter_slots} slots")
    if d.merged is not None:
        if d.merged not in resident:
            raise PolicyError(f"replica {rep.id}: merging adapter {d.merged}, which is not resident")
        if adapters - {d.merged}:
            raise PolicyError(f"replica {rep.id}: merged on {d.merged} but the batch has other adapters")
    else:
        if rep.full_copy:
            raise PolicyError(f"replica {rep.id}: full-copy replicas run merged only")
        missing = [a for a in adapters if a not in resident]
        if missing:
            raise PolicyError(f"replica {rep.id}: unmerged batch uses non-resident adapters {sorted(missing)}")


def check_accounting(rep: "ReplicaState") -> None:
    """Every block is owned by exactly one request; nothing exceeds capacity."""
    flight = {id(r) for r in rep.running}
    gpu = sum(r.kv_blocks for r in rep.queue if r.state != State.SWAPPED or id(r) in flight)
    host = sum(r.kv_blocks for r in rep.queue if r.state == State.SWAPPED)
    cache = rep.prefix_cache
    if cache is not None:   # blocks of a cached prefix that several requests reference exist once
        gpu -= cache.shared_blocks()
        refs = Counter(k for r in rep.queue for k in r.cache_refs)
        if refs != Counter({k: n for k, n in cache.refs.items() if n}) or \
                cache.evictable != cache.blocks * len(cache.lru) or cache.evictable > rep.free_blocks:
            raise AssertionError(f"replica {rep.id}: prefix cache references or evictable blocks out of step")
    if gpu != rep.total_blocks - rep.free_blocks or not 0 <= rep.free_blocks <= rep.total_blocks:
        raise AssertionError(f"replica {rep.id}: KV accounting {gpu} used vs {rep.total_blocks - rep.free_blocks}")
    if host != rep.host_total_blocks - rep.host_free_blocks or rep.host_free_blocks < 0:
        raise AssertionError(f"replica {rep.id}: host swap accounting {host} vs "
                             f"{rep.host_total_blocks - rep.host_free_blocks}")
    if any(r.kv_blocks != blocks_for(r.prefilled, rep.block_size)
           for r in rep.queue if r.state == State.QUEUED and id(r) not in flight):
        raise AssertionError(f"replica {rep.id}: a queued request holds KV beyond its prefilled chunks")
    if len(rep.resident) > rep.adapter_slots:
        raise AssertionError(f"replica {rep.id}: {len(rep.resident)} adapters in {rep.adapter_slots} slots")
