"""Events in the simulator's order, for the runtime's stepped clocks (virtual and measured).

SimPy orders the events of one instant by priority (URGENT before NORMAL), then by when they were
scheduled. The simulator schedules arrivals, migration ticks and KV deliveries URGENT, a replica's
iteration end and its wake-up (its queue changed while it was idle) NORMAL. Scheduling the same
events at the same moments here, in the same order, replays the simulator's order without SimPy,
so the runtime applies every decision at the instant, and in the order, the simulator does.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable

URGENT, NORMAL = 0, 1


class Timeline:
    """A heap of (time ns, priority, sequence, callback); `now` is the time of the event being run."""

    def __init__(self) -> None:
        self.now = 0
        self._heap: list[tuple[int, int, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def after(self, delay_ns: int, priority: int, fn: Callable[[], None]) -> None:
        if delay_ns < 0:
            raise ValueError(f"an event cannot be scheduled in the past ({delay_ns} ns)")
        heapq.heappush(self._heap, (self.now + delay_ns, priority, next(self._seq), fn))

    def run(self, done: Callable[[], bool], advance: Callable[[int], None]) -> None:
        """Run events in order until `done()` or none is left; `advance(t)` moves the clock to each."""
        heap = self._heap
        while heap and not done():
            t, _, _, fn = heapq.heappop(heap)
            self.now = t
            advance(t)
            fn()
