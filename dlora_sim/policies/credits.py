"""dLoRA's starvation guard: a zero-sum credit ledger with hysteresis.

Credit is measured in *displaced request-iterations*. Each iteration the reference is F, the batch
that unmerged FCFS would run. An adapter with requests in F none of whose requests ran is displaced:
it earns 1 per such request, and the adapters that ran in its place (those with requests outside F,
else all that ran) pay that amount between them. So an adapter with a request displaced is forced
after at most c_right - c iterations, and adapters with more old requests waiting are forced sooner
(service follows demand, as FCFS would give it). Credits do race under overload; the scheduler's
switching budget (dlora.py), not the credit scale, keeps that from turning into thrash.

Spending ends every episode: an adapter in the forced set pays 1 per request of it that runs (never
below 0), to the adapters in debt, in proportion to their debt. So a forced adapter's credit falls
even when its forced batch displaces nobody (the latch of a pure displacement rule), and the
adapters it displaced earlier get back what they paid.

Credit is stored as integers in 1/RESOLUTION units, so every transfer is exactly zero-sum (no
rounding drift). The ledger also measures what the guard bounds: per adapter, the longest run of
consecutive displaced iterations, in seconds from the first displaced decision to the one that
served it (`max_wait_s`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping, Sequence

from dlora_sim.core.request import Request

RESOLUTION = 1000   # integer credit units per displaced request-iteration


@dataclass
class CreditLedger:
    """Per-adapter credit; transfers only move credit between adapters, so the sum never changes."""

    c_right: float
    c_left: float
    credit: dict[int, int] = field(default_factory=dict)
    forced: set[int] = field(default_factory=set)          # adapters inside a forcing episode
    waiting_since: dict[int, float] = field(default_factory=dict)   # start of the current displaced run
    max_wait_s: dict[int, float] = field(default_factory=dict)      # longest displaced run that ended served

    def __post_init__(self) -> None:
        if not 0 <= self.c_left < self.c_right:
            raise ValueError(f"credits need 0 <= c_left < c_right, got {self.c_left} and {self.c_right}")
        self._right = round(self.c_right * RESOLUTION)
        self._left = round(self.c_left * RESOLUTION)

    def total(self) -> int:
        """Sum of all credit in integer units (always 0: transfers only move credit)."""
        return sum(self.credit.values())

    def value(self, adapter: int) -> float:
        return self.credit.get(adapter, 0) / RESOLUTION

    def max_credit(self) -> float:
        return max(self.credit.values(), default=0) / RESOLUTION

    # --- one iteration's settlement ---------------------------------------------------------------------
    def settle(self, fcfs: Sequence[Request], chosen: Sequence[Request], now: float) -> int:
        """Displacement and spending for one iteration: `fcfs` is F, `chosen` what runs. Returns the
        integer units moved (0: nobody was displaced and no forced adapter ran)."""
        if not chosen:
            return 0
        if chosen is fcfs and not self.forced:   # the common iteration: F runs, nobody is forced
            if self.waiting_since:
                self._track_waits((), dict.fromkeys(r.adapter for r in chosen), now)
            return 0
        ran = Counter(r.adapter for r in chosen)
        displaced = sorted({r.adapter for r in fcfs} - ran.keys())
        self._track_waits(displaced, ran, now)
        moved = 0
        if displaced:
            in_f = {id(r) for r in fcfs}
            gains = Counter(r.adapter for r in fcfs if r.adapter not in ran)
            payers = Counter(r.adapter for r in chosen if id(r) not in in_f) or ran
            moved += self._move({a: n * RESOLUTION for a, n in gains.items()}, payers)
        credit = self.credit
        spend = {a: min(ran[a] * RESOLUTION, credit.get(a, 0)) for a in sorted(self.forced & ran.keys())}
        spend = {a: n for a, n in spend.items() if n > 0}
        if spend:
            debt = {a: -c for a, c in credit.items() if c < 0}   # non-empty: the spenders hold credit > 0
            for a, n in spend.items():
                credit[a] -= n
            total = sum(spend.values())
            for a, n in _apportion(total, debt).items():
                credit[a] = credit.get(a, 0) + n
            moved += total
        return moved

    def _move(self, gains: Mapping[int, int], payers: Mapping[int, int]) -> int:
        credit = self.credit
        units = sum(gains.values())
        for a, n in gains.items():
            credit[a] = credit.get(a, 0) + n
        for a, n in _apportion(units, payers).items():
            credit[a] = credit.get(a, 0) - n
        return units

    def _track_waits(self, displaced: Iterable[int], ran: Collection[int], now: float) -> None:
        since = self.waiting_since
        for a in ran:
            t0 = since.pop(a, None)
            if t0 is not None and now - t0 > self.max_wait_s.get(a, 0.0):
                self.max_wait_s[a] = now - t0
        for a in displaced:
            since.setdefault(a, now)

    # --- the forced set -----------------------------------------------------------------------------------
    def enter(self) -> None:
        """Adapters whose credit reached c_right join the forced set."""
        right = self._right
        self.forced.update(a for a, c in self.credit.items() if c >= right)

    def reaches_right(self) -> bool:
        """Some adapter's credit is at c_right (it would join the forced set)."""
        right = self._right
        return any(c >= right for c in self.credit.values())

    def join(self, queued: Collection[int]) -> None:
        """An episode starts: every queued adapter above c_left joins it, so adapters that would be
        forced soon are served in the same episode rather than each paying a mode change of its own."""
        left = self._left
        self.forced.update(a for a in queued if self.credit.get(a, 0) > left)

    def release(self) -> None:
        """Adapters that spent down to c_left leave the forced set (hysteresis)."""
        left = self._left
        self.forced = {a for a in self.forced if self.credit.get(a, 0) > left}

    def forced_order(self, queued: Collection[int]) -> list[int]:
        """Queued adapters of the forced set, highest credit first (ties: lower id)."""
        credit = self.credit
        return sorted((a for a in self.forced if a in queued), key=lambda a: (-credit.get(a, 0), a))


def _apportion(total: int, weights: Mapping[int, int]) -> dict[int, int]:
    """Split an integer `total` in proportion to `weights` (largest remainder; ties to the lower id)."""
    w = sum(weights.values())
    share = {a: total * n // w for a, n in weights.items()}
    left = total - sum(share.values())
    if left:
        for a in sorted(weights, key=lambda a: (-(total * weights[a] % w), a))[:left]:
            share[a] += 1
    return share
