"""Outstanding work in integer nanoseconds, shared by the dLoRA router and the co-migration ILP.

Both global policies must rank replicas in the same unit (time, no division of counts: lightly loaded
replicas must not all tie at zero), and both need each request's *expected* remaining time. Output
lengths are unknown at dispatch, so a request's remaining decode tokens come from a per-adapter running
mean of the output lengths observed so far, in whole tokens (looked up by the request's own adapter;
taken anew when it moves by more than `relearn`), at least one; `lengths="oracle"` uses the true length
(an upper bound on what estimation can buy). Times come from the cost model of the profile, rounded once
to integer ns per token and per prefill, so a queue's work is an integer: the same whichever order it is
summed in, and remembered exactly.

A queue's work: per adapter, its requests' remaining decode tokens x the per-token time, plus each waiting
prompt's prefill; an adapter with at least one full batch queued (n_a >= B) has the share of its work in
full batches discounted by the merged/unmerged iteration-time ratio (they run merged). A replica's price
is remembered until the replica changes (`version`) or the estimates do, as a function of its batch in
flight's `lag` (iterations an executor ended but has not applied): a dispatch prices a host that only
fast-forwarded since the last one with a bisection, without applying anything (`replica_ns`), equal bit
for bit to the definition recomputed from the requests once they are brought up to date (`queue_ns`).
"""
from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Collection, Iterable, Sequence

from dlora_sim.core.request import NS, Request, State, blocks_for, to_ns

if TYPE_CHECKING:
    from dlora_sim.core.cost_model import CostModel
    from dlora_sim.core.contracts import ReplicaView

PPM = 1_000_000   # the merged/unmerged ratio in parts per million (integer discounts)


@dataclass(slots=True)
class _Shape:
    """A replica's work as a function of its batch in flight's lag, fixed while its version is."""

    version: int
    epoch: int
    fixed: int                  # ns that do not depend on the lag (or, with `exact`, nothing is remembered)
    slacks: list[int]           # expected remaining tokens of each request in flight, sorted
    prefix: list[int]           # their running sums, from 0
    exact: bool = False         # a full adapter queued: priced from the requests at every read


@dataclass
class WorkModel:
    """Expected remaining work per request and per replica queue, in integer ns (seconds: `*_s`)."""

    prior_output_tokens: float = 256.0   # prior mean output length of an adapter never observed
    prior_weight: float = 1.0            # pseudo-observations the prior counts for
    lengths: str = "estimate"            # estimate | oracle
    merge_aware: bool = True             # discount full single-adapter batches by merged/unmerged time
    ref_context: int = 512               # context per sequence of the reference decode batch
    ref_adapters: int = 4                # distinct adapters in the reference unmerged batch
    relearn: float = 0.01                # an adapter's mean output length is taken anew when it moved by
    #                                      more than this share (finer moves are noise beside the lengths'
    #                                      spread, and each re-prices every replica's queue)
    _sum: dict = field(default_factory=lambda: defaultdict(float), repr=False)
    _cnt: dict = field(default_factory=lambda: defaultdict(int), repr=False)
    _pending: list = field(default_factory=list, repr=False)
    _seen: set = field(default_factory=set, repr=False)   # ids in _pending (a finished request never returns)
    _bound: tuple | None = field(default=None, repr=False)
    _prefill_cache: dict = field(default_factory=dict, repr=False)
    _expected: dict = field(default_factory=dict, repr=False)
    _epoch: int = field(default=0, repr=False)   # bumped when an estimate changes (a rebind, a relearnt mean)
    _shapes: dict[int, tuple] = field(default_factory=dict, repr=False)   # id(view) -> (view, _Shape, lag_until, price)
    _index: "_Index | None" = field(default=None, repr=False)   # every replica's price, for dispatch over all

    def __post_init__(self) -> None:
        if self.lengths not in ("estimate", "oracle"):
            raise ValueError(f"lengths must be 'estimate' or 'oracle', got {self.lengths!r}")
        if self.prior_output_tokens < 1 or self.prior_weight < 0 or self.relearn < 0:
            raise ValueError("prior_output_tokens must be >= 1, prior_weight and relearn >= 0")

    # --- cost-model constants for one replica shape ------------------------------------------------
    def bind(self, cost: "CostModel", batch: int, rank: int = 16) -> None:
        """Per-token decode ns at a full batch, and the merged/unmerged iteration-time ratio (ppm)."""
        key = (id(cost), batch, rank)
        if self._bound is not None and self._bound[0] == key:
            return
        unmerged = cost.decode_time(batch, self.ref_context, merged=False, distinct_adapters=self.ref_adapters,
                                    rank=rank)
        single = cost.decode_time(batch, self.ref_context, merged=False, distinct_adapters=1, rank=rank)
        merged = cost.decode_time(batch, self.ref_context, merged=True)
        self._bound = (key, cost, batch, max(to_ns(unmerged / batch), 1), round(merged / single * PPM))
        self._prefill_cache.clear()
        self._shapes.clear()
        self._epoch += 1

    def _constants(self) -> tuple:
        if self._bound is None:
            raise RuntimeError("WorkModel.bind(cost, batch) must be called before estimating work")
        return self._bound

    @property
    def merged_ppm(self) -> int:
        return self._constants()[4] if self.merge_aware else PPM

    @property
    def merged_ratio(self) -> float:
        return self.merged_ppm / PPM

    def prefill_ns(self, tokens: int) -> int:
        """Marginal ns a prefill of `tokens` adds to a full decode batch."""
        v = self._prefill_cache.get(tokens)
        if v is None:
            _, cost, b, _, _ = self._constants()
            ctx = b * self.ref_context
            v = self._prefill_cache[tokens] = max(0, to_ns(
                cost.iteration_time(prefill_tokens=tokens, prefill_sq=tokens * tokens, decode_seqs=b,
                                    decode_context=ctx, num_seqs=b + 1)
                - cost.iteration_time(decode_seqs=b, decode_context=ctx, num_seqs=b)))
        return v

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_ns(tokens) / NS

    # --- per-adapter length estimates ------------------------------------------------------------
    def track(self, requests: Iterable[Request]) -> None:
        """Remember requests so their true lengths are learnt once they finish."""
        for r in requests:
            if r.id not in self._seen:
                self._seen.add(r.id)
                self._pending.append(r)

    def harvest(self) -> None:
        """Learn the lengths of the tracked requests that finished. The estimates (and every price that
        used them) change only if an adapter's mean moved by more than `relearn`."""
        keep, learnt, seen = [], set(), self._seen
        for r in self._pending:
            state = r.state
            if state == _FINISHED:
                self._sum[r.adapter] += r.output_tokens
                self._cnt[r.adapter] += 1
                learnt.add(r.adapter)
                seen.discard(r.id)   # memory follows the requests in flight, not all ever seen
            elif state == _REJECTED:
                seen.discard(r.id)
            else:
                keep.append(r)
        self._pending = keep
        expected = self._expected
        if any(a in expected and abs(self._mean(a) - expected[a]) > self.relearn * expected[a] for a in learnt):
            expected.clear()
            self._shapes.clear()
            self._epoch += 1

    def _mean(self, adapter: int) -> int:
        w, n = self.prior_weight, self._cnt[adapter]
        mean = (self.prior_output_tokens * w + self._sum[adapter]) / (w + n) if w + n > 0 else self.prior_output_tokens
        return max(1, round(mean))

    def expected_output(self, adapter: int) -> int:
        """The adapter's mean output length so far (with the prior), in whole tokens (at least 1);
        cached until a harvest moves it."""
        v = self._expected.get(adapter)
        if v is None:
            v = self._expected[adapter] = self._mean(adapter)
        return v

    def remaining_tokens(self, r: Request) -> int:
        """Its expected (oracle: true) output tokens not generated yet, at least one."""
        rem = self._output(r) - r.generated
        return rem if rem > 1 else 1

    def request_ns(self, r: Request) -> int:
        """Expected ns of replica time this request still needs (decode share + pending prefill)."""
        t = self.remaining_tokens(r) * self._constants()[3]
        if r.state == State.QUEUED:
            t += self.prefill_ns(r.context_len - r.prefilled)
        return t

    def request_s(self, r: Request) -> float:
        return self.request_ns(r) / NS

    # --- a queue's work ----------------------------------------------------------------------------
    def _output(self, r: Request) -> int:
        return r.output_tokens if self.lengths == "oracle" else self.expected_output(r.adapter)

    def queue_ns(self, requests: Sequence[Request], batch: int, lag: int = 0,
                 in_flight: Collection[Request] = ()) -> int:
        """The work of `requests` (the module's definition), recomputed from the requests themselves; those
        in `in_flight` have generated `lag` tokens more than they show."""
        per: dict[int, list[Request]] = {}
        for r in requests:
            per.setdefault(r.adapter, []).append(r)
        tok, flying, total = self._constants()[3], {id(r) for r in in_flight} if lag else (), 0
        for rs in per.values():
            work = 0
            for r in rs:
                g = r.generated + lag if id(r) in flying else r.generated
                rem = self._output(r) - g
                work += (rem if rem > 1 else 1) * tok
                if r.state == _QUEUED:
                    work += self.prefill_ns(r.prompt_tokens + r.generated - r.prefilled)
            total += self._discounted(work, len(rs), batch)
        return total

    def _discounted(self, work: int, n: int, batch: int) -> int:
        """An adapter's work with the share of its `n` requests in full batches discounted."""
        if n < batch:
            return work
        return work - work * (n // batch * batch) * (PPM - self.merged_ppm) // (n * PPM)

    def queue_s(self, requests: Sequence[Request], batch: int) -> float:
        return self.queue_ns(requests, batch) / NS

    def replica_ns(self, view: "ReplicaView") -> int:
        """`queue_ns` of the replica's queue, with its batch in flight's `lag` counted: what a router
        prices every host with at every arrival. Remembered while the replica's version and lag hold (its
        `lag_until`), and as a function of the lag until the replica changes, so a host that only
        fast-forwarded costs a bisection."""
        if getattr(view, "lag", None) is None:   # a view without one (tests' stand-ins) is priced from its requests
            return self.queue_ns(view.queue, view.max_num_seqs)
        return self._priced(view)[3]

    def _priced(self, view: "ReplicaView") -> tuple:
        """The replica's remembered (view, shape, lag_until, price), priced again if its version, the estimates or
        its lag moved."""
        hit = self._shapes.get(id(view))
        if hit is not None and hit[0] is view and hit[1].version == view.version and hit[1].epoch == self._epoch:
            if view.clock_ns() <= hit[2]:
                return hit   # neither its queue nor its lag moved since it was priced
            lag = view.lag()   # first: it may apply the run's first iteration, which changes the version
            shape = hit[1] if hit[1].version == view.version else self._shape(view)
        else:
            lag = view.lag()
            shape = self._shape(view)
        entry = self._shapes[id(view)] = (view, shape, view.lag_until(), self._price(view, shape, lag))
        return entry

    def _price(self, view: "ReplicaView", shape: _Shape, lag: int) -> int:
        if shape.exact:
            return self.queue_ns(view.queue, view.max_num_seqs, lag, view.in_flight)
        slacks = shape.slacks
        if not slacks:
            return shape.fixed
        k = bisect.bisect_right(slacks, lag)   # requests whose slack the lag used up count one token each
        return shape.fixed + (shape.prefix[-1] - shape.prefix[k] - lag * (len(slacks) - k) + k) * self._constants()[3]

    def cheapest(self, views: Sequence["ReplicaView"], candidates: Iterable[int], request: Request,
                 cost: "CostModel") -> int:
        """The candidate of least `replica_ns` + `request_ns(request)` (ties: the lower index). Where every
        replica is a candidate and all share one batch size (the request's own time then adds alike), the
        answer comes from `_Index`, which reprices only the replicas whose price may have moved; otherwise a
        dispatch's loop, one `replica_ns` per host."""
        cands = candidates if isinstance(candidates, (range, tuple, list)) else list(candidates)
        idx = self._index_for(views)
        if idx.uniform and len(cands) == idx.n and (cands if isinstance(cands, tuple) else tuple(cands)) == idx.everyone:
            self.bind(cost, views[0].max_num_seqs)
            self.request_ns(request)   # as the loop does: it may learn the adapter's expected length now
            return idx.cheapest(self)
        best, best_c, batch, own = -1, 0, None, 0
        for j in cands:
            view = views[j]
            if view.max_num_seqs != batch:   # bind (and the request's own time) again only for another shape
                batch = view.max_num_seqs
                self.bind(cost, batch)
                own = self.request_ns(request)
            c = self.replica_ns(view) + own
            if best < 0 or c < best_c or (c == best_c and j < best):
                best, best_c = j, c
        return best

    def _index_for(self, views: Sequence["ReplicaView"]) -> "_Index":
        """The index of these replicas' prices (made anew for another cluster); `uniform` when every replica
        shares one batch size and reads its progress through `lag` and `lag_until`, which the index needs."""
        idx = self._index
        if idx is None or idx.views is not views or idx.n != len(views):
            batch = views[0].max_num_seqs if views else 0
            uniform = len(views) > 1 and all(v.max_num_seqs == batch and hasattr(v, "lag_until")
                                             and hasattr(v, "lag") for v in views)
            idx = self._index = _Index(views, uniform)
        return idx

    def _shape(self, view: "ReplicaView") -> _Shape:
        batch = view.max_num_seqs
        grouped = view.by_adapter()
        if any(len(rs) >= batch for rs in grouped.values()):
            return _Shape(view.version, self._epoch, 0, [], [0], exact=True)
        # hot: one pass over the queue grouped by adapter, one expected length per adapter and prefill prices
        # read from their cache (a call per request cost a fifth of a dispatch). A request in flight adds only
        # its prefill: its tokens are the lag's (its slack)
        expected, prefills, flying = self._expected, self._prefill_cache, set(view.in_flight)
        oracle = self.lengths == "oracle"
        tokens = prefill = 0
        slacks = []
        for a, rs in grouped.items():
            e = 0 if oracle else expected.get(a) or self.expected_output(a)
            for r in rs:
                rem = (r.output_tokens if oracle else e) - r.generated
                if r in flying:
                    slacks.append(rem)
                else:
                    tokens += rem if rem > 1 else 1
                if r.state == _QUEUED:
                    n = r.prompt_tokens + r.generated - r.prefilled
                    p = prefills.get(n)
                    prefill += self.prefill_ns(n) if p is None else p
        slacks.sort()
        return _Shape(view.version, self._epoch, tokens * self._constants()[3] + prefill, slacks,
                      [0, *accumulate(slacks)])

    def replica_s(self, view: "ReplicaView") -> float:
        return self.replica_ns(view) / NS

    @staticmethod
    def demanded_blocks(view: "ReplicaView") -> int:
        """KV blocks the queue needs now (the next token of every request)."""
        bs = view.block_size
        return sum(blocks_for(r.context_len + (0 if r.state == State.QUEUED else 1), bs) for r in view.queue)


_QUEUED, _FINISHED, _REJECTED = State.QUEUED, State.FINISHED, State.REJECTED


class _Index:
    """Every replica's `replica_ns`, kept for a dispatch among all of them: at a dispatch only the replicas whose
    version changed or whose lag may have moved (past their `lag_until`) are priced again, in index order as
    a dispatch's loop would (pricing may apply a run's first iteration), and a heap of (price, index) with
    stale entries skipped gives the least price, ties to the lower index: the loop's answer, bit for bit."""

    def __init__(self, views: Sequence["ReplicaView"], uniform: bool):
        self.views, self.n, self.uniform = views, len(views), uniform
        self.everyone = tuple(range(len(views)))   # the candidates it answers for: every replica, in index order
        self.epoch = -1
        self.versions: list[int] = []
        self.untils: list[int] = []
        self.prices: list[int] = []
        self.heap: list[tuple[int, int]] = []

    def cheapest(self, work: WorkModel) -> int:
        views, n = self.views, self.n
        if self.epoch != work._epoch:   # estimates relearnt or rebound: price every replica again
            self.epoch = work._epoch
            self.versions, self.untils, self.prices = [-1] * n, [-1] * n, [-1] * n
            self.heap = []
        versions, untils, prices, heap = self.versions, self.untils, self.prices, self.heap
        now = views[0].clock_ns()
        for j in [j for j in range(n) if versions[j] != views[j].version or untils[j] < now]:
            view = views[j]
            _, _, untils[j], price = work._priced(view)
            versions[j] = view.version
            if price != prices[j]:
                prices[j] = price
                heapq.heappush(heap, (price, j))
        while heap[0][0] != prices[heap[0][1]]:   # a replica's price moved since this entry
            heapq.heappop(heap)
        if len(heap) > 4 * n:   # drop the stale entries
            self.heap = heap = sorted(set((p, j) for j, p in enumerate(prices)))
        return heap[0][1]
