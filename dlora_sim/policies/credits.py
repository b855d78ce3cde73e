"""dLoRA's starvation guard: a zero-sum credit ledger with hysteresis.

Credit is measured in *displaced request-iterations*: each iteration, every request that the
reference batch would have run but the chosen batch does not earns its adapter 1, and the adapters
whose requests ran in their place pay the same amount between them. When the chosen batch is also
slower than the reference (a forced, unmerged batch instead of a merged one), the requests of the
reference that did run were slowed down: each earns `slowdown` = t_chosen/t_reference - 1 (the
iterations it lost in that time), paid by the same payers. So forcing costs what it takes from the
others, and a forcing episode is short when it interrupts a much faster merged mode.

Credit is stored as integers in 1/RESOLUTION units, which keeps the ledger exactly zero-sum (no
rounding drift). The guard's wait does not depend on the batch size B: an adapter with a displaced
request gains at least 1 per iteration, so it reaches `c_right` within `c_right - credit`
iterations whatever B is (the artifact's 0.0625-per-displacement scale needed ~160k displacements;
dlora-algorithm.md section 6.4).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from dlora_sim.request import Request


RESOLUTION = 1000   # integer credit units per displaced request-iteration


@dataclass
class CreditLedger:
    """Per-adapter credit; `transfer` only moves credit between adapters, so the sum never changes."""

    c_right: float
    c_left: float
    credit: dict[int, int] = field(default_factory=dict)
    forced: set[int] = field(default_factory=set)   # adapters inside their hysteresis band

    def __post_init__(self) -> None:
        if not self.c_left < self.c_right:
            raise ValueError(f"credits need c_left < c_right, got {self.c_left} and {self.c_right}")
        self._right = round(self.c_right * RESOLUTION)
        self._left = round(self.c_left * RESOLUTION)

    def total(self) -> int:
        """Sum of all credit in integer units (always 0: transfers only move credit)."""
        return sum(self.credit.values())

    def value(self, adapter: int) -> float:
        return self.credit.get(adapter, 0) / RESOLUTION

    def max_credit(self) -> float:
        return max(self.credit.values(), default=0) / RESOLUTION

    def transfer(self, reference: Sequence[Request], chosen: Sequence[Request], slowdown: float = 0.0) -> int:
        """Settle one iteration: `reference` is what the replica owed (FCFS, or the mode decision when
        the guard forced the batch), `chosen` what ran, `slowdown` = t_chosen/t_reference - 1 when the
        chosen batch is slower. Returns the integer units moved."""
        if not chosen:
            return 0
        chosen_ids = {id(r) for r in chosen}
        gains: Counter = Counter()
        slowed: Counter = Counter()
        for r in reference:
            if id(r) in chosen_ids:
                slowed[r.adapter] += 1
            else:
                gains[r.adapter] += RESOLUTION
        if slowdown > 0 and slowed:
            per = round(slowdown * RESOLUTION)
            for a, n in slowed.items():
                gains[a] += n * per
        units = sum(gains.values())
        if units == 0:
            return 0
        ref_ids = {id(r) for r in reference}
        payers = Counter(r.adapter for r in chosen if id(r) not in ref_ids)
        if not payers:   # the chosen batch is within the reference (only smaller or slower): it pays
            payers = Counter(r.adapter for r in chosen)
        credit = self.credit
        for a, n in gains.items():
            credit[a] = credit.get(a, 0) + n
        for a, n in _apportion(units, payers).items():
            credit[a] = credit.get(a, 0) - n
        return units

    def forced_order(self, queued: Iterable[int]) -> list[int]:
        """Adapters the guard forces this iteration, highest credit first (ties: lower id).

        An adapter enters the forced set when its credit reaches c_right and leaves when it falls to
        c_left or below (hysteresis), so one forcing episode lasts long enough to amortise the
        unmerge/merge it costs. Only adapters with queued requests are returned."""
        credit = self.credit
        for a in list(self.forced):
            if credit.get(a, 0) <= self._left:
                self.forced.discard(a)
        for a, c in credit.items():
            if c >= self._right:
                self.forced.add(a)
        q = set(queued)
        return sorted((a for a in self.forced if a in q), key=lambda a: (-credit.get(a, 0), a))


def _apportion(total: int, weights: Mapping[int, int]) -> dict[int, int]:
    """Split an integer `total` in proportion to `weights` (largest remainder; ties to the lower id)."""
    w = sum(weights.values())
    share = {a: total * n // w for a, n in weights.items()}
    left = total - sum(share.values())
    if left:
        for a in sorted(weights, key=lambda a: (-(total * weights[a] % w), a))[:left]:
            share[a] += 1
    return share
