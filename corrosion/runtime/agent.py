"""The agent's runtime: a ``Store``, a ``Replicator`` and a ``swim.SwimNode`` on real sockets,
hosted in one anyio task group (asyncio, uvloop or trio). ``corrosion.Agent`` adds the servers
in front of it (HTTP API, admin socket, metrics); this class is the part that replicates.

Threads and locks: SQLite work runs in worker threads (``anyio.to_thread``), one at a time under
``db_lock`` (one writer connection). The event loop owns everything in memory — the replicator's
state, the store's bookkeeping, peer choice, timers: a worker thread reads it and returns what
it did, and the loop installs that (``Replicator.install_apply`` / ``install_commit``) before it
releases ``db_lock`` (corrosion/core/replication.py, rules O1-O3). Reads (``query``) use their
own read-only connections, in parallel with writes (WAL); only the pool of those connections is
shared with the threads (atomic list operations; corrosion/runtime/reads.py).

Its parts, one module each: ``peers`` (broadcast and sync streams), ``membership`` (the SWIM
bridge and the join loop), ``reads`` (queries), ``updates`` (update watches),
``swim.timers`` (the replicator's timers), ``subscriptions``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup

import swim
from crdt.errors import SchemaError
from crdt.schema import load_schema_paths
from swim.timers import TimerHeap

from ..addresses import Address, format_addr
from ..config import Config, ConfigError, gossip_security_error, security_warnings
from ..core.changeset import Changeset
from ..core.pending_schema import PendingSchema
from ..core.ranges import RangeSet
from ..core.replication import (
    Effect,
    ReplicationConfig,
    Replicator,
    SendFrame,
    SetTimer,
    StartSync,
)
from ..core.statements import parse_statements
from ..core.store import (
    ApplyResult,
    LocalCommit,
    SchemaReload,
    StatementError,
    StatementRefused,
    StatementTimeout,
    Store,
)
from .activity import ActivityLog, GossipWarnings
from .dblock import DatabaseLock
from .events import AgentEvents, Faults
from .extensions import AgentExtension, check_extensions
from .lag import LagWindow
from .listening import listening
from .membership import Membership
from .peers import PeerSecurity, PeerStreams
from .reads import Reads
from .results import (
    ExecResult,
    MemberInfo,
    QueryError,
    TransactionError,
    TransactionRefused,
    TransactionTimeout,
    UpdateWatch,
)
from .schema_errors import for_operator
from .schema_flow import SchemaFlow
from .spans import AgentSpans
from .subscriptions import Subscriptions
from .telemetry import Telemetry
from .tombstones import Reaper
from .tracing import TracingHandle, TracingSettings, resolve, start_tracing
from .transport import PEER_PREAMBLE
from .updates import UpdateWatchers

log = logging.getLogger("corrosion.agent")
schema_log = logging.getLogger("corrosion.schema")

_DEFAULT: Any = object()  # "the configured default" for a timeout argument


def _transaction_error(exc: StatementError) -> TransactionError:
    if isinstance(exc, StatementRefused):
        return TransactionRefused(exc.message, exc.index)
    if isinstance(exc, StatementTimeout):
        return TransactionTimeout(exc.message, exc.index)
    return TransactionError(exc.message, exc.index)


class AgentRuntime:
    def __init__(
        self,
        config: Config,
        *,
        seed: int | None = None,
        allow_destructive: bool = False,
        extensions: Sequence[AgentExtension] = (),
    ) -> None:
        self.config = config
        # hosted code of a higher layer (the orchestrator): see corrosion.runtime.extensions
        self.extensions = list(extensions)
        self._allow_destructive = allow_destructive  # at start: drop tables the schema lacks
        # versions kept until this node has their schema, and the tables in the database that
        # the schema files do not list (both for /v1/health); installed on the event loop
        self.pending_schema = PendingSchema(log)
        self.not_in_schema: list[str] = []
        self.schema = SchemaFlow(self)  # the cluster schema (corrosion.core.cluster_schema)
        self._seed = seed
        self.store: Store | None = None
        self.replicator: Replicator | None = None
        self.swim: swim.SwimNode | None = None
        self.peers: PeerStreams | None = None
        self.membership: Membership | None = None
        self.reaper: Reaper | None = None  # db.tombstone_gc
        self.db_lock = anyio.Lock()
        self.events = AgentEvents()
        self.lag = LagWindow()
        self.faults = Faults()
        # called with each ApplyResult that booked versions (benchmarks, subscriptions)
        self.apply_listeners: list[Any] = [self._count_applied]
        self.telemetry = Telemetry()  # counts for /metrics that nothing else keeps
        self.reads = Reads(config.db.path)
        self.updates = UpdateWatchers()
        self.subscriptions = Subscriptions(
            self.reads.connection,
            self.reads.release,
            timeout=config.api.query_timeout,
            directory=config.db.subscriptions_dir(),
            keep_changes=config.db.subscriptions_keep_changes,
        )
        self._tg: TaskGroup | None = None
        self._timers: TimerHeap[Any] = TimerHeap(self._now)
        self._apply_wake = anyio.Event()
        self._applied = anyio.Event()
        self._closing = anyio.Event()
        self.peer_addr: Address | None = None
        # bound by the servers in front of the runtime (corrosion.Agent), for the start-up line
        self.api_addrs: list[Address] = []
        self.metrics_addr: Address | None = None  # with telemetry.prometheus.addr
        self.admin_path: os.PathLike[str] | None = None  # where the admin socket listens
        self._admin_abspath: str | None = None
        self._started_at = 0.0
        self._db_lock_file: DatabaseLock | None = None
        self._closers: list[Any] = []  # async callables run first on close, last first
        self.activity = ActivityLog(config.log_summary_interval, self._now)
        # gossip no key here opens, joins no seed answers: a key mismatch must not be silent
        self.gossip_warnings = GossipWarnings(config.log_summary_interval, self._now)
        self._started = False
        self._tracing = TracingHandle(False)  # [telemetry] open-telemetry: see start()
        self.spans = AgentSpans(b"")  # made again with the actor id once the store is open

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> AgentRuntime:
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
        tracing_settings = resolve(cfg.open_telemetry)  # a bad OTEL_* value: ConfigError
        self._started_at = time.monotonic()
        self.config.db.path.parent.mkdir(parents=True, exist_ok=True)
        self._db_lock_file = DatabaseLock(cfg.db.path)
        self._db_lock_file.acquire()  # DatabaseInUse: another agent runs on this database
        try:
            await self._open(cfg, tracing_settings)
        except BaseException:
            await self.aclose()
            raise

    async def _open(self, cfg: Config, tracing_settings: TracingSettings | None) -> None:
        self.store = store = await anyio.to_thread.run_sync(Store, cfg.db.path)
        self._tracing = start_tracing(
            tracing_settings, "corrosion", instance_id=store.actor_id.hex()
        )
        self.spans = AgentSpans(store.actor_id)
        await self.schema.open(self._allow_destructive)
        # before anything can change the database: what changed while the agent was down is
        # then exactly the difference between each subscription's file and its query
        await self.subscriptions.restore()
        g = cfg.gossip
        security = PeerSecurity.from_config(g)
        rng = random.Random(self._seed)
        self.replicator = Replicator(
            store,
            ReplicationConfig(
                cluster_id=g.cluster_id,
                min_sync_backoff=cfg.perf.min_sync_backoff,
                max_sync_backoff=cfg.perf.max_sync_backoff,
                broadcast=cfg.perf.broadcast,
                broadcast_mode=g.broadcast,
            ),
            rng,
            lambda: int(time.time() * 1000),
        )
        swim_cfg = {
            "lan": swim.Config.lan,
            "wan": swim.Config.wan,
            "local": swim.Config.local,
        }[g.preset](label=f"corrosion/{g.cluster_id}")
        self.swim = swim.SwimNode(
            swim_cfg,
            host=g.addr[0],
            port=g.addr[1],
            advertise=g.external_addr,
            # peer port 0: peer streams share the gossip port (routed by their preamble)
            meta=self.schema.meta(),
            keyring=security.keyring,
            rng_seed=None if self._seed is None else rng.randrange(2**32),
        )
        self.faults.swim = self.swim
        self.swim.isolated = self.faults.isolated
        self.swim.on_dropped = self.gossip_warnings.dropped
        self._tg = tg = anyio.create_task_group()
        await tg.__aenter__()
        self.peers = PeerStreams(
            self.replicator,
            security,
            tg=tg,
            db_lock=self.db_lock,
            faults=self.faults,
            events=self.events,
            activity=self.activity,
            gossip_warnings=self.gossip_warnings,
            perform=self._perform,
            queued=self._wake_apply,
            now=self._now,
            spans=self.spans,
        )
        self.membership = Membership(
            self.swim, self.replicator, store, self.db_lock, self.gossip_warnings, self.spans
        )
        events = self.swim.subscribe(max_buffer=10_000)
        self.swim.route_streams(PEER_PREAMBLE, self.peers.serve)
        with listening("gossip.addr", g.addr):
            await tg.start(self.swim.serve)
        self.peer_addr = self.swim.address
        tg.start_soon(self.membership.follow, events)
        tg.start_soon(self._timers.run, self._fire)
        tg.start_soon(self._apply_loop)
        tg.start_soon(self.subscriptions.run)
        tg.start_soon(self._activity_loop)
        if cfg.db.tombstone_gc:
            self.reaper = Reaper(
                store,
                self.replicator,
                self.db_lock,
                cfg.db.tombstone_gc_interval,
                cfg.db.tombstone_gc_batch,
            )
            tg.start_soon(self.reaper.run)
        self._perform(self.replicator.start(self._now()))
        tg.start_soon(self.membership.join, list(g.bootstrap), self._closing)
        for ext in self.extensions:
            await ext.start(self, tg)
            self._closers.append(ext.close)
        await self._start_servers(tg)
        self._started = True
        for warning in security_warnings(cfg, self.swim.address, self.api_addrs):
            log.warning("%s", warning)  # once bound: with the ports port 0 became
        for ignored in cfg.ignored:
            log.warning("config: ignoring %s", ignored)
        log.info("agent started", extra={"fields": self._startup_fields()})

    async def _start_servers(self, tg: TaskGroup) -> None:
        """Start what serves this runtime to clients (``corrosion.Agent``: API, admin socket,
        metrics); they fill ``api_addrs``, ``admin_path``, ``metrics_addr`` and ``_closers``."""

    def _startup_fields(self) -> dict[str, Any]:
        """Everything this agent bound, for the start-up line."""
        assert self.swim is not None
        metrics = self.metrics_addr
        return {
            "actor_id": self.actor_id.hex(),
            "db_path": str(self.config.db.path),
            "gossip_addr": format_addr(self.swim.address),
            "api_addrs": [format_addr(a) for a in self.api_addrs],
            "admin_path": self._admin_abspath,
            "metrics_addr": format_addr(metrics) if metrics else None,
            "extensions": [ext.name for ext in self.extensions],
            "cluster_id": self.config.gossip.cluster_id,
            "broadcast": self.config.gossip.broadcast,
            "tombstone_gc": (
                f"every {self.config.db.tombstone_gc_interval:g}s"
                if self.config.db.tombstone_gc
                else None
            ),
        }

    async def aclose(self) -> None:
        """Leave the cluster gracefully, give queued broadcasts a moment to go out, stop."""
        if self._closing.is_set():
            return
        self._closing.set()
        # No cancel scope around these: an extension's task group was entered in start() and
        # must be exited at the same nesting level.
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                log.exception("closing %r", close)
        if self.swim is not None:
            with anyio.move_on_after(3), anyio.CancelScope(shield=True):
                try:
                    await self.swim.leave(timeout=2)
                except Exception:  # leaving is a courtesy; closing goes on
                    log.debug("leaving the cluster failed", exc_info=True)
        if self.peers is not None:
            with anyio.move_on_after(2, shield=True):
                await self.peers.drain()
        if self._tg is not None:
            # The task group was entered in start(); exit it at the same nesting level (no
            # extra cancel scope around this call), or anyio cannot unwind its scope.
            tg, self._tg = self._tg, None
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self.swim is not None:
            with anyio.CancelScope(shield=True):
                await self.swim.aclose()
        self.subscriptions.close()
        self.reads.close()
        if self.store is not None:
            store = self.store
            with anyio.CancelScope(shield=True):
                async with self.db_lock:
                    store.close()
        if self._db_lock_file is not None:
            self._db_lock_file.release()
        with anyio.CancelScope(shield=True):  # the spans of the last moments go out too
            await anyio.to_thread.run_sync(self._tracing.shutdown)
        if self._started:
            log.info("agent stopped")

    def _now(self) -> float:
        return time.monotonic()

    # -- effects and timers ----------------------------------------------------------------

    def _perform(self, effects: Sequence[Effect]) -> None:
        if self._tg is None or self.peers is None:
            return  # closing: nothing more goes out
        for eff in effects:
            if isinstance(eff, SendFrame):
                self.peers.send_frame(eff.addr, eff.data)
            elif isinstance(eff, StartSync):
                self._tg.start_soon(self.peers.run_sync, eff.addr, eff.request)
            elif isinstance(eff, SetTimer):
                self._timers.schedule(eff.at, eff.timer)

    async def _fire(self, timer: Any) -> None:
        assert self.replicator is not None
        self._perform(self.replicator.handle_timer(timer, self._now()))

    # -- applying ---------------------------------------------------------------------------

    def _wake_apply(self) -> None:
        self._apply_wake.set()

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
                                self.spans.applied(batch, result)
                        assert result is not None  # the apply returned (else it raised)
                        if result.kept:
                            self.pending_schema.kept(result.kept_missing)
                        if result.schema is not None:
                            self.schema.apply_result(result)
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

    def _count_applied(self, result: ApplyResult) -> None:
        self.telemetry.committed(
            result.changes, "remote", self.subscriptions.by_id.values(), result.tables
        )

    def _record_lag(self, batch: Sequence[Any], result: ApplyResult) -> None:
        stamps = {(it.actor, it.version): it.ts for it in batch if isinstance(it, Changeset)}
        self.lag.record_many(
            time.time(), [(stamps[key], key[0]) for key in result.applied if key in stamps]
        )

    def p99_lag(self) -> float:
        """Seconds between a version's commit at its origin and its apply here (p99, 120 s)."""
        return self.lag.p99(time.time())

    async def _activity_loop(self) -> None:
        """Every ``log.summary_interval``: the sync summary and the throttled repeats."""
        while True:
            await anyio.sleep(self.activity.interval)
            self.activity.tick()
            self.gossip_warnings.flush()

    def _changed(self, changes: Sequence[Any]) -> None:
        """Committed changes (local or applied): tell update watchers and subscriptions."""
        if len(self.updates):
            self.updates.notify(changes)
        if self.subscriptions.by_id:
            self.subscriptions.notify(changes)

    # -- writes -----------------------------------------------------------------------------

    async def execute(self, statements: Sequence[Any], *, timeout: Any = _DEFAULT) -> ExecResult:
        """Run statements (corrosion's four JSON forms, or ``(sql, params)``) in one
        transaction; raise ``TransactionError`` if any fails (nothing applied):
        ``TransactionRefused`` for what clients may not do (``corrosion.core.sqlguard``: DDL,
        ATTACH, internal or unreplicated tables...), ``TransactionTimeout`` when the statements
        run longer than ``timeout`` seconds (default ``api.transaction_timeout``; None or 0:
        none)."""
        t0 = time.perf_counter()
        results, commit = await self._commit(statements, timeout)
        return ExecResult(
            [{"rows_affected": r.rows_affected, "time": r.time} for r in results],
            time.perf_counter() - t0,
            commit.version if commit is not None else None,
            self.actor_id.hex(),
        )

    async def execute_commit(
        self, statements: Sequence[Any], *, timeout: Any = _DEFAULT
    ) -> LocalCommit | None:
        """Like ``execute`` but returns the booked commit (for publishers and tests)."""
        _results, commit = await self._commit(statements, timeout)
        return commit

    async def _commit(
        self, statements: Sequence[Any], timeout: Any
    ) -> tuple[list[Any], LocalCommit | None]:
        """Run one local transaction in a worker thread, book it on the loop before the lock is
        free, then broadcast it and tell watchers."""
        assert self.store is not None and self.replicator is not None
        parsed = parse_statements(statements)
        ts = self.replicator.hlc.now()
        store = self.store
        seconds = self.config.api.transaction_timeout if timeout is _DEFAULT else timeout
        with self.spans.transaction() as span:
            try:
                async with self.db_lock:
                    with anyio.CancelScope(shield=True):  # booked before the lock is free
                        results, commit = await anyio.to_thread.run_sync(
                            lambda: store.execute_local(parsed, ts, timeout=seconds)
                        )
                        trace = self.spans.committed(span, commit)
                        effects = self.replicator.install_commit(commit, self._now(), trace)
            except StatementError as exc:
                raise _transaction_error(exc) from None
            self._perform(effects)
            self.spans.broadcast(span, commit, effects)
        if commit is not None:
            self._changed(commit.changes)
            self.activity.local_commit()
            self.telemetry.committed(commit.changes, "local", self.subscriptions.by_id.values())
        return results, commit

    # -- reads ------------------------------------------------------------------------------

    def is_replicated(self, table: str) -> bool:
        return self.reads.is_replicated(table)

    def watch_updates(self, table: str, *, buffer: int = 10_240) -> UpdateWatch:
        """Start watching ``table`` now; iterate the returned object for ``(kind, pk_values)``
        of every row changed from now on (local writes and applied remote versions), and close
        it when done. Raises QueryError for a table that is not a CRR."""
        if not self.is_replicated(table):
            raise QueryError(f"no such replicated table: {table}")
        return self.updates.watch(table, buffer)

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
        interruptible: bool = False,
        encode: Callable[[list[tuple], int], bytes] | None = None,
    ) -> AsyncIterator[tuple[str, Any]]:
        """``("columns", [...])`` then ``("rows", [tuple, ...])`` batches; raises
        ``QueryError`` (before the columns for refused or invalid statements), ``QueryTimeout``
        once the query has run ``timeout`` seconds (default ``api.query_timeout``; None or 0:
        no limit), reading rows included. ``interruptible``: cancelling the iterating task
        stops the running statement at once. ``encode``: see ``Reads.stream``."""
        seconds = self.config.api.query_timeout if timeout is _DEFAULT else timeout
        stream = self.reads.stream(
            sql, params, batch=batch, seconds=seconds, interruptible=interruptible, encode=encode
        )
        async for item in stream:
            yield item

    async def describe(self, sql: str) -> list[tuple[str, str | None]] | None:
        """The columns (name, declared type) a read-only statement would return, without
        running it; None for a statement that writes (``Reads.describe``)."""
        return await self.reads.describe(sql)

    # -- schema -----------------------------------------------------------------------------

    async def reload_schema(self, *, allow_destructive: bool = False) -> list[str]:
        """Apply ``db.schema_paths`` again (``corrosion reload``), re-read from the config file
        when the agent was started from one, so an edited list takes effect; return what
        changed. Tables the files do not list are kept unless ``allow_destructive``."""
        paths = self.config.db.schema_paths
        if self.config.source is not None:
            fresh = await anyio.to_thread.run_sync(Config.load, self.config.source)
            paths = fresh.db.schema_paths
        if self.schema.follow:
            done = await self.schema.reload_files(paths, allow_destructive)
        else:
            done = await self._apply_schema_files(paths, allow_destructive)
            self.schema.check_drift(paths)
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
        if reload.outcome.changes:  # rows can change with no change reported (a new column)
            self.subscriptions.rerun_all()
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
                actor.hex(),
                error,
            )
        self.pending_schema.install(reload.pending)

    # -- state, for health, metrics and the admin socket --------------------------------------

    def members(self) -> list[MemberInfo]:
        """This node first (``is_self``), then every member it knows, with its SWIM state."""
        assert self.membership is not None and self.peer_addr is not None
        out = self.membership.members(self.actor_id, self.peer_addr)
        runs = self.schema.status.running
        if runs.version:
            out[0] = dataclasses.replace(out[0], schema_version=runs.version, schema_hash=runs.hash)
        return out

    def alive_members(self) -> int:
        assert self.membership is not None
        return self.membership.alive()

    def sync_state(self) -> dict[str, Any]:
        """This node's sync state as JSON (``corrosion sync generate``)."""
        assert self.store is not None
        bookie = self.store.bookie
        state = bookie.sync_state()
        return {
            "actor_id": self.actor_id.hex(),
            "heads": {a.hex(): s["head"] for a, s in state.items()},
            "need": {a.hex(): [list(r) for r in s["gaps"]] for a, s in state.items() if s["gaps"]},
            "partial_need": {
                a.hex(): {
                    str(v): [
                        list(r)
                        for r in RangeSet(map(tuple, rs)).complement_within(
                            0, bookie.get(a).partials[v].last_seq
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

    def extra_routes(self) -> list[Any]:
        """Routes served next to the API: the extensions' (the Machines API of an
        orchestrator)."""
        return [route for ext in self.extensions for route in ext.routes()]


def _schema_sources(config: Config) -> str:
    paths = [str(p) for p in config.db.schema_paths]
    return ", ".join(paths) if paths else "no schema_paths"
