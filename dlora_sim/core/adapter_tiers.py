"""Where an adapter is when a GPU slot asks for it: host memory, or the backing store behind it.

Off by default: every adapter sits in host memory and a load costs its bytes over the host-to-GPU link. With a
bounded host cache (`cluster.replica.host_adapter_cache`: vLLM's max_cpu_loras, SGLang's max_loaded_loras) host
memory holds the most recently used adapters; a GPU load of any other first fetches it from the store (disk or a
remote object store, `CostModel.store_time`), and the fetched adapter takes the least recently used host entry.
With prefetch (S-LoRA's), every decision also starts fetches of the adapters that queued requests will load, one
at a time over the store link, so their loads later wait only for what is left of the fetch. A fetch on demand is
its own request to the store: it does not queue behind prefetches, and a decision's fetches add up.

A replica's `ReplicaState` owns one, so every executor prices tiers alike (the runtime's virtual clock too).
Times are integer ns on the replica's clock.
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal

from dlora_sim.core.request import NS

Tier = Literal["host", "store", "prefetched"]


class AdapterTiers:
    def __init__(self, capacity: int, store_ns: Callable[[int], int], preloaded: Iterable[int] = ()):
        """`capacity` adapters fit in host memory; `store_ns(nbytes)` is one fetch from the store."""
        self.capacity = capacity
        self._store_ns = store_ns
        self.host: dict[int, None] = {}        # least recently used first
        self.fetching: dict[int, int] = {}     # adapter -> ns its prefetch lands in host memory
        self._link_free = 0                    # ns the store link finishes the fetches started so far
        self.evictions = 0
        for a in preloaded:
            self._keep(a)

    def _keep(self, a: int) -> None:
        """`a` is in host memory now, the most recently used; the least recently used beyond capacity leaves."""
        self.host.pop(a, None)
        self.host[a] = None
        while len(self.host) > self.capacity:
            del self.host[next(iter(self.host))]
            self.evictions += 1

    def settle(self, now: int) -> None:
        """Prefetches that landed by `now` join host memory, in the order they landed."""
        for a, ready in sorted(self.fetching.items(), key=lambda kv: kv[1]):
            if ready > now:
                break
            del self.fetching[a]
            self._keep(a)

    def load(self, a: int, nbytes: int, now: int) -> tuple[float, Tier]:
        """A GPU load of `a` (`nbytes`) starting at `now`: seconds it waits on the store first, and the tier
        it came from. Afterwards `a` is in host memory, the most recently used."""
        ready = self.fetching.pop(a, None)
        if a in self.host:
            self._keep(a)
            return 0.0, "host"
        self._keep(a)
        if ready is not None:   # prefetched: what is left of its fetch
            return max(ready - now, 0) / NS, "prefetched"
        return self._store_ns(nbytes) / NS, "store"

    def prefetch(self, adapters: Iterable[int], nbytes: Callable[[int], int], now: int, depth: int) -> int:
        """Start fetches of `adapters` (most urgent first) that are neither in host memory nor on their way,
        keeping at most `depth` in flight, each after the previous on the store link. Returns how many started."""
        started = 0
        for a in adapters:
            if len(self.fetching) >= depth:
                break
            if a in self.host or a in self.fetching:
                continue
            start = max(now, self._link_free)
            self._link_free = self.fetching[a] = start + self._store_ns(nbytes(a))
            started += 1
        return started
