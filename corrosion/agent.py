"""The agent runtime: a ``Store``, a ``Replicator`` and a ``swim.SwimNode`` on real sockets,
hosted in one anyio task group (asyncio, uvloop or trio), plus optionally the HTTP API.

    async with corrosion.Agent(config) as agent:
        await agent.execute(["INSERT INTO t VALUES (1, 'x')"])
        async for row in agent.query("SELECT * FROM t"):
            ...

Threads and locks: SQLite work runs in worker threads (``anyio.to_thread``), one at a time under
``db_lock`` (one writer connection). The event loop owns everything in memory — the replicator's
state, the store's bookkeeping, peer choice, timers: a worker thread reads it and returns what
it did, and the loop installs that (``Replicator.install_apply`` / ``install_commit``) before it
releases ``db_lock`` (corrosion/replication.py, rules O1-O3). Reads (``query``) use their own
read-only connections, in parallel with writes (WAL); only the pool of those connections is
shared with the threads (atomic list operations).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import apsw
from anyio.abc import ByteStream, SocketAttribute, TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

import crdt
import crdt.tableinfo
import swim
from crdt.errors import SchemaError
from crdt.schema import load_schema_paths

from .changeset import Changeset
from .config import Config, ConfigError, format_addr, gossip_security_error, security_warnings
from .dblock import DatabaseLock
from .extensions import AgentExtension, check_extensions
from .lag import LagWindow
from .logs import ActivityLog, GossipWarnings, describe_frame, frame_error, log_member_event
from .pending_schema import PendingSchema
from .ranges import RangeSet
from .replication import (
    Effect,
    ReplicationConfig,
    Replicator,
    SendFrame,
    SetTimer,
    StartSync,
    decode_meta,
    encode_meta,
    peer_address,
)
from .results import (
    ExecResult,
    MemberInfo,
    QueryError,
    QueryTimeout,
    TransactionError,
    TransactionRefused,
    TransactionTimeout,
    UpdateWatch,
)
from .schema_errors import for_operator
from .sqlguard import NOT_READONLY, Deadline, Guard, client_timeout, guard_of
from .startup import listening
from .statements import parse_statements
from .store import (
    ApplyResult,
    LocalCommit,
    SchemaReload,
    StatementError,
    StatementRefused,
    StatementTimeout,
    Store,
)
from .subscriptions import Subscriptions
from .transport import (
    PEER_PREAMBLE,
    PEER_STREAM_ERRORS,
    FrameStream,
    UnauthenticatedFrame,
    client_ssl_context,
    connect,
)

log = logging.getLogger("corrosion.agent")
schema_log = logging.getLogger("corrosion.schema")
sync_log = logging.getLogger("corrosion.sync")
frames_log = logging.getLogger("corrosion.broadcast")

MAX_HELLO = 4096  # bytes a peer stream's first frame may have (read before it is authenticated)
PEER_QUEUE = 4096  # frames waiting for one peer's broadcast stream; beyond, drop (sync recovers)


_DEFAULT: Any = object()  # "the configured default" for a timeout argument


def _transaction_error(exc: StatementError) -> TransactionError:
    if isinstance(exc, StatementRefused):
        return TransactionRefused(exc.message, exc.index)
    if isinstance(exc, StatementTimeout):
        return TransactionTimeout(exc.message, exc.index)
    return TransactionError(exc.message, exc.index)


@dataclass
class _PeerOut:
    send: MemoryObjectSendStream[bytes]
    dropped: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)  # set when its sender task ends


class Faults:
    """Test hook: ``isolated`` cuts this node off, as a network partition would: peer traffic
    (broadcast and sync) both ways, and its SWIM datagrams and streams, so the others mark it
    down and the two sides must find each other again after the heal."""

    def __init__(self) -> None:
        self._isolated = False
        self.swim: swim.SwimNode | None = None

    @property
    def isolated(self) -> bool:
        return self._isolated

    @isolated.setter
    def isolated(self, value: bool) -> None:
        self._isolated = value
        if self.swim is not None:
            self.swim.isolated = value


@dataclass
class AgentEvents:
    """Counters a test or the health endpoint can read."""

    applied_versions: int = 0
    peer_stream_errors: int = 0
    frames_dropped: int = 0
    peer_streams_unauthenticated: int = 0  # cut: no gossip key opened their frames


def actor_hex(actor: bytes) -> str:
    return actor.hex()


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        seed: int | None = None,
        serve_api: bool = True,
        allow_destructive: bool = False,
        extensions: Sequence[AgentExtension] = (),
    ) -> None:
        self.config = config
        # hosted code of a higher layer (the orchestrator): see corrosion.extensions
        self.extensions = list(extensions)
        self._allow_destructive = allow_destructive  # at start: drop tables the schema lacks
        # versions kept until this node has their schema, and the tables in the database that
        # the schema files do not list (both for /v1/health); installed on the event loop
        self.pending_schema = PendingSchema(log)
        self.not_in_schema: list[str] = []
        self._seed = seed
        self._serve_api = serve_api
        self.store: Store | None = None
        self.replicator: Replicator | None = None
        self.swim: swim.SwimNode | None = None
        self.db_lock = anyio.Lock()
        self.events = AgentEvents()
        self.lag = LagWindow()
        self.faults = Faults()
        # called with each ApplyResult that booked versions (benchmarks, subscriptions)
        self.apply_listeners: list[Any] = []
        self._update_watchers: dict[str, list[MemoryObjectSendStream[tuple[str, tuple]]]] = {}
        self.subscriptions = Subscriptions(
            self._read_conn, self._release_read_conn, timeout=config.api.query_timeout
        )
        self._tg: TaskGroup | None = None
        self._timers: list[tuple[float, int, Any]] = []
        self._timer_seq = 0
        self._wake = anyio.Event()
        self._apply_wake = anyio.Event()
        self._applied = anyio.Event()
        self._peers_out: dict[tuple[str, int], _PeerOut] = {}
        self._keyring: swim.Keyring | None = None
        self._aad = b""
        self._ssl_client: ssl.SSLContext | None = None
        self._ssl_server: ssl.SSLContext | None = None
        self.peer_addr: tuple[str, int] | None = None
        self._api_servers: list[Any] = []
        self.api_addrs: list[tuple[str, int]] = []
        self.metrics_addr: tuple[str, int] | None = None  # bound, with telemetry.prometheus.addr
        self._read_pool: list[apsw.Connection] = []
        self._closing = False
        self._started_at = 0.0
        self._db_lock_file: DatabaseLock | None = None
        self._closers: list[Any] = []  # async callables run first on close (admin, metrics)
        self.admin_path: os.PathLike[str] | None = None  # where the admin socket listens
        self._admin_abspath: str | None = None
        self.activity = ActivityLog(config.log_summary_interval, self._now)
        # gossip no key here opens, joins no seed answers: a key mismatch must not be silent
        self.gossip_warnings = GossipWarnings(config.log_summary_interval, self._now)
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def actor_id(self) -> bytes:
        assert self.store is not None
        return self.store.actor_id

    async def start(self) -> None:
        cfg = self.config
        problem = gossip_security_error(cfg.gossip)
        if problem is not None:  # before anything is created or bound
            raise ConfigError(problem)
        check_extensions(cfg, self.extensions)
        self._started_at = time.monotonic()
        self.config.db.path.parent.mkdir(parents=True, exist_ok=True)
        self._db_lock_file = DatabaseLock(cfg.db.path)
        self._db_lock_file.acquire()  # DatabaseInUse: another agent runs on this database
        try:
            await self._open(cfg)
        except BaseException:
            await self.aclose()
            raise

    async def _open(self, cfg: Config) -> None:
        self.store = await anyio.to_thread.run_sync(Store, cfg.db.path)
        if cfg.db.schema_paths or any(ext.schema for ext in self.extensions):
            await self._apply_schema_files(cfg.db.schema_paths, self._allow_destructive)
        else:
            self.pending_schema.install(await anyio.to_thread.run_sync(self.store.pending_summary))
        g = cfg.gossip
        if g.encryption_keys:
            self._keyring = swim.Keyring(g.encryption_keys)
        self._aad = f"corrosion/{g.cluster_id}".encode()
        if g.tls is not None:
            from .transport import server_ssl_context

            self._ssl_server = server_ssl_context(
                g.tls.cert_file, g.tls.key_file, g.tls.ca_file, require_client_cert=g.tls.mutual
            )
            self._ssl_client = client_ssl_context(
                g.tls.ca_file,
                g.tls.insecure,
                client_cert=g.tls.client_cert_file,
                client_key=g.tls.client_key_file,
            )
        rng = random.Random(self._seed)
        self.replicator = Replicator(
            self.store,
            ReplicationConfig(
                cluster_id=g.cluster_id,
                min_sync_backoff=cfg.perf.min_sync_backoff,
                max_sync_backoff=cfg.perf.max_sync_backoff,
                broadcast=cfg.perf.broadcast,
            ),
            rng,
            lambda: int(time.time() * 1000),
        )
        host = g.addr[0]
        swim_cfg = {
            "lan": swim.Config.lan,
            "wan": swim.Config.wan,
            "local": swim.Config.local,
        }[g.preset](label=f"corrosion/{g.cluster_id}")
        self.swim = swim.SwimNode(
            swim_cfg,
            host=host,
            port=g.addr[1],
            advertise=g.external_addr,
            # peer port 0: peer streams share the gossip port (routed by their preamble)
            meta=encode_meta(self.store.actor_id, 0, g.cluster_id),
            keyring=self._keyring,
            rng_seed=None if self._seed is None else rng.randrange(2**32),
        )
        self.faults.swim = self.swim
        self.swim.isolated = self.faults.isolated
        self.swim.on_dropped = self.gossip_warnings.dropped
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        events = self.swim.subscribe(max_buffer=10_000)
        self.swim.route_streams(PEER_PREAMBLE, self._serve_peer)
        with listening("gossip.addr", g.addr):
            await self._tg.start(self.swim.serve)
        self.peer_addr = self.swim.address
        self._tg.start_soon(self._swim_events, events)
        self._tg.start_soon(self._timer_loop)
        self._tg.start_soon(self._apply_loop)
        self._tg.start_soon(self.subscriptions.run)
        self._tg.start_soon(self._activity_loop)
        self._perform(self.replicator.start(self._now()))
        self._tg.start_soon(self._join_loop)
        await self._start_admin()
        if cfg.prometheus_addr is not None:
            from .metrics import start_metrics

            with listening("telemetry.prometheus.addr", cfg.prometheus_addr):
                close, self.metrics_addr = await start_metrics(self, self._tg, cfg.prometheus_addr)
                self._closers.append(close)
        for ext in self.extensions:
            await ext.start(self, self._tg)
            self._closers.append(ext.close)
        if self._serve_api and cfg.api.addrs:
            await self._start_api()
        self._started = True
        for warning in security_warnings(cfg, self.swim.address, self.api_addrs):
            log.warning("%s", warning)  # once bound: with the ports port 0 became
        log.info("agent started", extra={"fields": self._startup_fields()})

    def _startup_fields(self) -> dict[str, Any]:
        """Everything this agent bound, for the start-up line."""
        assert self.swim is not None
        metrics = self.metrics_addr
        api = [format_addr(a) for a in self.api_addrs]
        return {
            "actor_id": self.actor_id.hex(),
            "db_path": str(self.config.db.path),
            "gossip_addr": format_addr(self.swim.address),
            "api_addrs": api,
            "admin_path": self._admin_abspath,
            "metrics_addr": format_addr(metrics) if metrics else None,
            "extensions": [ext.name for ext in self.extensions],
            "cluster_id": self.config.gossip.cluster_id,
        }

    async def aclose(self) -> None:
        """Leave the cluster gracefully, give queued broadcasts a moment to go out, stop."""
        if self._closing:
            return
        self._closing = True
        for server in self._api_servers:
            server.close()
        # No cancel scope around these: an extension's task group was entered in start() and
        # must be exited at the same nesting level.
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                log.exception("closing %r", close)
        if self.swim is not None:
            with (
                anyio.move_on_after(3),
                anyio.CancelScope(shield=True),
                contextlib.suppress(Exception),
            ):
                await self.swim.leave(timeout=2)
        # end each peer's queue: its sender sends what is queued, closes its stream, and is done
        with anyio.move_on_after(2, shield=True):
            for out in list(self._peers_out.values()):
                out.send.close()
            for out in list(self._peers_out.values()):
                await out.done.wait()
        if self._tg is not None:
            # The task group was entered in start(); exit it at the same nesting level (no
            # extra cancel scope around this call), or anyio cannot unwind its scope.
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self.swim is not None:
            with anyio.CancelScope(shield=True):
                await self.swim.aclose()
        for conn in self._read_pool:
            conn.close()
        self._read_pool.clear()
        if self.store is not None:
            store = self.store
            with anyio.CancelScope(shield=True):
                async with self.db_lock:
                    store.close()
        if self._db_lock_file is not None:
            self._db_lock_file.release()
        if self._started:
            log.info("agent stopped")

    def _now(self) -> float:
        return time.monotonic()

    # -- effects and timers ----------------------------------------------------------------

    def _perform(self, effects: Sequence[Effect]) -> None:
        if self._tg is None:
            return  # closing: nothing more goes out
        for eff in effects:
            if isinstance(eff, SendFrame):
                self._send_frame(eff.addr, eff.data)
            elif isinstance(eff, StartSync):
                self._tg.start_soon(self._run_sync, eff.addr, eff.request)
            elif isinstance(eff, SetTimer):
                self._timer_seq += 1
                heapq.heappush(self._timers, (eff.at, self._timer_seq, eff.timer))
                self._wake.set()

    async def _timer_loop(self) -> None:
        assert self.replicator is not None
        while True:
            now = self._now()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                self._perform(self.replicator.handle_timer(timer, now))
            delay = self._timers[0][0] - now if self._timers else 3600.0
            self._wake = anyio.Event()
            with anyio.move_on_after(delay):
                await self._wake.wait()

    # -- broadcast streams -----------------------------------------------------------------

    def _send_frame(self, addr: tuple[str, int], data: bytes) -> None:
        if self._tg is None:
            return
        if self.faults.isolated:
            self.events.frames_dropped += 1
            return
        out = self._peers_out.get(addr)
        if out is None:
            send, receive = anyio.create_memory_object_stream[bytes](PEER_QUEUE)
            out = self._peers_out[addr] = _PeerOut(send)
            self._tg.start_soon(self._peer_sender, addr, receive, out.done)
        try:
            out.send.send_nowait(data)
        except anyio.ClosedResourceError:  # closing: the queues are draining
            self.events.frames_dropped += 1
            return
        except anyio.WouldBlock:
            out.dropped += 1
            self.events.frames_dropped += 1
            frames_log.debug("queue to %s full: frame dropped", format_addr(addr))
            return
        if frames_log.isEnabledFor(logging.DEBUG):
            frames_log.debug("frame to %s: %s", format_addr(addr), describe_frame(data))

    async def _peer_sender(self, addr: tuple[str, int], receive: Any, done: anyio.Event) -> None:
        """Keeps one broadcast stream to ``addr``; on failure, drops the frame in hand and
        reconnects for the next one (sync recovers whatever is lost)."""
        assert self.replicator is not None
        stream: FrameStream | None = None
        async with receive:
            async for data in receive:
                try:
                    if stream is None:
                        stream = await connect(
                            addr[0],
                            addr[1],
                            keyring=self._keyring,
                            aad=self._aad,
                            ssl_context=self._ssl_client,
                        )
                        await stream.send(self.replicator.hello("bcast"))
                    await stream.send(data)
                except PEER_STREAM_ERRORS:  # the handshake's IncompleteRead included
                    self.events.peer_stream_errors += 1
                    if stream is not None:
                        with anyio.CancelScope(shield=True):
                            await stream.aclose()
                    stream = None
            if stream is not None:
                await stream.aclose()
        done.set()

    async def _serve_peer(self, raw: ByteStream) -> None:
        assert self.replicator is not None
        if self.faults.isolated:
            await raw.aclose()
            return
        stream: FrameStream | None = None
        # gossip streams are TCP: the address is (host, port, ...), never a unix path
        source = cast("tuple[str, int]", raw.extra(SocketAttribute.remote_address, ("?", 0)))
        try:
            if self._ssl_server is not None:
                from anyio.streams.tls import TLSStream

                raw = await TLSStream.wrap(
                    raw, server_side=True, ssl_context=self._ssl_server, standard_compatible=False
                )
            stream = FrameStream(raw, self._keyring, self._aad)
            async with raw:
                with anyio.fail_after(10):
                    await stream.handshake(client=False)
                    first = await stream.receive(max_size=MAX_HELLO)
                hello = self.replicator.check_hello(first)
                if hello is None:
                    return
                actor, purpose = hello
                if purpose == "bcast":
                    await self._receive_broadcasts(stream, self._peer_name(actor))
                else:
                    await self._answer_sync(stream, self._peer_name(actor))
        except Exception as exc:
            self.events.peer_stream_errors += 1
            if isinstance(exc, UnauthenticatedFrame) or (
                self._keyring is not None and (stream is None or not stream.authenticated)
            ):
                # not a member: no key opened its frames (or they were replayed or spliced)
                self.events.peer_streams_unauthenticated += 1
                if isinstance(exc, UnauthenticatedFrame):
                    self.gossip_warnings.dropped(source, "decrypt", "stream")
            elif not isinstance(exc, PEER_STREAM_ERRORS):
                log.exception("peer stream failed")

    def _peer_name(self, actor: bytes) -> str:
        """A peer's gossip address when it is a known member, else its actor id."""
        assert self.replicator is not None
        peer = self.replicator.peers.get(actor)
        return format_addr(peer.addr) if peer is not None else actor.hex()

    async def _receive_broadcasts(self, stream: FrameStream, peer: str) -> None:
        assert self.replicator is not None
        stats = self.replicator.stats
        while True:
            data = await stream.receive()
            if self.faults.isolated:
                return
            if frames_log.isEnabledFor(logging.DEBUG):
                frames_log.debug("frame from %s: %s", peer, describe_frame(data))
            before, malformed = len(self.replicator.queue), stats.malformed
            self._perform(self.replicator.handle_frame(None, data, self._now()))
            if len(self.replicator.queue) != before:
                self._apply_wake.set()
            if stats.malformed != malformed:
                self.activity.malformed(peer, frame_error(data))

    # -- sync -------------------------------------------------------------------------------

    async def _answer_sync(self, stream: FrameStream, peer: str) -> None:
        replicator = self.replicator
        assert replicator is not None
        with anyio.fail_after(30):
            request = await stream.receive()
        opened = replicator.open_sync(request)
        if isinstance(opened, bytes):  # the reject frame
            frames = [opened]
        else:
            answer = replicator.sync_answer
            async with self.db_lock:
                frames = await anyio.to_thread.run_sync(lambda: list(answer(opened)))
        sync_log.debug("sync request from %s: answering with %d frames", peer, len(frames))
        with anyio.fail_after(120):
            for frame in frames:
                if self.faults.isolated:
                    return
                await stream.send(frame)
        self.activity.sync_served(peer, len(frames) - 1)  # all but the done (or reject) frame

    async def _run_sync(self, addr: tuple[str, int], request: bytes) -> None:
        assert self.replicator is not None
        pulled, ok = 0, False
        sync_log.debug("sync with %s: asking (%d bytes of state)", format_addr(addr), len(request))
        try:
            stream = await connect(
                addr[0], addr[1], keyring=self._keyring, aad=self._aad, ssl_context=self._ssl_client
            )
            async with stream.stream:
                with anyio.fail_after(120):
                    await stream.send(self.replicator.hello("sync"))
                    await stream.send(request)
                    while True:
                        data = await stream.receive()
                        if self.faults.isolated:
                            raise OSError("isolated")
                        before = len(self.replicator.queue)
                        more = self.replicator.handle_sync_frame(addr, data, self._now())
                        if len(self.replicator.queue) != before:
                            pulled += len(self.replicator.queue) - before
                            self._apply_wake.set()
                        if not more:
                            break
            ok = True
        except PEER_STREAM_ERRORS as exc:
            self.events.peer_stream_errors += 1
            sync_log.debug("sync with %s failed: %r", format_addr(addr), exc)
        finally:
            self.replicator.sync_finished(addr)
            sync_log.debug("sync with %s: %d changesets pulled", format_addr(addr), pulled)
            self.activity.sync_session(format_addr(addr), pulled, ok)

    # -- applying ---------------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        assert self.replicator is not None
        rep = self.replicator
        while True:
            await self._apply_wake.wait()
            self._apply_wake = anyio.Event()
            while rep.queue:
                batch = rep.take_batch(self.config.perf.apply_batch_size)
                result = None
                try:
                    async with self.db_lock:
                        # installed in commit order, before the lock is free (even if cancelled)
                        with anyio.CancelScope(shield=True):
                            try:
                                result = await anyio.to_thread.run_sync(rep.apply_batch, batch)
                            finally:
                                rep.install_apply(batch, result, self._now())
                        assert result is not None  # the apply returned (else it raised)
                        if result.kept:
                            self.pending_schema.kept(result.kept_missing)
                except Exception:
                    log.exception("applying %d changesets failed", len(batch))
                    continue
                if result.changes:
                    self._changed(result.changes)
                for actor, version, reason in result.rejected:
                    self.activity.rejected(actor, version, reason)
                if result.applied or result.emptied:
                    self.activity.applied(len(result.applied), result.changes_applied)
                if result.applied or result.emptied or result.kept:
                    self._record_lag(batch, result)
                    self.events.applied_versions += len(result.applied) + result.emptied
                    for listener in self.apply_listeners:
                        listener(result)
                    self._applied.set()
                    self._applied = anyio.Event()

    def _record_lag(self, batch: Sequence[Any], result: ApplyResult) -> None:
        stamps = {(it.actor, it.version): it.ts for it in batch if isinstance(it, Changeset)}
        wall = time.time()
        for key in result.applied:
            ts = stamps.get(key)
            if ts is not None:
                self.lag.record(wall, ts)

    def p99_lag(self) -> float:
        """Seconds between a version's commit at its origin and its apply here (p99, 120 s)."""
        return self.lag.p99(time.time())

    async def _activity_loop(self) -> None:
        """Every ``log.summary_interval``: the sync summary and the throttled repeats."""
        while True:
            await anyio.sleep(self.activity.interval)
            self.activity.tick()
            self.gossip_warnings.flush()

    # -- membership ---------------------------------------------------------------------------

    async def _swim_events(self, events: Any) -> None:
        assert self.replicator is not None and self.store is not None
        async with events:
            async for ev in events:
                log_member_event(ev, self._describe_member)
                for m in self.replicator.member_event(ev):
                    await self._persist_member(m)

    @staticmethod
    def _describe_member(m: swim.Member) -> tuple[str, str]:
        info = decode_meta(m.meta)
        return (info[0].hex() if info else "", format_addr(m.addr))

    async def _persist_member(self, m: swim.Member) -> None:
        info = decode_meta(m.meta)
        if info is None or self.store is None:
            return
        store = self.store
        async with self.db_lock:
            await anyio.to_thread.run_sync(
                store.save_member, info[0], format_addr(m.addr), m.state.name, m.meta
            )

    async def _join_loop(self) -> None:
        """Join through the configured seeds and the members remembered from the last run;
        retry with backoff until someone answers (or there is no one to ask)."""
        assert self.swim is not None and self.store is not None
        seeds = list(self.config.gossip.bootstrap)
        async with self.db_lock:
            remembered = await anyio.to_thread.run_sync(self.store.load_members)
        own = self.swim.address
        for _actor, address, _state, _meta in remembered[:20]:
            from .config import parse_addr

            try:
                addr = parse_addr(address, "member")
            except ValueError:
                continue
            if addr not in seeds and addr != own:
                seeds.append(addr)
        seeds = [s for s in seeds if s != own]
        if not seeds:
            return
        delay = 0.5
        attempts = 0
        while not self._closing:
            try:
                joined = await self.swim.join(seeds, timeout=5)
            except OSError:  # a seed unreachable right now: retried below
                joined = 0
            if joined:
                return
            attempts += 1
            self.gossip_warnings.join_unanswered([format_addr(s) for s in seeds], attempts)
            await anyio.sleep(delay)
            delay = min(delay * 2, 30)

    # -- the public API ----------------------------------------------------------------------

    async def execute(self, statements: Sequence[Any], *, timeout: Any = _DEFAULT) -> ExecResult:
        """Run statements (corrosion's four JSON forms, or ``(sql, params)``) in one
        transaction; raise ``TransactionError`` if any fails (nothing applied):
        ``TransactionRefused`` for what clients may not do (``corrosion.sqlguard``: DDL, ATTACH,
        internal or unreplicated tables...), ``TransactionTimeout`` when the statements run
        longer than ``timeout`` seconds (default ``api.transaction_timeout``; None or 0: none)."""
        assert self.store is not None and self.replicator is not None
        parsed = parse_statements(statements)
        ts = self.replicator.hlc.now()
        t0 = time.perf_counter()
        store = self.store
        seconds = self.config.api.transaction_timeout if timeout is _DEFAULT else timeout
        try:
            async with self.db_lock:
                with anyio.CancelScope(shield=True):  # booked before the lock is free
                    results, commit = await anyio.to_thread.run_sync(
                        lambda: store.execute_local(parsed, ts, timeout=seconds)
                    )
                    effects = self.replicator.install_commit(commit, self._now())
        except StatementError as exc:
            raise _transaction_error(exc) from None
        self._perform(effects)
        if commit is not None:
            self._changed(commit.changes)
            self.activity.local_commit()
        return ExecResult(
            [{"rows_affected": r.rows_affected, "time": r.time} for r in results],
            time.perf_counter() - t0,
            commit.version if commit is not None else None,
            actor_hex(store.actor_id),
        )

    async def execute_commit(
        self, statements: Sequence[Any], *, timeout: Any = _DEFAULT
    ) -> LocalCommit | None:
        """Like ``execute`` but returns the booked commit (for publishers and tests)."""
        assert self.store is not None and self.replicator is not None
        parsed = parse_statements(statements)
        ts = self.replicator.hlc.now()
        store = self.store
        seconds = self.config.api.transaction_timeout if timeout is _DEFAULT else timeout
        try:
            async with self.db_lock:
                with anyio.CancelScope(shield=True):  # booked before the lock is free
                    _results, commit = await anyio.to_thread.run_sync(
                        lambda: store.execute_local(parsed, ts, timeout=seconds)
                    )
                    effects = self.replicator.install_commit(commit, self._now())
        except StatementError as exc:
            raise _transaction_error(exc) from None
        self._perform(effects)
        if commit is not None:
            self._changed(commit.changes)
            self.activity.local_commit()
        return commit

    # -- /v1/updates ------------------------------------------------------------------------

    def _changed(self, changes: Sequence[Any]) -> None:
        """Committed changes (local or applied): tell update watchers and subscriptions."""
        if self._update_watchers:
            self._notify_updates(changes)
        if self.subscriptions.by_id:
            self.subscriptions.notify({c.table for c in changes})

    def _notify_updates(self, changes: Sequence[Any]) -> None:
        """Tell watchers of each changed table which rows changed: ``delete`` when the row's
        causal length is even (deleted), ``update`` otherwise (inserts included), once per row
        per transaction, as corrosion's /v1/updates does."""
        rows: dict[tuple[str, bytes], str] = {}
        for c in changes:
            if c.table in self._update_watchers:
                rows[(c.table, c.pk)] = "delete" if c.cl % 2 == 0 else "update"
        for (table, pk), kind in rows.items():
            try:
                values = crdt.unpack_pk(pk)
            except crdt.PackError:
                continue
            for send in list(self._update_watchers.get(table, [])):
                try:
                    send.send_nowait((kind, values))
                except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    # a watcher that cannot keep up is cut off (it must re-read and re-watch)
                    self._update_watchers[table].remove(send)
                    send.close()

    def is_replicated(self, table: str) -> bool:
        conn = self._read_conn()  # not the writer: a worker thread may be using it
        try:
            return crdt.tableinfo.is_crr(conn, table)
        finally:
            self._release_read_conn(conn)

    def watch_updates(self, table: str, *, buffer: int = 10_240) -> UpdateWatch:
        """Start watching ``table`` now; iterate the returned object for ``(kind, pk_values)``
        of every row changed from now on (local writes and applied remote versions), and close
        it when done. Raises QueryError for a table that is not a CRR."""
        if not self.is_replicated(table):
            raise QueryError(f"no such replicated table: {table}")
        send, receive = anyio.create_memory_object_stream[tuple[str, tuple]](buffer)
        self._update_watchers.setdefault(table, []).append(send)

        def close() -> None:
            watchers = self._update_watchers.get(table, [])
            if send in watchers:
                watchers.remove(send)
            if not watchers:
                self._update_watchers.pop(table, None)
            send.close()

        return UpdateWatch(receive, close)

    def _read_conn(self) -> apsw.Connection:
        with contextlib.suppress(IndexError):  # pop is atomic: threads may share the pool
            return self._read_pool.pop()
        conn = crdt.connect(str(self.config.db.path), flags=apsw.SQLITE_OPEN_READONLY)
        conn.execute("PRAGMA query_only = ON")
        Guard(writes=False).install(conn)  # checks clients' queries (sqlguard)
        return conn

    def _release_read_conn(self, conn: apsw.Connection) -> None:
        if len(self._read_pool) < 8 and not self._closing:
            self._read_pool.append(conn)
        else:
            conn.close()

    async def query(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] = (),
        *,
        batch: int = 512,
        timeout: Any = _DEFAULT,
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Rows of a read-only statement, read on a read-only connection in a worker thread."""
        async for kind, payload in self.query_stream(sql, params, batch=batch, timeout=timeout):
            if kind == "rows":
                for row in payload:
                    yield row

    async def query_stream(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] = (),
        *,
        batch: int = 512,
        timeout: Any = _DEFAULT,
    ) -> AsyncIterator[tuple[str, Any]]:
        """``("columns", [...])`` then ``("rows", [tuple, ...])`` batches; raises
        ``QueryError`` (before the columns for refused or invalid statements), ``QueryTimeout``
        once the query has run ``timeout`` seconds (default ``api.query_timeout``; None or 0:
        no limit), reading rows included."""
        from crdt.schema import split_statements

        if len(split_statements(sql)) != 1:
            raise QueryError("exactly one statement is expected")
        seconds = self.config.api.query_timeout if timeout is _DEFAULT else timeout
        # A point query should cost one trip to a worker thread, not four: take a pooled
        # connection here, stop after a short batch, and put the connection back here.
        try:
            conn = self._read_pool.pop()
        except IndexError:
            conn = await anyio.to_thread.run_sync(self._read_conn)
        guard = guard_of(conn)
        assert guard is not None
        deadline = Deadline(conn, seconds).__enter__()
        try:
            cursor = conn.cursor()

            def failed(exc: apsw.Error, *, client_error: bool) -> QueryError:
                if deadline.expired:
                    return QueryTimeout(
                        deadline.message("the query", client_timeout("api.query_timeout"))
                    )
                refused = guard.refused(exc)
                if refused is not None:
                    return QueryError(refused.message)
                return QueryError(str(exc), client_error=client_error)

            def first() -> tuple[list[str], list[tuple]]:
                seen: dict[str, Any] = {}

                def check(cur: apsw.Cursor, _sql: str, _bindings: Any) -> bool:
                    # called once the statement is prepared, before it runs
                    seen["cols"] = [d[0] for d in cur.get_description()]
                    return bool(cur.is_readonly)

                cursor.exec_trace = check
                guard.statement(cursor)
                try:
                    # A connection notices a schema change (a reload) only when it next reads;
                    # until then ``SELECT *`` would be prepared, and its columns reported, from
                    # the old schema. Read once first, and do not reuse a cached statement.
                    conn.execute("SELECT 1 FROM sqlite_schema LIMIT 0")
                    cursor.execute(sql, params, can_cache=False)
                except apsw.ExecTraceAbort:
                    raise QueryError(NOT_READONLY) from None
                except apsw.ReadOnlyError:
                    raise QueryError(NOT_READONLY) from None
                except apsw.Error as exc:
                    raise failed(exc, client_error=True) from None
                finally:
                    cursor.exec_trace = None
                try:
                    return seen.get("cols", []), _fetch(cursor, batch)
                except apsw.Error as exc:
                    raise failed(exc, client_error=False) from None

            cols, rows = await anyio.to_thread.run_sync(first)
            yield "columns", cols
            while rows:
                yield "rows", rows
                if len(rows) < batch:  # _fetch stopped at the end
                    break
                try:
                    rows = await anyio.to_thread.run_sync(_fetch, cursor, batch)
                except apsw.Error as exc:  # a runtime error after the first batch
                    raise failed(exc, client_error=False) from None
        finally:
            deadline.__exit__(None, None, None)
            if len(self._read_pool) < 8 and not self._closing:
                self._release_read_conn(conn)  # into the pool: nothing to close
            else:
                await anyio.to_thread.run_sync(self._release_read_conn, conn)

    async def reload_schema(self, *, allow_destructive: bool = False) -> list[str]:
        """Apply ``db.schema_paths`` again (``corrosion reload``), re-read from the config file
        when the agent was started from one, so an edited list takes effect; return what
        changed. Tables the files do not list are kept unless ``allow_destructive``."""
        paths = self.config.db.schema_paths
        if self.config.source is not None:
            fresh = await anyio.to_thread.run_sync(Config.load, self.config.source)
            paths = fresh.db.schema_paths
        done = await self._apply_schema_files(paths, allow_destructive)
        if paths != self.config.db.schema_paths:
            schema_log.info("db.schema_paths now %s", ", ".join(map(str, paths)) or "(none)")
            self.config = dataclasses.replace(
                self.config, db=dataclasses.replace(self.config.db, schema_paths=paths)
            )
        return done

    async def _apply_schema_files(
        self, paths: Sequence[os.PathLike[str] | str], allow_destructive: bool
    ) -> list[str]:
        assert self.store is not None
        parts = [load_schema_paths(list(paths))]
        parts += [ext.schema for ext in self.extensions if ext.schema]
        sql = "\n;\n".join(parts)
        store = self.store
        async with self.db_lock:
            try:
                reload = await anyio.to_thread.run_sync(
                    lambda: store.reload_schema(sql, allow_destructive=allow_destructive)
                )
            except SchemaError as exc:  # name the file, and the CLI flag
                raise for_operator(exc, paths) from None
            self._schema_reloaded(reload)
        applied = reload.applied
        if applied.changes:
            self._changed(applied.changes)
        done = list(reload.outcome.changes)
        if applied.applied or applied.emptied:
            done.append(
                f"applied {len(applied.applied) + applied.emptied} kept versions that waited for "
                "this schema"
            )
        return done

    def _schema_reloaded(self, reload: SchemaReload) -> None:
        """Install what a schema apply found (on the event loop) and say so in the logs."""
        for change in reload.outcome.changes:
            schema_log.info("schema applied: %s", change, extra={"fields": {"change": change}})
        if not reload.outcome.changes:
            schema_log.info("schema unchanged (%s)", _schema_sources(self.config))
        self.not_in_schema = list(reload.outcome.unlisted)
        for table in self.not_in_schema:
            schema_log.warning(
                "table %s is in the database but not in the schema files: left alone "
                "(corrosion reload --allow-destructive drops it)",
                table,
            )
        applied = reload.applied
        self.events.applied_versions += len(applied.applied) + applied.emptied
        self.pending_schema.applied(len(applied.applied) + applied.emptied)
        for actor, version, error in applied.rejected:
            schema_log.warning(
                "kept version %d of %s still cannot merge with this schema: %s",
                version,
                actor_hex(actor),
                error,
            )
        self.pending_schema.install(reload.pending)

    def members(self) -> list[MemberInfo]:
        """This node first (``is_self``), then every member it knows, with its SWIM state."""
        assert self.swim is not None and self.peer_addr is not None
        core = self.swim.core
        out = [
            MemberInfo(
                actor_hex(self.actor_id),
                format_addr(self.swim.address),
                format_addr(self.peer_addr),
                "left" if core.leaving else "alive",
                core.incarnation,
                is_self=True,
            )
        ]
        for m in sorted(self.swim.all_members(), key=lambda m: m.addr):
            info = decode_meta(m.meta)
            out.append(
                MemberInfo(
                    actor_hex(info[0]) if info else "",
                    format_addr(m.addr),
                    format_addr(peer_address(m.addr, info[1])) if info else None,
                    m.state.name.lower(),
                    m.incarnation,
                )
            )
        return out

    def alive_members(self) -> int:
        assert self.swim is not None
        return sum(1 for m in self.swim.members() if m.state == swim.State.ALIVE)

    def sync_state(self) -> dict[str, Any]:
        """This node's sync state as JSON (``corrosion sync generate``)."""
        assert self.store is not None
        state = self.store.bookie.sync_state()
        return {
            "actor_id": actor_hex(self.actor_id),
            "heads": {actor_hex(a): s["head"] for a, s in state.items()},
            "need": {
                actor_hex(a): [list(r) for r in s["gaps"]] for a, s in state.items() if s["gaps"]
            },
            "partial_need": {
                actor_hex(a): {
                    str(v): [
                        list(r)
                        for r in RangeSet(map(tuple, rs)).complement_within(
                            0, self.store.bookie.get(a).partials[v].last_seq
                        )
                    ]
                    for v, rs in s["partials"].items()
                }
                for a, s in state.items()
                if s["partials"]
            },
        }

    def gaps(self) -> int:
        assert self.store is not None
        return self.store.bookie.gap_count()

    def queue_size(self) -> int:
        assert self.replicator is not None
        return len(self.replicator.queue)

    async def wait_applied(self) -> None:
        """Wait until the next apply transaction that booked versions commits."""
        await self._applied.wait()

    # -- optional parts --------------------------------------------------------------------------

    async def _start_admin(self) -> None:
        from .admin import MAX_SOCKET_PATH, start_admin

        path = self.config.admin_socket()
        if self.config.admin_path is None and len(os.fsencode(path)) > MAX_SOCKET_PATH:
            # only the default can be too long (a given admin.path is checked at start-up)
            log.warning(
                "no admin socket: %s is longer than a socket path may be; set admin.path", path
            )
            return
        assert self._tg is not None  # started
        self._closers.append(await start_admin(self, self._tg, path))
        self.admin_path = path
        # where it is, wherever the cwd goes next (abspath reads the cwd: no I/O to wait for)
        self._admin_abspath = os.path.abspath(path)  # noqa: ASYNC240

    async def _start_api(self) -> None:
        from .api import serve_api

        assert self._tg is not None
        for host, port in self.config.api.addrs:
            with listening("api.addr", (host, port)):
                server, bound = await serve_api(self, self._tg, host, port)
            self._api_servers.append(server)
            self.api_addrs.append(bound)

    def extra_routes(self) -> list[Any]:
        """Routes served next to the API: the extensions' (the Machines API of an
        orchestrator)."""
        return [route for ext in self.extensions for route in ext.routes()]


def _schema_sources(config: Config) -> str:
    paths = [str(p) for p in config.db.schema_paths]
    return ", ".join(paths) if paths else "no schema_paths"


def _fetch(cursor: apsw.Cursor, n: int) -> list[tuple]:
    out = []
    for row in cursor:
        out.append(row)
        if len(out) >= n:
            break
    return out
