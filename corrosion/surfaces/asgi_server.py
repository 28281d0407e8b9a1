"""Serving an ASGI app on a socket bound here: uvicorn on asyncio (uvloop included), hypercorn on
trio (the ``trio`` extra).

Servers write a response in several pieces (the head, then the body or each chunk of it). Without
``TCP_NODELAY`` Nagle's algorithm holds every piece after the first until the client acknowledges
the first, and clients delay that ACK by up to 40 ms: a kept-alive client gets ~23 requests/s.
asyncio sets ``TCP_NODELAY`` on an accepted socket only when the listener was created with
``proto=IPPROTO_TCP`` (``socket.socket(family, SOCK_STREAM)`` has proto 0), so the listener is
created with it and has ``TCP_NODELAY`` itself, which Linux copies to every accepted socket.
uvloop and trio set it on accepted sockets in any case.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any, cast

import anyio
import sniffio
from anyio.abc import TaskGroup
from starlette.types import ASGIApp

# hypercorn logs its "Running on ..." banner at INFO; an embedded server keeps to warnings, as
# uvicorn does with log_level="warning"
_hypercorn_log = logging.getLogger("corrosion.asgi_server.hypercorn")
_hypercorn_log.setLevel(logging.WARNING)


def listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking TCP listener on ``(host, port)`` (port 0 picks a free one) whose accepted
    connections get ``TCP_NODELAY`` on every event loop."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class AsgiServer:
    """A server started by ``serve_asgi``; ``close()`` asks it to stop serving."""

    def __init__(self, address: tuple[str, int], stop: Callable[[], None]) -> None:
        self.address = address
        self._stop = stop

    def close(self) -> None:
        self._stop()


async def serve_asgi(
    app: ASGIApp, tg: TaskGroup, host: str, port: int, *, lifespan: bool = False
) -> AsgiServer:
    """Serve ``app`` on ``host:port`` in the task group ``tg`` (uvicorn on asyncio, hypercorn on
    trio); return once it accepts connections. ``lifespan`` runs the app's lifespan events, as
    the proxy needs to close its client (hypercorn always runs them)."""
    backend = sniffio.current_async_library()
    if backend == "trio":
        try:
            import hypercorn  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "serving HTTP on trio needs hypercorn: pip install 'corrosion[trio]'"
            ) from None
    sock = listen_socket(host, port)
    address = sock.getsockname()[:2]
    try:
        if backend == "trio":
            return await _serve_hypercorn(app, tg, sock, address)
        return await _serve_uvicorn(app, tg, sock, address, lifespan)
    except BaseException:
        sock.close()
        raise


async def _serve_uvicorn(
    app: ASGIApp, tg: TaskGroup, sock: socket.socket, address: tuple[str, int], lifespan: bool
) -> AsgiServer:
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", lifespan="on" if lifespan else "off", access_log=False
    )
    server = uvicorn.Server(config)
    # the embedding application (or the CLI) owns signals, not the HTTP server
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    async def run() -> None:
        try:
            await server._serve([sock])
        finally:
            # Cancelled before uvicorn's own shutdown, asyncio still watches the listener:
            # stop that before the socket closes, or the selector keeps the dead descriptor
            # registered and a later listener given the same number is never polled (the next
            # agent in this process would accept connections and never answer them).
            for listener in server.servers:
                listener.close()
            sock.close()
            # Cancelled with its task group while responses still stream (subscriptions,
            # updates): uvicorn runs them outside the task group, so end their connections
            # here, or they would outlive the server. Their apps then see the disconnect.
            for connection in list(server.server_state.connections):
                connection.transport.close()

    tg.start_soon(run)
    with anyio.fail_after(10):
        # uvicorn offers only this flag (no event or callback) to say it is listening
        while not server.started:  # noqa: ASYNC110
            await anyio.sleep(0.01)

    def stop() -> None:
        server.should_exit = True

    return AsgiServer(address, stop)


async def _serve_hypercorn(
    app: ASGIApp, tg: TaskGroup, sock: socket.socket, address: tuple[str, int]
) -> AsgiServer:
    # hypercorn.trio.serve binds its own sockets; worker_serve (which it calls) takes ours
    from hypercorn.config import Config, Sockets
    from hypercorn.trio.run import worker_serve
    from hypercorn.typing import ASGIFramework
    from hypercorn.utils import wrap_app

    config = Config()
    config.accesslog = None
    config.errorlog = _hypercorn_log
    config.graceful_timeout = 1.0  # streams (subscriptions, updates) never end by themselves
    stopping = anyio.Event()

    async def run(*, task_status: Any) -> None:
        with sock:
            await worker_serve(
                # the same ASGI callable: starlette types its scope as a plain mapping
                wrap_app(cast(ASGIFramework, app), config.wsgi_max_body_size, "asgi"),
                config,
                sockets=Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]),
                shutdown_trigger=stopping.wait,
                task_status=task_status,
            )

    await tg.start(run)
    return AsgiServer(address, stopping.set)
