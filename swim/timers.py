"""The timers a sans-IO core asks for (its ``SetTimer`` effects), fired on the event loop.

A core says "call me back with this timer at time T"; its runtime keeps the requests in a heap
and one task fires them in deadline order (ties in the order they were asked for). SWIM's runtime
and corrosion's agent both host cores this way, so both use this one heap.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Awaitable, Callable
from typing import Generic, NoReturn, TypeVar

import anyio

T = TypeVar("T")


class TimerHeap(Generic[T]):
    """Pending timers by deadline on ``clock`` (the loop's clock, in seconds)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, T]] = []
        self._seq = 0
        self._wake: anyio.Event | None = None  # an event needs a running loop: made in run()

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, at: float, timer: T) -> None:
        """Fire ``timer`` at ``at`` (at once if that is past)."""
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, timer))
        if self._wake is not None:
            self._wake.set()

    async def run(self, fire: Callable[[T], Awaitable[None]]) -> NoReturn:
        """Fire each timer when it is due, forever (cancel the task to stop)."""
        while True:
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                _, _, timer = heapq.heappop(self._heap)
                await fire(timer)
                now = self._clock()
            # no await between here and the wait: a timer scheduled by ``fire`` is in the heap
            self._wake = anyio.Event()
            delay = self._heap[0][0] - now if self._heap else math.inf
            with anyio.move_on_after(delay):
                await self._wake.wait()
