"""The virtual clock: one heap of future events, ordered by time then by insertion.

The sequence number makes the order of events due at the same instant the order in which they
were scheduled, so a run never depends on comparing callbacks or on hash order. Time only moves
when the next event is taken: a quiet world jumps straight to its next timer.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

__all__ = ["Scheduler"]


class Scheduler:
    """A discrete-event loop over virtual seconds."""

    __slots__ = ("_heap", "_seq", "events", "now", "probe")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0  # events run so far
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = 0
        self.probe: Callable[[], Any] | None = None
        """Called after every event (safety checkers that must hold at any time)."""

    def at(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``when`` (now, if ``when`` is in the past)."""
        self._seq += 1
        if when < self.now:
            when = self.now
        heapq.heappush(self._heap, (when, self._seq, fn, args))

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run_until(self, t: float) -> None:
        """Run every event due at or before ``t``; then the clock reads ``t``."""
        heap = self._heap
        pop = heapq.heappop
        probe = self.probe
        n = 0
        while heap and heap[0][0] <= t:
            when, _, fn, args = pop(heap)
            self.now = when
            n += 1
            fn(*args)
            if probe is not None:
                probe()
        self.events += n
        if t > self.now:
            self.now = t

    def __len__(self) -> int:
        return len(self._heap)
