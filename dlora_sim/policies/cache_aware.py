"""SGLang's router (sgl-model-gateway): cache-aware dispatch on prompt text, blind to adapters.

The router keeps an approximate radix tree of the prompts it sent to each worker and, while the workers' loads
are balanced, sends a request to the worker whose tree shares the longest prefix with its prompt if that prefix
is more than `cache_threshold` of it; otherwise, and whenever loads are imbalanced, to the least loaded worker.
(The policy's header comment says a miss goes to the worker with the smallest tree, as older sgl-router versions
did; its code picks the least loaded: `min_by_key(load)` in sgl-model-gateway's src/policies/cache_aware.rs.)
Its tree keys on text only: a request's adapter (`lora_path`) is forwarded, never routed on (checked in the
gateway's cache_aware policy and HTTP router), so requests of two adapters that open alike go together though
their engines' caches keep them apart, and nothing keeps an adapter's requests together but their text.

Here the text is the prompt's prefix-block hashes (the workload's; none = no match, so least loaded), matched
block by block: the share matched is blocks matched / the prompt's blocks (SGLang's: characters). Load is the
worker's outstanding requests (SGLang's router counts its own requests in flight per worker). The tree's size
bound evicts the least recently used blocks of a worker at insertion (SGLang's evicts on a timer); with the
default bound (2^26 characters, ~16M tokens at ~4 characters a token) no run of ours reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dlora_sim.core.contracts import ClusterView, Router
from dlora_sim.core.request import Request
from dlora_sim.policies.dispatch import least_loaded


@dataclass
class CacheAware(Router):
    """SGLang's default `cache_aware` policy with its CLI defaults (router_args.py): cache_threshold 0.3, imbalance
    when max - min load > 64 and max > 1.5 x min; ties go to the lowest worker id."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_blocks: int = 32768   # per worker; 2^26 characters / ~4 per token / 512-token blocks
    reads_progress = False
    _trees: list[dict[int, None]] = field(default_factory=list, repr=False)   # chain key -> None, LRU order

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"router.cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ValueError("router.balance_abs_threshold must be >= 0 and router.balance_rel_threshold >= 1, got "
                             f"{self.balance_abs_threshold}, {self.balance_rel_threshold}")
        if self.max_tree_blocks < 1:
            raise ValueError(f"router.max_tree_blocks must be >= 1, got {self.max_tree_blocks}")

    def dispatch(self, request: Request, cluster: ClusterView) -> int:
        reps = cluster.replicas
        if not self._trees:
            self._trees = [{} for _ in reps]
        js = self.candidates(request, cluster)
        loads = [len(reps[j].queue) for j in js]
        keys = _chain(request.prefix)
        best = least_loaded(reps, js)
        if keys and not (max(loads) - min(loads) > self.balance_abs_threshold
                         and max(loads) > min(loads) * self.balance_rel_threshold):
            matched = [_matched(self._trees[j], keys) for j in js]
            top = max(matched)
            if top / len(keys) > self.cache_threshold:
                best = js[matched.index(top)]
        self._insert(self._trees[best], keys)
        return best

    def _insert(self, tree: dict[int, None], keys: list[int]) -> None:
        for k in keys:
            tree.pop(k, None)
            tree[k] = None
        while len(tree) > self.max_tree_blocks:
            del tree[next(iter(tree))]


def _chain(prefix: tuple[int, ...]) -> list[int]:
    """One key per block for the prompt up to and including it (a radix tree's path)."""
    keys, k = [], 0
    for h in prefix:
        k = hash((k, h))
        keys.append(k)
    return keys


def _matched(tree: dict[int, None], keys: list[int]) -> int:
    """Blocks of the prompt's opening the worker's tree holds."""
    n = 0
    for k in keys:
        if k not in tree:
            break
        n += 1
    return n
