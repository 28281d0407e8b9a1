"""Peer streams: broadcast frames out and in, and sync sessions both ways, on real sockets.

Out: one queue and one sender task per peer keep a broadcast stream open and reconnect on
failure (the frame in hand is dropped; sync recovers whatever is lost); a full queue drops too.
In: the gossip port routes streams that start with ``PEER_PREAMBLE`` here; after the key
handshake and the hello, a ``bcast`` stream feeds frames to the replicator and a ``sync`` stream
is answered from the database. The replicator decides; this module only moves bytes, counts
failures and tells the operator (``ActivityLog``, ``GossipWarnings``).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import anyio
import msgpack
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from anyio.streams.tls import TLSStream

import swim

from ..addresses import Address, format_addr
from ..config import GossipConfig
from ..core.changeset import MSGPACK_ERRORS, Changeset, peek_changeset
from ..core.replication import Effect, Replicator
from .activity import ActivityLog, GossipWarnings, describe_frame, frame_error
from .events import AgentEvents, Faults
from .spans import AgentSpans
from .transport import (
    PEER_STREAM_ERRORS,
    FrameStream,
    UnauthenticatedFrame,
    client_ssl_context,
    connect,
    server_ssl_context,
)

log = logging.getLogger("corrosion.agent")
sync_log = logging.getLogger("corrosion.sync")
frames_log = logging.getLogger("corrosion.broadcast")

MAX_HELLO = 4096  # bytes a peer stream's first frame may have (read before it is authenticated)
PEER_QUEUE = 4096  # frames waiting for one peer's broadcast stream; beyond, drop (sync recovers)


@dataclass
class PeerSecurity:
    """How peer streams are sealed: the gossip keyring with the cluster's label, and TLS."""

    keyring: swim.Keyring | None = None
    aad: bytes = b""
    ssl_client: ssl.SSLContext | None = None
    ssl_server: ssl.SSLContext | None = None

    @classmethod
    def from_config(cls, g: GossipConfig) -> PeerSecurity:
        security = cls(
            keyring=swim.Keyring(g.encryption_keys) if g.encryption_keys else None,
            aad=f"corrosion/{g.cluster_id}".encode(),
        )
        if g.tls is not None:
            security.ssl_server = server_ssl_context(
                g.tls.cert_file, g.tls.key_file, g.tls.ca_file, require_client_cert=g.tls.mutual
            )
            security.ssl_client = client_ssl_context(
                g.tls.ca_file,
                g.tls.insecure,
                client_cert=g.tls.client_cert_file,
                client_key=g.tls.client_key_file,
            )
        return security

    async def connect(self, addr: Address) -> FrameStream:
        return await connect(
            addr[0], addr[1], keyring=self.keyring, aad=self.aad, ssl_context=self.ssl_client
        )


@dataclass
class _PeerOut:
    send: MemoryObjectSendStream[bytes]
    dropped: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)  # set when its sender task ends


class PeerStreams:
    """The agent's streams to and from its peers. ``perform`` carries out the replicator's
    effects, ``queued`` wakes the apply loop when frames queued changesets; both run on the
    event loop, which owns the replicator (corrosion.core.replication, rules O1-O3)."""

    def __init__(
        self,
        replicator: Replicator,
        security: PeerSecurity,
        *,
        tg: TaskGroup,
        db_lock: anyio.Lock,
        faults: Faults,
        events: AgentEvents,
        activity: ActivityLog,
        gossip_warnings: GossipWarnings,
        perform: Callable[[Sequence[Effect]], None],
        queued: Callable[[], None],
        now: Callable[[], float],
        spans: AgentSpans | None = None,
    ) -> None:
        self.replicator = replicator
        self.security = security
        self._tg: TaskGroup | None = tg
        self._db_lock = db_lock
        self._faults = faults
        self._events = events
        self._activity = activity
        self._gossip_warnings = gossip_warnings
        self._perform = perform
        self._queued = queued
        self._now = now
        self._spans = spans or AgentSpans(replicator.actor)
        self._out: dict[Address, _PeerOut] = {}

    # -- broadcast out -------------------------------------------------------------------------

    def queued_frames(self) -> int:
        """Frames waiting in the peers' broadcast send queues (for ``/metrics``)."""
        return sum(out.send.statistics().current_buffer_used for out in self._out.values())

    def send_frame(self, addr: Address, data: bytes) -> None:
        """Queue ``data`` for ``addr``'s broadcast stream (dropped when isolated, closing or
        the queue is full)."""
        if self._tg is None:
            return
        if self._faults.isolated:
            self._events.frames_dropped += 1
            return
        out = self._out.get(addr)
        if out is None:
            send, receive = anyio.create_memory_object_stream[bytes](PEER_QUEUE)
            out = self._out[addr] = _PeerOut(send)
            self._tg.start_soon(self.sender, addr, receive, out.done)
        try:
            out.send.send_nowait(data)
        except anyio.ClosedResourceError:  # closing: the queues are draining
            self._events.frames_dropped += 1
            return
        except anyio.WouldBlock:
            out.dropped += 1
            self._events.frames_dropped += 1
            frames_log.debug("queue to %s full: frame dropped", format_addr(addr))
            return
        if frames_log.isEnabledFor(logging.DEBUG):
            frames_log.debug("frame to %s: %s", format_addr(addr), describe_frame(data))

    async def sender(
        self, addr: Address, receive: MemoryObjectReceiveStream[bytes], done: anyio.Event
    ) -> None:
        """Keeps one broadcast stream to ``addr``; on failure, drops the frame in hand and
        reconnects for the next one (sync recovers whatever is lost)."""
        stream: FrameStream | None = None
        async with receive:
            async for data in receive:
                try:
                    if stream is None:
                        stream = await self.security.connect(addr)
                        await stream.send(self.replicator.hello("bcast"))
                    await stream.send(data)
                except PEER_STREAM_ERRORS as exc:  # the handshake's IncompleteRead included
                    self._events.peer_stream_errors += 1
                    if isinstance(exc, ssl.SSLError):
                        self._tls_failed(format_addr(addr), exc, dialed=True)
                    if stream is not None:
                        with anyio.CancelScope(shield=True):
                            await stream.aclose()
                    stream = None
            if stream is not None:
                await stream.aclose()
        done.set()

    async def drain(self) -> None:
        """End each peer's queue: its sender sends what is queued, closes its stream and is
        done. No more frames are queued after this."""
        self._tg = None
        for out in list(self._out.values()):
            out.send.close()
        for out in list(self._out.values()):
            await out.done.wait()

    # -- streams in ----------------------------------------------------------------------------

    async def serve(self, raw: ByteStream) -> None:
        """A peer stream routed from the gossip port: handshake, hello, then its purpose."""
        if self._faults.isolated:
            await raw.aclose()
            return
        security = self.security
        stream: FrameStream | None = None
        # gossip streams are TCP: the address is (host, port, ...), never a unix path
        source = cast("tuple[str, int]", raw.extra(SocketAttribute.remote_address, ("?", 0)))
        try:
            if security.ssl_server is not None:
                raw = await TLSStream.wrap(
                    raw,
                    server_side=True,
                    ssl_context=security.ssl_server,
                    standard_compatible=False,
                )
            stream = FrameStream(raw, security.keyring, security.aad)
            async with raw:
                with anyio.fail_after(10):
                    await stream.handshake(client=False)
                    first = await stream.receive(max_size=MAX_HELLO)
                hello = self.replicator.check_hello(first)
                if hello is None:
                    return
                actor, purpose = hello
                if purpose == "bcast":
                    await self._receive_broadcasts(stream, self._peer_name(actor), actor)
                else:
                    await self._answer_sync(stream, self._peer_name(actor))
        except Exception as exc:  # a peer's stream must never take the agent down
            self._events.peer_stream_errors += 1
            if isinstance(exc, ssl.SSLError):  # a stream's port is ephemeral: the host alone
                self._tls_failed(str(source[0]), exc, dialed=False)
            elif isinstance(exc, UnauthenticatedFrame) or (
                security.keyring is not None and (stream is None or not stream.authenticated)
            ):
                # not a member: no key opened its frames (or they were replayed or spliced)
                self._events.peer_streams_unauthenticated += 1
                if isinstance(exc, UnauthenticatedFrame):
                    self._gossip_warnings.dropped(source, "decrypt", "stream")
            elif not isinstance(exc, PEER_STREAM_ERRORS):
                log.exception("peer stream failed")

    def _tls_failed(self, peer: str, exc: ssl.SSLError, *, dialed: bool) -> None:
        self._events.peer_tls_failures += 1
        self._gossip_warnings.tls_failed(peer, exc, dialed=dialed)

    def _peer_name(self, actor: bytes) -> str:
        """A peer's gossip address when it is a known member, else its actor id."""
        peer = self.replicator.peers.get(actor)
        return format_addr(peer.addr) if peer is not None else actor.hex()

    async def _receive_broadcasts(self, stream: FrameStream, peer: str, actor: bytes) -> None:
        replicator = self.replicator
        stats = replicator.stats
        while True:
            data = await stream.receive()
            if self._faults.isolated:
                return
            if frames_log.isEnabledFor(logging.DEBUG):
                frames_log.debug("frame from %s: %s", peer, describe_frame(data))
            before, malformed = len(replicator.queue), stats.malformed
            self._perform(replicator.handle_frame(None, data, self._now(), sender=actor))
            if len(replicator.queue) != before:
                queued = replicator.queue[before:]
                # counted from what was decoded, not by reading the frame's header again
                self._events.broadcast_changes_recv += sum(
                    len(q.item.changes) for q in queued if isinstance(q.item, Changeset)
                )
                self._spans.queued(queued, peer, "broadcast")
                self._queued()
            if stats.malformed != malformed:
                self._activity.malformed(
                    peer, frame_error(data, plumtree=replicator.plumtree is not None)
                )

    # -- sync ----------------------------------------------------------------------------------

    async def _answer_sync(self, stream: FrameStream, peer: str) -> None:
        replicator = self.replicator
        with anyio.fail_after(30):
            request = await stream.receive()
        began, began_ns = self._now(), time.time_ns()
        opened = replicator.open_sync(request)
        if isinstance(opened, bytes):  # the reject frame
            frames = [opened]
        else:
            answer = replicator.sync_answer
            async with self._db_lock:
                opened = replicator.with_traces(opened)
                frames = await anyio.to_thread.run_sync(lambda: list(answer(opened)))
        sync_log.debug("sync request from %s: answering with %d frames", peer, len(frames))
        changes = sum(map(changes_in, frames))
        self._events.sync_changes_sent += changes
        ok = False
        try:
            with anyio.fail_after(120):
                for frame in frames:
                    if self._faults.isolated:
                        return
                    await stream.send(frame)
            ok = True
        finally:
            nbytes = sum(map(len, frames))
            self._events.sync.session("server", ok, self._now() - began, changes, nbytes)
            traced = not isinstance(opened, bytes) and bool(opened.traces)
            self._spans.sync_served(peer, began_ns, frames, changes, traced, ok)
        self._activity.sync_served(peer, len(frames) - 1)  # all but the done (or reject) frame

    async def run_sync(self, addr: Address, request: bytes) -> None:
        """One sync session with ``addr`` (the replicator's ``StartSync``)."""
        replicator = self.replicator
        pulled, ok = 0, False
        began, changes, nbytes, received = self._now(), 0, 0, 0
        session = self._spans.sync_session(format_addr(addr))
        sync_log.debug("sync with %s: asking (%d bytes of state)", format_addr(addr), len(request))
        try:
            stream = await self.security.connect(addr)
            async with stream.stream:
                with anyio.fail_after(120):
                    await stream.send(replicator.hello("sync"))
                    await stream.send(request)
                    while True:
                        data = await stream.receive()
                        if self._faults.isolated:
                            raise OSError("isolated")
                        nbytes += len(data)
                        received += 1
                        carried = changes_in(data)
                        changes += carried
                        before = len(replicator.queue)
                        more = replicator.handle_sync_frame(addr, data, self._now())
                        if len(replicator.queue) != before:
                            pulled += len(replicator.queue) - before
                            self._events.sync_changes_recv += carried
                            if session is not None:
                                new = replicator.queue[before:]
                                self._spans.queued(new, format_addr(addr), "sync", session)
                            self._queued()
                        if not more:
                            break
            ok = True
        except PEER_STREAM_ERRORS as exc:
            self._events.peer_stream_errors += 1
            sync_log.debug("sync with %s failed: %r", format_addr(addr), exc)
            if isinstance(exc, ssl.SSLError):
                self._tls_failed(format_addr(addr), exc, dialed=True)
        finally:
            replicator.sync_finished(addr)
            self._events.sync.session("client", ok, self._now() - began, changes, nbytes)
            if session is not None:
                session.finish(
                    ok,
                    request_bytes=len(request),
                    frames=received,
                    changes=changes,
                    nbytes=nbytes,
                    pulled=pulled,
                )
            sync_log.debug("sync with %s: %d changesets pulled", format_addr(addr), pulled)
            self._activity.sync_session(format_addr(addr), pulled, ok)


def changes_in(frame: bytes) -> int:
    """The changes a changeset frame carries (0 for any other frame), read from its array
    header without decoding them: for the sync and broadcast counters of ``/metrics``."""
    if peek_changeset(frame) is None:
        return 0
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame) + 16)
    unpacker.feed(frame)
    try:
        unpacker.read_array_header()
        for _ in range(9):  # kind, wire, actor, version, seqs, last_seq, ts, db_version
            unpacker.skip()
        return int(unpacker.read_array_header())
    except MSGPACK_ERRORS:
        return 0
