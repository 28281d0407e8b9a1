"""Time as the orchestrator sees it: injected, so the simulator can run it on virtual time.

Nothing under ``orchestrator/`` reads ``time.time()`` or calls ``anyio.sleep`` on an engine path;
it asks a :class:`Clock`. The runtime uses :class:`SystemClock`; tests and the simulator pass a
:class:`ManualClock` (or their own) whose sleepers wake only when time is advanced.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import anyio


@runtime_checkable
class Clock(Protocol):
    """Wall-clock seconds (for timestamps and backoff) and a sleep that honours them."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the caller for ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """Real time: ``time.time()`` and ``anyio.sleep``."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))


class ManualClock:
    """Virtual time that moves only when :meth:`advance` is called.

    Sleepers are woken in deadline order (ties in sleep order), so a test that advances the
    clock sees the same interleaving every run.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), event))
        try:
            await event.wait()
        finally:
            event.set()  # a cancelled sleep is no longer a sleeper (nor a deadline)

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock (to wait until a run is backing off)."""
        return sum(1 for *_, ev in self._sleepers if not ev.is_set())

    def next_deadline(self) -> float | None:
        while self._sleepers and self._sleepers[0][2].is_set():
            heapq.heappop(self._sleepers)  # cancelled
        return self._sleepers[0][0] if self._sleepers else None

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, event = heapq.heappop(self._sleepers)
            event.set()


async def wait_until(clock: Clock, wait: Callable[[], Awaitable[object]], timeout: float) -> bool:
    """Await ``wait()`` for at most ``timeout`` seconds of ``clock`` time; True if it returned.

    Timeouts go through the injected clock (not the event loop's), so they are virtual under
    the simulator like every other delay.
    """
    done = False

    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            nonlocal done
            await wait()
            done = True
            tg.cancel_scope.cancel()

        async def timer() -> None:
            await clock.sleep(timeout)
            tg.cancel_scope.cancel()

        tg.start_soon(waiter)
        tg.start_soon(timer)
    return done
