"""Serve an anyio listener inside the agent's task group until told to stop (the admin socket
and the metrics endpoint; the HTTP API uses an ASGI server, ``asgi_server``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import Listener, TaskGroup, TaskStatus

Closer = Callable[[], Awaitable[None]]


async def serve_listener(
    tg: TaskGroup, listener: Listener[Any], handler: Callable[[Any], Awaitable[None]]
) -> Closer:
    """Start serving ``listener`` in ``tg`` (each connection in its own task); return the closer:
    it stops accepting, waits up to 5 s for the serving task to end, and closes the listener."""
    scope = anyio.CancelScope()
    stopped = anyio.Event()

    async def serve(*, task_status: TaskStatus[None]) -> None:
        try:
            with scope:
                task_status.started()
                await listener.serve(handler)
        finally:
            stopped.set()

    await tg.start(serve)

    async def close() -> None:
        # stop accepting before closing the listener (an accept on a closed listener raises)
        scope.cancel()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(5):
                await stopped.wait()
            await listener.aclose()

    return close
