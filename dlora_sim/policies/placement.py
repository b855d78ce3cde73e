"""dLoRA's greedy initial adapter placement (docs/algorithm.md): memory per unit of demand, then replication.

Phase 1 places every adapter once, most demanded first, on the replica with the most KV memory per
unit of demand after adding it, with at most ceil(adapters / replicas) adapters per replica so counts
stay balanced. Phase 2 repeatedly replicates the adapter whose worst (KV memory of its hosts) /
(demand) ratio is lowest onto the replica that raises it most, until there are replicas + adapters - 1
placements (or slots run out). A replica's memory is shared among its adapters in proportion to the
demand they bring it (an adapter on h replicas brings d/h to each).
"""
from __future__ import annotations

import math
from typing import Sequence


def _ratio(k: int, hosts: list[list[int]], demand: Sequence[float], kv: Sequence[float],
           load: Sequence[float]) -> float:
    """KV memory adapter k gets per unit of its demand."""
    if demand[k] <= 0:
        return math.inf
    # each host j gives it kv_j * (its share d/h of j's load) / load_j; per unit of d that is kv_j / (h load_j),
    # which stays finite for demands so small that d/h underflows (load_j > 0: it includes this adapter)
    h = len(hosts[k])
    return sum(kv[j] / (h * load[j]) if load[j] > 0 else math.inf for j in hosts[k])


def _loads(hosts: list[list[int]], demand: Sequence[float], m: int) -> list[float]:
    load = [0.0] * m
    for k, hs in enumerate(hosts):
        for j in hs:
            load[j] += demand[k] / len(hs)
    return load


def greedy_placement(demand: Sequence[float], kv_blocks: Sequence[int], slots: Sequence[int],
                     target: int | None = None) -> list[list[int]]:
    """Hosts (sorted replica ids) of each adapter. `target` placements (default replicas + adapters - 1)."""
    n, m = len(demand), len(kv_blocks)
    if m < 1 or len(slots) != m:
        raise ValueError("need at least one replica and one slot count per replica")
    if any(d < 0 for d in demand):
        raise ValueError("adapter demand must be >= 0")
    if n > sum(slots):
        raise ValueError(f"{n} adapters do not fit in {sum(slots)} GPU adapter slots across {m} replicas")
    target = n + m - 1 if target is None else target
    target = min(max(target, n), sum(slots), n * m)
    if all(s >= n for s in slots) and target == n * m:   # room for every adapter everywhere: no choice left
        return [list(range(m)) for _ in range(n)]
    cap = [min(s, math.ceil(n / m)) for s in slots]
    if sum(cap) < n:   # uneven slots: fall back to the slots themselves
        cap = list(slots)
    hosts: list[list[int]] = [[] for _ in range(n)]
    count = [0] * m
    load = [0.0] * m
    for k in sorted(range(n), key=lambda k: (-demand[k], k)):
        j = min((j for j in range(m) if count[j] < cap[j]),
                key=lambda j: ((load[j] + demand[k]) / kv_blocks[j], count[j], j))
        hosts[k].append(j)
        count[j] += 1
        load[j] += demand[k]
    placed = n
    while placed < target:
        load = _loads(hosts, demand, m)
        order = sorted(range(n), key=lambda k: (_ratio(k, hosts, demand, kv_blocks, load), -demand[k], k))
        done = False
        for k in order:
            if demand[k] <= 0:
                break
            cands = [j for j in range(m) if j not in hosts[k] and count[j] < slots[j]]
            if not cands:
                continue
            def score(j: int) -> tuple[float, float, int]:
                trial = [list(h) for h in hosts]
                trial[k].append(j)
                tl = _loads(trial, demand, m)
                worst = min(_ratio(a, trial, demand, kv_blocks, tl) for a in range(n))
                return (worst, _ratio(k, trial, demand, kv_blocks, tl), -j)
            best = (max(cands, key=score),)
            hosts[k].append(best[0])
            hosts[k].sort()
            count[best[0]] += 1
            placed += 1
            done = True
            break
        if not done:
            break
    for h in hosts:
        h.sort()
    return hosts
