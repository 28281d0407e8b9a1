"""Items a worker thread produces ahead of the task on the event loop that consumes them.

Asking a worker thread for one batch at a time stops the work at every hand-off: the thread
returns, waits until the scheduler runs the event loop, and the loop sends the batch on before
it asks for the next. On a busy host each of those waits is a time slice. A ``ThreadFeed`` runs
the whole producing loop in one thread, which waits only while ``depth`` items lie unconsumed,
and wakes the loop once per item without waiting for it: the producing goes on while the loop
sends what came before, and memory stays bounded by ``depth`` items.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import sniffio

T = TypeVar("T")

Put = Callable[[T], bool]


def _loop_caller() -> Callable[[Callable[[], object]], object]:
    """How another thread schedules a call on the running event loop without waiting for it
    (``call_soon_threadsafe`` on asyncio, ``run_sync_soon`` on trio)."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    import asyncio

    return asyncio.get_running_loop().call_soon_threadsafe


class ThreadFeed(Generic[T]):
    """``produce(put)`` runs in a thread of its own, started at once; ``put(item)`` hands an item
    over, waiting while ``depth`` wait unconsumed, and returns False once the consumer has
    stopped (``produce`` should then return). Iterate the feed on the event loop for the items;
    what ``produce`` raises is raised there after the items put before it. ``stop`` ends it
    early; call it (or iterate to the end) before freeing what ``produce`` uses."""

    def __init__(self, produce: Callable[[Put[T]], None], depth: int) -> None:
        self._cond = threading.Condition()
        self._items: deque[T] = deque()
        self._depth = depth
        self._stopped = False
        self._done = False  # produce has returned or raised
        self._error: BaseException | None = None
        self._call_soon = _loop_caller()
        self._ready: anyio.Event | None = None  # what the consumer awaits, set from the thread
        self._ended = anyio.Event()
        thread = threading.Thread(target=self._run, args=(produce,), name="corrosion-feed")
        thread.daemon = True  # a feed is always stopped, but never hold up interpreter exit
        thread.start()

    # -- the producing thread ------------------------------------------------------------------

    def _run(self, produce: Callable[[Put[T]], None]) -> None:
        error: BaseException | None = None
        try:
            produce(self._put)
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
            error = exc
        with self._cond:
            self._done = True
            self._error = error
        self._notify(self._end)

    def _put(self, item: T) -> bool:
        with self._cond:
            while len(self._items) >= self._depth and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return False
            self._items.append(item)
        self._notify(self._wake)
        return True

    def _notify(self, call: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to wake
            self._call_soon(call)

    # -- the event loop --------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._ready is not None:
            self._ready.set()

    def _end(self) -> None:
        self._ended.set()
        self._wake()

    def __aiter__(self) -> ThreadFeed[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            with self._cond:  # held only for a few instructions by the producing thread
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify()
                    return item
                if self._done:
                    error, self._error = self._error, None
                    if error is not None:
                        raise error
                    raise StopAsyncIteration
                ready = self._ready = anyio.Event()
            await ready.wait()

    async def stop(self, interrupt: Callable[[], Any] | None = None) -> None:
        """Make ``put`` return False from now on, drop the unconsumed items, call ``interrupt``
        (to end a long wait inside ``produce``) unless it has returned, and wait until it has,
        cancelled or not."""
        with self._cond:
            self._stopped = True
            self._items.clear()
            self._cond.notify_all()
            done = self._done
        if not done and interrupt is not None:
            interrupt()
        with anyio.CancelScope(shield=True):
            await self._ended.wait()
