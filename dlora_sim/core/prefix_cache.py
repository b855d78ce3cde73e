"""Prefix caching keyed by adapter: KV blocks of prompt prefixes kept after their requests and shared by later ones.

vLLM (automatic prefix caching, its block hashes include the LoRA id) and SGLang (the radix cache) reuse the KV of
a prompt prefix they computed before. Under LoRA the same prefix under two adapters is two different KV entries, so
an entry's key is the adapter and the prefix's block hashes up to it: `(adapter, h0, ..., hi)` (a request's
`prefix`, e.g. Mooncake's `hash_ids`, one hash per `block_tokens` prompt tokens). Merged and unmerged execution
of one adapter compute the same KV and share entries; two adapters never do.

Accounting keeps each request's `kv_blocks` as the blocks of its whole context, as without caching, and corrects
the replica's free blocks where blocks are shared (the one place that arithmetic lives):
- when a request's first prefill chunk runs, it takes the longest run of cached entries from the start of its
  prompt within that chunk (`acquire`): the chunk computes only the rest (priced as a later chunk over the
  cached prefix is), and each entry another request already references is credited back (its blocks exist
  once). The chunk keeps the tokens and blocks its policy planned, so no policy needs to know the cache to plan
  within memory; a chunk the token budget cut then also takes the entries past it (`extension`, `take`) as far as
  the blocks the batch leaves free allow, so a long prompt reuses its whole cached prefix as in vLLM (the cached
  tokens of the first chunk still count against the token budget, where vLLM counts only computed ones);
- when its prompt is complete its remaining full blocks become entries it references (`register`);
- when it stops holding KV on the GPU (finishes, leaves, is preempted) its entries lose a reference (`release`):
  an entry still referenced is debited (its blocks stay in use), an unreferenced one stays cached, counted as
  free but held, and the least recently used of those are evicted when the blocks are needed (`reclaim`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlora_sim.core.request import Request

Key = tuple[int, ...]


class PrefixCache:
    def __init__(self, block_tokens: int, kv_block_size: int):
        if block_tokens < 1 or block_tokens % kv_block_size:
            raise ValueError(f"a prefix block of {block_tokens} tokens is not a whole number of KV blocks of "
                             f"{kv_block_size} tokens (cluster.replica.block_size)")
        self.block_tokens = block_tokens
        self.blocks = block_tokens // kv_block_size   # KV blocks an entry holds
        self.refs: dict[Key, int] = {}                # every cached entry and the requests referencing it
        self.lru: dict[Key, None] = {}                # the unreferenced entries, least recently used first
        self.evictable = 0                            # their KV blocks: counted free, held until evicted
        self.evictions = 0

    def keys(self, r: "Request") -> list[Key]:
        """The keys of the full prefix blocks of r's prompt, shortest first."""
        hashes = r.prefix[: r.prompt_tokens // self.block_tokens]
        return [(r.adapter, *hashes[: i + 1]) for i in range(len(hashes))]

    def acquire(self, r: "Request", tokens: int) -> tuple[int, int]:
        """r's first chunk of `tokens` tokens is about to run: reference the longest cached run of its prefix
        within it, leaving at least one token to compute. Returns (the cached tokens, KV blocks to credit:
        entries other requests reference)."""
        r.cache_refs = ()
        credit = self.take(r, len(self.extension(r, tokens)))
        return len(r.cache_refs) * self.block_tokens, credit

    def extension(self, r: "Request", tokens: int) -> list[bool]:
        """The cached entries that continue r's referenced prefix, within its first `tokens - 1` tokens: for
        each, whether other requests reference it (taking it then costs no block)."""
        most = (tokens - 1) // self.block_tokens
        found: list[bool] = []
        for key in self.keys(r)[len(r.cache_refs):most]:
            n = self.refs.get(key)
            if n is None:
                break
            found.append(n > 0)
        return found

    def take(self, r: "Request", count: int) -> int:
        """Reference the next `count` entries of r's prefix (`extension` found them). Returns the KV blocks to
        credit (entries other requests already reference)."""
        keys = self.keys(r)[len(r.cache_refs):len(r.cache_refs) + count]
        credit = 0
        for key in keys:
            n = self.refs[key]
            if n:
                credit += self.blocks
            else:
                del self.lru[key]
                self.evictable -= self.blocks
            self.refs[key] = n + 1
        r.cache_refs += tuple(keys)
        return credit

    def register(self, r: "Request") -> None:
        """r's prompt KV is complete: its full blocks past those it took from the cache become entries it
        references (up to the first another request cached meanwhile: r keeps its own copy from there)."""
        new: list[Key] = []
        for key in self.keys(r)[len(r.cache_refs):]:
            if key in self.refs:
                break
            self.refs[key] = 1
            new.append(key)
        if new:
            r.cache_refs += tuple(new)

    def release(self, r: "Request") -> int:
        """r no longer holds KV on this GPU: drop its references. Returns KV blocks to debit (entries other
        requests still reference: their blocks stay in use)."""
        debit = 0
        for key in reversed(r.cache_refs):   # the tail first into the LRU: a prefix outlives its extensions
            n = self.refs[key] - 1
            self.refs[key] = n
            if n:
                debit += self.blocks
            else:
                self.lru[key] = None
                self.evictable += self.blocks
        r.cache_refs = ()
        return debit

    def reclaim(self, free_blocks: int) -> None:
        """Evict the least recently used unreferenced entries until the blocks counted free exist."""
        while self.evictable > free_blocks and self.lru:
            key = next(iter(self.lru))
            del self.lru[key], self.refs[key]
            self.evictable -= self.blocks
            self.evictions += 1

    def shared_blocks(self) -> int:
        """KV blocks that requests' `kv_blocks` count more than once (an entry referenced n times: n - 1)."""
        return sum(self.blocks * (n - 1) for n in self.refs.values() if n > 1)
