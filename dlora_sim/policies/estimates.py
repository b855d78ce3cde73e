"""Seconds of outstanding work, shared by the dLoRA router and the co-migration ILP.

Both global policies must rank replicas in the same unit (seconds, with no integer division), and both need each
request's *expected* remaining time. Output lengths are unknown at dispatch, so a request's remaining
decode tokens come from a per-adapter running mean of the output lengths observed so far (looked up
by the request's own adapter, not one estimate shared by all adapters); `lengths="oracle"` uses the true length
(an upper bound on what estimation can buy). Every time is taken from the cost model of the profile.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from dlora_sim.core.request import Request, State, blocks_for

if TYPE_CHECKING:
    from dlora_sim.core.cost_model import CostModel
    from dlora_sim.core.contracts import ReplicaView


@dataclass
class WorkModel:
    """Expected remaining seconds per request and per replica queue."""

    prior_output_tokens: float = 256.0   # prior mean output length of an adapter never observed
    prior_weight: float = 1.0            # pseudo-observations the prior counts for
    lengths: str = "estimate"            # estimate | oracle
    merge_aware: bool = True             # discount full single-adapter batches by merged/unmerged time
    ref_context: int = 512               # context per sequence of the reference decode batch
    ref_adapters: int = 4                # distinct adapters in the reference unmerged batch
    _sum: dict = field(default_factory=lambda: defaultdict(float), repr=False)
    _cnt: dict = field(default_factory=lambda: defaultdict(int), repr=False)
    _pending: list = field(default_factory=list, repr=False)
    _seen: set = field(default_factory=set, repr=False)   # ids in _pending (a finished request never returns)
    _bound: tuple | None = field(default=None, repr=False)
    _prefill_cache: dict = field(default_factory=dict, repr=False)
    _expected: dict = field(default_factory=dict, repr=False)
    _epoch: int = field(default=0, repr=False)              # bumped whenever an estimate may change
    _replica_cache: dict = field(default_factory=dict, repr=False)   # id(view) -> (view, version, seconds)

    def __post_init__(self) -> None:
        if self.lengths not in ("estimate", "oracle"):
            raise ValueError(f"lengths must be 'estimate' or 'oracle', got {self.lengths!r}")
        if self.prior_output_tokens < 1 or self.prior_weight < 0:
            raise ValueError("prior_output_tokens must be >= 1 and prior_weight >= 0")

    # --- cost-model constants for one replica shape ------------------------------------------------
    def bind(self, cost: "CostModel", batch: int, rank: int = 16) -> None:
        """Per-token decode seconds at a full batch, and the merged/unmerged iteration-time ratio."""
        key = (id(cost), batch, rank)
        if self._bound is not None and self._bound[0] == key:
            return
        unmerged = cost.decode_time(batch, self.ref_context, merged=False, distinct_adapters=self.ref_adapters,
                                    rank=rank)
        single = cost.decode_time(batch, self.ref_context, merged=False, distinct_adapters=1, rank=rank)
        merged = cost.decode_time(batch, self.ref_context, merged=True)
        self._bound = (key, cost, batch, unmerged / batch, merged / single)
        self._prefill_cache.clear()
        self._replica_cache.clear()
        self._epoch += 1

    @property
    def epoch(self) -> int:
        """Changes whenever an estimate may (a rebind or a harvest); cached estimates key on it."""
        return self._epoch

    @property
    def token_s(self) -> float:
        if self._bound is None:
            raise RuntimeError("WorkModel.bind(cost, batch) must be called before estimating work")
        return self._bound[3]

    @property
    def merged_ratio(self) -> float:
        return self._bound[4] if self.merge_aware else 1.0

    def prefill_s(self, tokens: int) -> float:
        """Marginal seconds a prefill of `tokens` adds to a full decode batch."""
        v = self._prefill_cache.get(tokens)
        if v is None:
            _, cost, b, _, _ = self._bound
            ctx = b * self.ref_context
            v = max(0.0, cost.iteration_time(prefill_tokens=tokens, prefill_sq=tokens * tokens, decode_seqs=b,
                                             decode_context=ctx, num_seqs=b + 1)
                    - cost.iteration_time(decode_seqs=b, decode_context=ctx, num_seqs=b))
            self._prefill_cache[tokens] = v
        return v

    # --- per-adapter length estimates ------------------------------------------------------------
    def track(self, requests: Iterable[Request]) -> None:
        """Remember requests so their true lengths are learnt once they finish."""
        for r in requests:
            if r.id not in self._seen:
                self._seen.add(r.id)
                self._pending.append(r)

    def harvest(self) -> None:
        keep = []
        for r in self._pending:
            if r.state == State.FINISHED:
                self._sum[r.adapter] += r.output_tokens
                self._cnt[r.adapter] += 1
            elif r.state != State.REJECTED:
                keep.append(r)
        self._pending = keep
        self._seen = {r.id for r in keep}   # memory follows the requests in flight, not all ever seen
        self._expected.clear()
        self._replica_cache.clear()
        self._epoch += 1

    def expected_output(self, adapter: int) -> float:
        """The adapter's mean output length so far (with the prior); cached until the next harvest."""
        v = self._expected.get(adapter)
        if v is None:
            w = self.prior_weight
            v = self._expected[adapter] = (
                (self.prior_output_tokens * w + self._sum[adapter]) / (w + self._cnt[adapter])
                if (w + self._cnt[adapter]) > 0 else self.prior_output_tokens)
        return v

    def remaining_tokens(self, r: Request) -> float:
        if self.lengths == "oracle":
            return float(r.remaining)
        return max(self.expected_output(r.adapter) - r.generated, 1.0)

    def request_s(self, r: Request) -> float:
        """Expected seconds of replica time this request still needs (decode share + pending prefill)."""
        t = self.remaining_tokens(r) * self.token_s
        if r.state == State.QUEUED:
            t += self.prefill_s(r.context_len - r.prefilled)
        return t

    def queue_s(self, requests: Sequence[Request], batch: int) -> float:
        """Seconds of outstanding work: full single-adapter batches run merged (discounted)."""
        grouped: dict[int, list[Request]] = {}   # first-seen order, each list in the given order
        for r in requests:
            rs = grouped.get(r.adapter)
            if rs is None:
                grouped[r.adapter] = [r]
            else:
                rs.append(r)
        return self.grouped_s(grouped, batch)

    def grouped_s(self, by_adapter: Mapping[int, Sequence[Request]], batch: int) -> float:
        """`queue_s` of requests grouped by adapter (adapters in first-seen order, each list in queue
        order; `ReplicaState.by_adapter` keeps one): the hot path of every dispatch, `request_s` inlined."""
        token_s, oracle = self.token_s, self.lengths == "oracle"
        prefill, prefill_s = self._prefill_cache, self.prefill_s
        rho, total, expected = self.merged_ratio, 0.0, self._expected
        for a, rs in by_adapter.items():
            e_out = 0.0 if oracle else expected.get(a)
            if e_out is None:
                e_out = self.expected_output(a)
            work = 0.0   # 0.0 + t == t: the sums of accumulating from the first request's t
            for r in rs:
                if oracle:
                    rem = float(r.output_tokens - r.generated)
                else:
                    rem = e_out - r.generated
                    if 1.0 > rem:
                        rem = 1.0
                t = rem * token_s
                if r.state == _QUEUED:
                    ctx = r.prompt_tokens + r.generated - r.prefilled
                    v = prefill.get(ctx)
                    t += v if v is not None else prefill_s(ctx)
                work += t
            n = len(rs)
            full = (n // batch) * batch / n
            total += work * (1.0 - full + full * rho)
        return total

    def replica_s(self, view: "ReplicaView") -> float:
        """`queue_s` of the replica's queue, remembered until the replica's `version` or the estimates
        change: a router prices every host per arrival, and many did nothing since the last."""
        try:
            version = view.version
        except AttributeError:   # a view without a version (tests' stand-ins) is priced every time
            return self.queue_s(view.queue, view.max_num_seqs)
        hit = self._replica_cache.get(id(view))   # emptied whenever the estimates change (epoch)
        if hit is not None and hit[1] == version and hit[0] is view:
            return hit[2]
        v = self.grouped_s(view.by_adapter(), view.max_num_seqs)
        self._replica_cache[id(view)] = (view, version, v)
        return v

    @staticmethod
    def demanded_blocks(view: "ReplicaView") -> int:
        """KV blocks the queue needs now (the next token of every request)."""
        bs = view.block_size
        return sum(blocks_for(r.context_len + (0 if r.state == State.QUEUED else 1), bs) for r in view.queue)


_QUEUED = State.QUEUED
