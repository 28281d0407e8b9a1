"""The anyio runtime: a :class:`Membership` on a real UDP socket and TCP listener.

``SwimNode`` binds one port for both UDP (datagrams) and TCP (push/pull and join streams),
performs the core's effects, and keeps a heap of the core's timers on the event loop's clock.
It runs on asyncio (uvloop when the caller asks for it, see :func:`run`) and on trio, and nests
inside any anyio task group::

    async with SwimNode(Config.lan(), host="127.0.0.1", port=0, meta=b"api=...") as node:
        await node.join([("10.0.0.5", 7946)])
        async with node.subscribe() as events:
            async for event in events:
                ...

Leaving the ``async with`` without ``leave()`` stops the member abruptly (others will detect
the failure); call ``await node.leave()`` first for a graceful departure.

Streams are framed as a 4-byte big-endian length then the payload; one request, one reply.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, UDPSocket
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import Config, ConfigError
from .core import Membership, Stats
from .events import (
    Effect,
    Notification,
    OpenStream,
    Send,
    SetTimer,
    StreamDone,
    StreamReply,
    Timer,
)
from .keyring import Keyring
from .member import Address, Member, NodeId
from .timers import TimerHeap

__all__ = ["RuntimeStats", "SwimNode", "run"]

_GEN_EPOCH = 1_577_836_800  # 2020-01-01: default generations are seconds since then (u32)
_WILDCARDS = ("", "0.0.0.0", "::")
_LEN = struct.Struct(">I")
ROUTE_PREAMBLE_LEN = 4


def run(fn: Callable[..., Any], *args: Any, backend: str = "asyncio") -> Any:
    """``anyio.run`` that picks uvloop for the asyncio backend when it is installed."""
    options: dict[str, Any] = {}
    if backend == "asyncio":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            pass
        else:
            options["use_uvloop"] = True
    return anyio.run(fn, *args, backend=backend, backend_options=options)


@dataclass(slots=True)
class RuntimeStats:
    """What the runtime itself counts (the core's counters are in ``SwimNode.stats``)."""

    udp_bytes_out: int = 0
    tcp_bytes_out: int = 0
    send_errors: int = 0
    receive_errors: int = 0
    stream_errors: int = 0
    events_dropped: int = 0


class _Waiter:
    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.ok = False


class SwimNode:
    """A SWIM member on real sockets. Use as an async context manager."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: Address | None = None,
        meta: bytes = b"",
        keyring: Keyring | None = None,
        rng_seed: int | None = None,
        gen: int | None = None,
    ) -> None:
        """``port`` 0 picks a free port (the same for UDP and TCP); ``advertise`` is the address
        others use to reach us (required when ``host`` is a wildcard); ``rng_seed`` seeds the
        core's RNG (random otherwise); ``gen`` defaults to seconds since 2020, so a restarted
        member's identity is newer than its previous one."""
        if host in _WILDCARDS and advertise is None:
            raise ConfigError("advertise is required when binding to a wildcard address")
        self.config = config or Config.lan()
        self._host = host
        self._port = port
        self._advertise = advertise
        self._meta = meta
        self._keyring = keyring
        self._rng_seed = rng_seed
        self._gen = gen
        self.runtime_stats = RuntimeStats()
        self._core: Membership | None = None
        self._udp: UDPSocket | None = None
        self._listener: Any = None
        self._tg: TaskGroup | None = None
        self._timers: TimerHeap[Timer] = TimerHeap(self._now)
        self._waiters: dict[int, _Waiter] = {}
        self._replies: dict[int, bytes] = {}
        self._request_seq = 0
        self._subscribers: list[MemoryObjectSendStream[Notification]] = []
        self._left: anyio.Event | None = None
        self._serve_scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._send_lock: anyio.Lock | None = None
        self._closed = False
        self._stream_routes: dict[bytes, Callable[[SocketStream], Awaitable[None]]] = {}
        # Test hook: drop every datagram in and out and fail every stream, as a network
        # partition isolating this node would (the agent's Faults.isolated sets it).
        self.isolated = False
        # Told of each datagram or stream dropped as malformed: on_dropped(source, reason,
        # kind), kind "datagram", "stream" (a request) or "reply" (to our stream), reason as in
        # ``stats.dropped``; so an application can say which address sends gossip it cannot
        # read (a node with another key). Called on the event loop; it must not block.
        self.on_dropped: Callable[[Address, str, str], None] | None = None

    def route_streams(
        self, preamble: bytes, handler: Callable[[SocketStream], Awaitable[None]]
    ) -> None:
        """Hand TCP streams that open with ``preamble`` to ``handler`` (after the preamble)
        instead of reading them as push/pull requests, so an application can share the gossip
        port (one port to open in a firewall, as memberlist users expect).

        The preamble is 4 bytes starting with 0xFF: read as a push/pull frame length it would
        be over 4 GiB, so it can never be mistaken for one. The handler owns the stream's
        lifetime (no stream timeout applies) and must handle its own errors."""
        if len(preamble) != ROUTE_PREAMBLE_LEN or preamble[0] != 0xFF:
            raise ValueError("a stream preamble is 4 bytes starting with 0xff")
        self._stream_routes[bytes(preamble)] = handler

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> SwimNode:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _start(self) -> None:
        self._left = anyio.Event()
        self._done = anyio.Event()
        self._send_lock = anyio.Lock()
        self._udp, self._listener = await self._bind()
        bound = self._udp.extra(SocketAttribute.local_port)
        addr = self._advertise or (self._host, bound)
        addr = (addr[0], addr[1] or bound)
        rng = random.Random(self._rng_seed)
        gen = self._gen if self._gen is not None else max(0, int(time.time()) - _GEN_EPOCH)
        self._core = Membership(
            addr, self.config, rng, gen=gen, meta=self._meta, keyring=self._keyring
        )
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            self._tg.start_soon(self._recv_loop)
            self._tg.start_soon(self._timers.run, self._fire)
            self._tg.start_soon(self._listener.serve, self._serve_stream)
            await self._apply(self._core.start(self._now()))
        except BaseException:
            await self.aclose()
            raise

    async def _bind(self) -> tuple[UDPSocket, Any]:
        for _ in range(50):
            udp = await anyio.create_udp_socket(local_host=self._host, local_port=self._port)
            port = udp.extra(SocketAttribute.local_port)
            try:
                listener = await anyio.create_tcp_listener(local_host=self._host, local_port=port)
            except OSError:
                await udp.aclose()
                if self._port:
                    raise
                continue  # the TCP side of this ephemeral port is taken: try another
            return udp, listener
        raise OSError("could not bind UDP and TCP on one free port")

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop` (or cancellation), for ``node = await tg.start(n.serve)``.

        The other way to host a node: its lifetime is this task's, so several nodes in one task
        group can be stopped in any order.
        """
        with anyio.CancelScope() as scope:
            self._serve_scope = scope
            async with self:
                task_status.started(self)
                await anyio.sleep_forever()

    async def stop(self) -> None:
        """End :meth:`serve` abruptly (no leave message) and return once the sockets are
        closed; others will detect the failure."""
        if self._serve_scope is None or self._done is None:
            raise RuntimeError("stop() is for nodes hosted with serve(); use aclose()")
        self._serve_scope.cancel()
        await self._done.wait()

    async def aclose(self) -> None:
        """Stop at once: sockets closed, tasks cancelled, subscribers' streams ended. Call it
        from the task that entered the node (``async with`` does)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
                # Re-raises the caller's cancellation when aclose runs inside a cancelled scope.
                await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                if self._udp is not None:
                    await self._udp.aclose()
                if self._listener is not None:
                    await self._listener.aclose()
            for s in self._subscribers:
                s.close()
            self._subscribers.clear()
            if self._done is not None:
                self._done.set()

    # -- the public surface ---------------------------------------------------------------------

    @property
    def core(self) -> Membership:
        """The hosted state machine (for instrumentation; call its inputs only via this node)."""
        if self._core is None:
            raise RuntimeError("the node is not started")
        return self._core

    @property
    def address(self) -> Address:
        """The advertised (host, port); with port 0 this is the port actually bound."""
        return self.core.addr

    @property
    def identity(self) -> NodeId:
        return self.core.identity

    @property
    def stats(self) -> Stats:
        return self.core.stats

    def members(self) -> list[Member]:
        return self.core.members()

    def all_members(self) -> list[Member]:
        return self.core.all_members()

    async def join(self, seeds: Iterable[Address], timeout: float | None = None) -> int:
        """Exchange state with each seed; return how many answered (0 means not joined)."""
        effects = self.core.join(list(seeds), self._now())
        waiters = {e.stream_id: _Waiter() for e in effects if isinstance(e, OpenStream)}
        self._waiters.update(waiters)
        await self._apply(effects)
        if timeout is None:  # long enough for a failing exchange to report its failure
            timeout = self.config.stream_timeout + 1.0
        with anyio.move_on_after(timeout):
            for w in waiters.values():
                await w.event.wait()
        for sid in waiters:
            self._waiters.pop(sid, None)
        return sum(w.ok for w in waiters.values())

    async def leave(self, timeout: float | None = None) -> bool:
        """Gossip our departure and wait until it has been sent its full count (True) or
        ``timeout`` (default: 20 gossip intervals, at least 2 s) passes (False)."""
        await self._apply(self.core.leave(self._now()))
        if timeout is None:
            timeout = max(2.0, 20 * self.config.gossip_interval)
        assert self._left is not None
        with anyio.move_on_after(timeout):
            if not self.core.leave_done:
                await self._left.wait()
        return self.core.leave_done

    async def broadcast(self, payload: bytes, *, key: Any = None) -> None:
        """Disseminate ``payload`` to every member (piggybacked, bounded retransmits)."""
        await self._apply(self.core.broadcast(payload, self._now(), key=key))

    async def send_message(self, addr: Address, payload: bytes) -> None:
        """Send ``payload`` to the member at ``addr`` (a ``MessageReceived`` there)."""
        await self._apply(self.core.send_message(addr, payload, self._now()))

    async def set_meta(self, meta: bytes) -> None:
        await self._apply(self.core.set_meta(meta, self._now()))

    def subscribe(self, max_buffer: int = 1024) -> MemoryObjectReceiveStream[Notification]:
        """A stream of notifications from now on. When its buffer is full new notifications are
        dropped for it (counted in ``runtime_stats.events_dropped``); close it when done."""
        send, receive = anyio.create_memory_object_stream[Notification](max_buffer)
        self._subscribers.append(send)
        return receive

    async def events(self, max_buffer: int = 1024) -> AsyncIterator[Notification]:
        """Iterate notifications (a ``subscribe()`` that closes itself)."""
        receive = self.subscribe(max_buffer)
        async with receive:
            async for event in receive:
                yield event

    # -- effects --------------------------------------------------------------------------------

    def _now(self) -> float:
        return anyio.current_time()

    async def _apply(self, effects: list[Effect]) -> None:
        for eff in effects:
            if isinstance(eff, Send):
                await self._sendto(eff)
            elif isinstance(eff, SetTimer):
                self._timers.schedule(eff.at, eff.timer)
            elif isinstance(eff, OpenStream):
                assert self._tg is not None
                self._tg.start_soon(self._stream_client, eff)
            elif isinstance(eff, StreamReply):
                self._replies[eff.request_id] = eff.data
            elif isinstance(eff, StreamDone):
                waiter = self._waiters.get(eff.stream_id)
                if waiter is not None:
                    waiter.ok = eff.ok
                    waiter.event.set()
            elif isinstance(eff, Notification):
                self._publish(eff)
        if self._left is not None and self._core is not None and self._core.leave_done:
            self._left.set()

    async def _sendto(self, eff: Send) -> None:
        assert self._udp is not None
        assert self._send_lock is not None
        if self.isolated:
            return
        try:
            async with self._send_lock:  # anyio allows one writer at a time per socket
                await self._udp.sendto(eff.data, eff.addr[0], eff.addr[1])
            self.runtime_stats.udp_bytes_out += len(eff.data)
        except (OSError, anyio.BrokenResourceError):
            self.runtime_stats.send_errors += 1

    def _publish(self, event: Notification) -> None:
        for s in list(self._subscribers):
            try:
                s.send_nowait(event)
            except anyio.WouldBlock:
                self.runtime_stats.events_dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(s)

    # -- tasks ----------------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        assert self._udp is not None and self._core is not None
        while True:
            try:
                data, src = await self._udp.receive()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError:
                self.runtime_stats.receive_errors += 1
                await anyio.lowlevel.checkpoint()
                continue
            if self.isolated:
                continue
            source = (src[0], src[1])
            dropped = self._core.stats.malformed if self.on_dropped is not None else 0
            effects = self._core.handle_datagram(source, data, self._now())
            self._report_drop(dropped, source, "datagram")
            await self._apply(effects)

    def _report_drop(self, before: int, source: Address, kind: str) -> None:
        """Call ``on_dropped`` when the core dropped what it was just given."""
        core = self._core
        if self.on_dropped is not None and core is not None and core.stats.malformed != before:
            self.on_dropped(source, core.last_dropped, kind)

    async def _fire(self, timer: Timer) -> None:
        assert self._core is not None
        await self._apply(self._core.handle_timer(timer, self._now()))

    async def _serve_stream(self, stream: SocketStream) -> None:
        assert self._core is not None
        async with stream:
            if self.isolated:
                return
            try:
                with anyio.fail_after(self.config.stream_timeout):
                    head = await _receive_exactly(stream, ROUTE_PREAMBLE_LEN)
                route = self._stream_routes.get(head)
                if route is not None:
                    await route(stream)
                    return
                with anyio.fail_after(self.config.stream_timeout):
                    data = await _read_frame(stream, self.config.max_stream_size, head)
                    self._request_seq += 1
                    rid = self._request_seq
                    try:
                        src = stream.extra(SocketAttribute.remote_address)
                        src = (str(src[0]), int(src[1]))
                    except (TypeError, IndexError, anyio.TypedAttributeLookupError):
                        src = ("", 0)
                    dropped = self._core.stats.malformed
                    effects = self._core.handle_stream_request(rid, src, data, self._now())
                    self._report_drop(dropped, src, "stream")
                    await self._apply(effects)
                    reply = self._replies.pop(rid, None)
                    if reply is not None:
                        frame = _LEN.pack(len(reply)) + reply
                        await stream.send(frame)
                        self.runtime_stats.tcp_bytes_out += len(frame)
            # a peer's stream, or the handler of its route, must never take the node down
            except Exception:  # noqa: BLE001
                self.runtime_stats.stream_errors += 1

    async def _stream_client(self, eff: OpenStream) -> None:
        assert self._core is not None
        reply: bytes | None = None
        try:
            if self.isolated:
                raise ConnectionRefusedError("isolated (test hook)")
            with anyio.fail_after(self.config.stream_timeout):
                async with await anyio.connect_tcp(eff.addr[0], eff.addr[1]) as stream:
                    frame = _LEN.pack(len(eff.data)) + eff.data
                    await stream.send(frame)
                    self.runtime_stats.tcp_bytes_out += len(frame)
                    reply = await _read_frame(stream, self.config.max_stream_size)
        except _STREAM_ERRORS:
            self.runtime_stats.stream_errors += 1
        now = self._now()
        if reply is None:
            effects = self._core.handle_stream_failed(eff.stream_id, now)
        else:
            dropped = self._core.stats.malformed
            effects = self._core.handle_stream_reply(eff.stream_id, reply, now)
            self._report_drop(dropped, eff.addr, "reply")
        await self._apply(effects)


# how a stream exchange with a peer fails: refused, reset or timed out, closed early, or a frame
# over the size limit (ValueError)
_STREAM_ERRORS = (
    OSError,
    TimeoutError,
    ValueError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


async def _read_frame(stream: SocketStream, limit: int, header: bytes | None = None) -> bytes:
    """A length-prefixed frame (``header``: its 4-byte length, when already read)."""
    buffered = BufferedByteReceiveStream(stream)
    if header is None:
        header = await buffered.receive_exactly(4)
    (n,) = _LEN.unpack(header)
    if n > limit:
        raise ValueError(f"stream frame of {n} bytes exceeds {limit}")
    return await buffered.receive_exactly(n)


async def _receive_exactly(stream: SocketStream, n: int) -> bytes:
    """``n`` bytes and not one more (a routed stream's handler reads the rest itself)."""
    data = b""
    while len(data) < n:
        data += await stream.receive(n - len(data))
    return data
