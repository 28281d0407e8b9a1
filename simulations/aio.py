"""Async code (the orchestrator, written for anyio) on the world's virtual clock, deterministically.

Why this shape: the world is a discrete-event loop; the orchestrator is a tree of anyio tasks.
Rather than rewrite the orchestrator sans-IO, every async task of a world lives in one private
asyncio event loop (:class:`VirtualLoop`) that never runs by itself: the world *drains* it - runs
ready callbacks until none is left - after each event that can wake a task (a sleep coming due,
an operation submitted, a process killed). Time inside that code passes only through
:class:`SimClock` (an ``orchestrator.clock.Clock``): a sleep is an event on the world's heap
that resolves a future and drains the loop. Between two world events every task therefore runs
to quiescence in asyncio's FIFO order, which depends on nothing but the seed (trio shuffles ready
tasks on purpose, so the backend is asyncio).

Rules, enforced in :meth:`VirtualLoop.drain`:

* no wall-clock timers: a callback scheduled with ``loop.call_later`` (``anyio.sleep``,
  ``fail_after``) would fire on real time, so its presence is an error;
* no livelock: a drain that is still busy after ``max_callbacks`` callbacks is an error (a task
  polling with zero-length sleeps would otherwise spin forever at one virtual instant);
* no threads: the orchestrator runs with ``offload=False`` (storage calls inline).

Idleness is read from the loop's ready queue (``BaseEventLoop._ready``), the one private detail
this relies on; CPython has kept it since asyncio was added.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio.lowlevel

from .errors import SimulationError

if TYPE_CHECKING:
    from .node import PortHost

__all__ = ["EPOCH", "SimClock", "VirtualLoop"]

EPOCH = 1_700_000_000.0
"""Virtual time 0 as the orchestrator sees it (seconds since the Unix epoch)."""


class LoopError(SimulationError, RuntimeError):
    """The async code broke a rule of the virtual loop (timer on real time, livelock)."""


class VirtualLoop:
    """One asyncio loop for a world's async tasks, run only by :meth:`drain`."""

    def __init__(self, max_callbacks: int = 2_000_000) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_exception)
        self.max_callbacks = max_callbacks
        self.errors: list[str] = []
        """Exceptions nobody retrieved (a task that died), as text; checkers report them."""
        self.callbacks = 0
        self._closed = False

    def _on_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.errors.append(f"{context.get('message', '')}: {exc!r}")

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A new task; it first runs at the next :meth:`drain`."""
        return self.loop.create_task(coro, name=name)

    def future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    def resolve(self, fut: asyncio.Future[Any]) -> None:
        """Complete ``fut`` (unless its waiter was cancelled) and run what it wakes."""
        if not fut.done():
            fut.set_result(None)
            self.drain()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` as a loop callback (code that must see a running loop), then drain."""
        self.loop.call_soon(fn)
        self.drain()

    def drain(self) -> None:
        """Run every ready callback, and those they make ready, until the loop is idle.

        Called from inside the loop (a task crashing its own world), it returns at once: the
        outer drain carries on."""
        loop = self.loop
        if self._closed or loop.is_running():
            return
        ready = loop._ready  # type: ignore[attr-defined]  # see the module docstring
        budget = [self.max_callbacks]

        def check() -> None:
            if ready:
                budget[0] -= len(ready)
                if budget[0] < 0:
                    loop.stop()
                    return
                loop.call_soon(check)
            else:
                loop.stop()

        loop.call_soon(check)
        loop.run_forever()
        self.callbacks += self.max_callbacks - budget[0]
        if budget[0] < 0:
            raise LoopError(
                f"async tasks still busy after {self.max_callbacks} callbacks at one virtual "
                "instant (a task polls without sleeping on the virtual clock?)"
            )
        timers = loop._scheduled  # type: ignore[attr-defined]
        if timers:
            handle = timers[0]
            raise LoopError(
                f"a task scheduled a wall-clock timer ({handle!r}); simulated code must sleep "
                "on the injected clock"
            )

    def close(self) -> None:
        """Cancel what is left, let it unwind, close the loop."""
        if self._closed:
            return
        for task in sorted(asyncio.all_tasks(self.loop), key=lambda t: t.get_name()):
            task.cancel()
        try:
            self.drain()
        finally:
            self._closed = True
            self.loop.close()


class SimClock:
    """``orchestrator.clock.Clock`` over the world's scheduler: ``now`` is virtual time (offset
    by :data:`EPOCH`), ``sleep`` an event on the world's heap."""

    def __init__(self, world: PortHost, vloop: VirtualLoop, epoch: float = EPOCH) -> None:
        self.world = world
        self.vloop = vloop
        self.epoch = epoch

    def now(self) -> float:
        return self.epoch + self.world.sched.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        fut = self.vloop.future()
        self.world.sched.after(seconds, self.vloop.resolve, fut)
        await fut
