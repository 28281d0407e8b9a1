"""Subscriptions (live queries): a query's rows, then every change to them, as corrosion's
``/v1/subscriptions`` streams them.

A subscription runs its query once, remembers the rows (each with a ``rowid`` of its own), and
re-runs the query whenever a committed change — a local transaction or an applied remote version —
touches a table the query reads; the difference becomes ``insert`` / ``update`` / ``delete``
events, each with an increasing ``change_id``. The same SQL (after ``normalize_sql``: comments,
spacing and keyword case do not count) with the same parameters shares one subscription, however
many clients listen; its ``hash`` (the ``corro-query-hash`` header) is a digest of that
normalised SQL and parameters, so clients can recognise the same query across agents and
restarts, as corrosion's is.

Row identity: when the result carries the full primary key of every table the query reads
(found through SQLite's column-origin metadata), and reads each table once, a row is identified
by those keys, so a changed row is an ``update`` of the same rowid. Otherwise rows are
identified by their content, and a changed row is a ``delete`` followed by an ``insert``.

Re-evaluation (at once after a quiet spell; the changes of a burst gathered for a few
milliseconds and evaluated together) is incremental where that is sound
(``subscription_plan``: a plain SELECT over inner-joined tables): the agent passes the primary
keys each commit touched, and only the result rows holding one of them are recomputed, found
through hidden key columns added to the query. Other shapes (aggregates, subqueries,
outer joins, LIMIT...) run the whole query again and diff it. Both paths turn a batch into the
same events (deletes, then updates, by row id; then inserts in the order of their values), so
which one ran does not show. The last ``db.subscriptions_keep_changes`` events are kept so a
client can resume with ``from=<change_id>``; an older id is refused (400), as corrosion does.

Durable: each subscription lives in its own SQLite file under ``db.subscriptions_path``
(``subscription_files``), written before its clients see a change. At start-up, before anything
can change the database, every file is read back, the query re-run and diffed against the rows
kept, so what changed while the agent was down becomes ordinary changes with the next ids: a
client resumes with the same subscription id, change ids and row ids. A file that cannot be
used is logged (one warning) and removed.

Concurrency: the event loop owns every ``Subscription``; a worker thread runs the query and
writes the file. A subscription's ``lock`` is held from a diff until its changes are on disk and
sent, so a client attaching meanwhile sees either all of them in its snapshot or none.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import apsw

import crdt

from ..config import ConfigError
from ..core.sqlguard import NOT_READONLY, Deadline, guard_of
from ..errors import CorrosionError
from .dblock import DatabaseInUse, DatabaseLock
from .subscription_files import (
    FILE_NAME,
    StoredSubscription,
    SubscriptionFile,
    SubscriptionFileError,
    directory_of,
    remove_directory,
    subscription_dirs,
)
from .subscription_plan import TOKEN, Inspected, Plan, plan_for, unguarded

log = logging.getLogger("corrosion.subscriptions")

KEEP_CHANGES = 500  # db.subscriptions_keep_changes' default (corrosion keeps 500)
DEBOUNCE = 0.02  # seconds: changes closer together than this are evaluated together
SLICE_LIMIT = 2000  # changed rows at most re-evaluated by primary key (more: the full re-run)
IDLE_EXPIRY = 600.0  # a subscription without listeners this long is dropped (as corrosion)


def normalize_sql(sql: str) -> str:
    """One spelling of a statement: comments and trailing ``;`` dropped, spacing reduced to one
    space between two words (names, keywords, numbers, quoted text) and none around punctuation.
    Nothing else changes: not even keyword case, which shows in the column names of unaliased
    expressions (``SELECT a AND b``), so two spellings that share a subscription answer alike."""
    out: list[str] = []
    separated = False
    for match in TOKEN.finditer(sql):
        tok = match.group()
        if tok.isspace() or tok.startswith(("--", "/*")):
            separated = True
            continue
        if separated and out and _is_word(out[-1]) and _is_word(tok):
            out.append(" ")
        out.append(tok)
        separated = False
    while out and out[-1] in (";", " "):
        out.pop()
    return "".join(out)


def _is_word(token: str) -> bool:
    return len(token) > 1 or token.isalnum() or token in "_$'\"`["


def query_hash(normalized_sql: str, params: Any) -> str:
    """The ``corro-query-hash`` of a query: the same normalised SQL and parameters, the same
    hash."""
    h = hashlib.sha256(normalized_sql.encode())
    if params:
        h.update(b"\0" + repr(params).encode())
    return h.hexdigest()[:32]


class ColumnsChanged(CorrosionError):
    """The query's columns are no longer those the subscription has (``SELECT *`` after a
    schema change added a column): its rows cannot be diffed any more."""


def _fetch(sub: Subscription, cursor: apsw.Cursor) -> list[tuple]:
    """The rows of a run of ``sub``'s query (``ColumnsChanged`` if they do not fit it)."""
    expected = len(sub.columns)
    if sub.plan is not None:
        expected += sum(len(source.pk) for source in sub.plan.sources)
    rows = cursor.fetchall()
    if rows and len(rows[0]) != expected:  # no rows: nothing to misread
        raise ColumnsChanged(f"its query now has {len(rows[0]) - expected:+d} column(s)")
    return rows


def _slice_limit(sub: Subscription) -> int:
    """How many changed rows a subscription re-evaluates by primary key before the full
    re-run costs less."""
    return min(SLICE_LIMIT, max(64, len(sub.rows) // 4))


class SubscriptionError(CorrosionError):
    """The query cannot be subscribed to, or a resume point is gone."""


class SubscriptionGone(SubscriptionError):
    """The subscription was removed (idle, or its file could not be written)."""


class SubscriptionStorageError(SubscriptionError):
    """The subscription's file cannot be written (the agent's problem, not the client's)."""


@dataclass
class Event:
    kind: str  # "insert" | "update" | "delete"
    rowid: int
    row: tuple
    change_id: int

    def to_json(self) -> dict[str, Any]:
        return {"change": [self.kind, self.rowid, list(self.row), self.change_id]}


@dataclass
class Snapshot:
    columns: list[str]
    rows: list[tuple[int, tuple]]
    change_id: int


@dataclass
class Described:
    """What a subscription's query is, found by preparing it."""

    columns: list[str]
    tables: set[str]  # the tables it reads
    identity: list[int] | None  # the columns of every table's primary key (None: content)
    plan: Plan | None  # how to re-evaluate it incrementally (None: the full re-run)
    full_rerun: str = ""  # why it has no plan


def describe(conn: apsw.Connection, sql: str, params: Any) -> Described:
    """Columns, tables read, how to identify a row, and whether it can be re-evaluated
    incrementally. Raises SubscriptionError for writes or invalid SQL."""
    tables: set[str] = set()
    info: dict[str, Any] = {}
    seen = Inspected(functions=set(), tables=tables)
    guard = guard_of(conn)  # the agent's readers check clients' SQL (sqlguard)

    def authorizer(op: int, p1: str | None, p2: str | None, db: str | None, t: Any) -> int:
        # a table read for no column (count(*)) is reported with no column and no database
        if op == apsw.SQLITE_READ and p1 and (db == "main" or (db is None and not p2)):
            tables.add(p1)
        elif op == apsw.SQLITE_READ and p1:  # another database's (temp): no plan
            seen.selects += 100
        elif op == apsw.SQLITE_SELECT:
            seen.selects += 1
        elif op == apsw.SQLITE_FUNCTION and p2:
            assert seen.functions is not None
            seen.functions.add(p2)
        elif op == apsw.SQLITE_RECURSIVE:
            seen.selects += 100
        return guard(op, p1, p2, db, t) if guard is not None else apsw.SQLITE_OK

    def trace(cur: apsw.Cursor, _sql: str, _bindings: Any) -> bool:
        info["full"] = cur.description_full
        info["readonly"] = cur.is_readonly
        return False  # describe only: do not run it

    conn.authorizer = authorizer
    cursor = conn.cursor()
    cursor.exec_trace = trace
    if guard is not None:
        guard.statement(cursor)
    try:
        cursor.execute(sql, params, can_cache=False)
    except apsw.ExecTraceAbort:
        pass
    except apsw.Error as exc:
        refused = guard.refused(exc) if guard is not None else None
        raise SubscriptionError(refused.message if refused else str(exc)) from None
    finally:
        conn.authorizer = guard
        cursor.exec_trace = None
    if not info.get("readonly", False):
        raise SubscriptionError(NOT_READONLY)
    full = info["full"]
    columns = [d[0] for d in full]
    identity: list[int] | None = []
    for table in sorted(tables):
        pks = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", (table,)
            )
        ]
        if not pks:
            identity = None
            break
        for pk in pks:
            where = [i for i, d in enumerate(full) if d[3] == table and d[4] == pk]
            if not where:
                identity = None
                break
            assert identity is not None  # mypy loses the narrowing across the nested loop
            identity.append(where[0])
        if identity is None:
            break
    with unguarded(conn):
        if identity and _loops(conn, sql, params) > len(tables):
            identity = None  # a table read twice (a self-join, UNION ALL): keys repeat
        plan = plan_for(conn, sql, params, full, seen)
    if isinstance(plan, str):
        return Described(columns, tables, identity or None, None, plan)
    return Described(columns, tables, identity or None, plan)


def _loops(conn: apsw.Connection, sql: str, params: Any) -> int:
    """How many times the query's plan reads a table (SQLite's EXPLAIN QUERY PLAN): one per
    FROM item, but for the indexes of an OR and the rows of a VALUES list or constant."""
    plan = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    details = {row[0]: str(row[3]) for row in plan}
    return sum(
        1
        for _id, parent, _, detail in plan
        if str(detail) == "MULTI-INDEX OR"
        or (
            str(detail).startswith(("SCAN ", "SEARCH "))
            and not re.match(r"SCAN (CONSTANT ROW|\d+-ROW VALUES CLAUSE)", str(detail))
            and not details.get(parent, "").startswith("INDEX ")
        )
    )


@dataclass
class Subscription:
    id: str
    sql: str
    params: Any
    columns: list[str]
    tables: set[str]
    identity: list[int] | None
    hash: str = ""  # query_hash of the normalised SQL and parameters
    rows: dict[int, tuple] = field(default_factory=dict)  # rowid -> row
    keys: dict[Any, list[int]] = field(default_factory=dict)  # identity -> rowids
    change_id: int = 0
    next_rowid: int = 1
    keep_changes: int = KEEP_CHANGES  # the recent changes kept for clients to resume from
    changes: deque[Event] = field(default_factory=deque)
    listeners: list[Any] = field(default_factory=list)  # memory-object send streams
    dirty: bool = False  # the whole query must run again
    idle_since: float = field(default_factory=time.monotonic)
    file: SubscriptionFile | None = None  # where it is kept (None: in memory only)
    lock: Any = None  # anyio.Lock, made on the event loop when the subscription is registered
    plan: Plan | None = None  # incremental re-evaluation (None: the full re-run)
    full_rerun: str = ""  # why it has no plan (for operators)
    dropped: str = ""  # why it was dropped, told to the clients whose streams it ended
    # with a plan: the primary keys (packed, by table) changed since the last evaluation
    pending: dict[str, set[bytes]] = field(default_factory=dict)
    # with a plan: the result by hidden key, and the hidden keys by each source's primary key
    # and by row identity (what finds the rows a change touched)
    members: dict[tuple, tuple] = field(default_factory=dict)
    by_source: list[dict[tuple, set[tuple]]] = field(default_factory=list)
    by_key: dict[Any, set[tuple]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.changes = deque(self.changes, maxlen=self.keep_changes)
        if self.plan is not None:
            self.by_source = [{} for _ in self.plan.sources]

    @property
    def query(self) -> str:
        """The statement whose rows this subscription keeps (with a plan: its hidden keys
        after the client's columns)."""
        return self.plan.sql if self.plan is not None else self.sql

    def key_of(self, row: tuple) -> Any:
        if self.identity is None:
            return row
        return tuple(row[i] for i in self.identity)

    def load(self, rows: Sequence[tuple]) -> None:
        """The query's first result (``query``'s rows), row ids in its order."""
        for row in self._remember(rows):
            rowid = self.next_rowid
            self.next_rowid += 1
            self.rows[rowid] = row
            self.keys.setdefault(self.key_of(row), []).append(rowid)

    def restore(self, rows: Iterable[tuple[int, tuple]]) -> None:
        """Take back rows kept in the subscription's file, with their row ids (a ``diff``
        with the query's current result follows)."""
        for rowid, row in rows:
            self.rows[rowid] = row
            self.keys.setdefault(self.key_of(row), []).append(rowid)

    def diff(self, new_rows: Sequence[tuple]) -> list[Event]:
        """Turn the query's whole new result (``query``'s rows) into events, updating the
        remembered rows."""
        if self.plan is not None:
            self.members.clear()
            self.by_key.clear()
            self.by_source = [{} for _ in self.plan.sources]
        wanted: dict[Any, list[tuple]] = {key: [] for key in self.keys}
        for row in self._remember(new_rows):
            wanted.setdefault(self.key_of(row), []).append(row)
        return self._settle(wanted)

    def patch(
        self, touched: Sequence[tuple[int, Sequence[tuple]]], rows: Sequence[tuple]
    ) -> list[Event]:
        """Incremental ``diff``: ``touched`` (source index, primary keys) changed, and ``rows``
        are every result row holding one of them now (the plan's ``restricted`` queries). The
        rows that held one of them before are found by their hidden key; all others are as
        they were."""
        assert self.plan is not None
        width = self.plan.width
        gone: set[tuple] = set()
        for source, pks in touched:
            index = self.by_source[source]
            for pk in pks:
                gone |= index.get(pk, set())
        fresh = {row[width:]: row[:width] for row in rows}
        gone.update(h for h in fresh if h in self.members)  # returned again (collation...)
        affected: dict[Any, None] = {}
        for hidden in gone:
            affected[self.key_of(self._forget_member(hidden))] = None
        for hidden, row in fresh.items():
            self._add_member(hidden, row)
            affected[self.key_of(row)] = None
        wanted = {key: [self.members[h] for h in self.by_key.get(key, ())] for key in affected}
        return self._settle(wanted)

    def _remember(self, rows: Sequence[tuple]) -> Iterable[tuple]:
        """The client's part of each row; with a plan, each row is also kept by hidden key."""
        if self.plan is None:
            yield from rows
            return
        width = self.plan.width
        for row in rows:
            visible = row[:width]
            self._add_member(row[width:], visible)
            yield visible

    def _add_member(self, hidden: tuple, row: tuple) -> None:
        assert self.plan is not None
        self.members[hidden] = row
        for source, index in zip(self.plan.sources, self.by_source, strict=True):
            index.setdefault(tuple(hidden[i] for i in source.hidden), set()).add(hidden)
        self.by_key.setdefault(self.key_of(row), set()).add(hidden)

    def _forget_member(self, hidden: tuple) -> tuple:
        assert self.plan is not None
        row = self.members.pop(hidden)
        for source, index in zip(self.plan.sources, self.by_source, strict=True):
            pk = tuple(hidden[i] for i in source.hidden)
            held = index[pk]
            held.discard(hidden)
            if not held:
                del index[pk]
        key = self.key_of(row)
        same = self.by_key[key]
        same.discard(hidden)
        if not same:
            del self.by_key[key]
        return row

    def _settle(self, wanted: dict[Any, list[tuple]]) -> list[Event]:
        """Events that make the rows of each key of ``wanted`` its list of rows: deletes by
        row id, then updates by row id, then inserts in the order of their values, so that a
        full re-run and an incremental one turn the same change into the same events."""
        deleted: list[int] = []
        updated: list[tuple[int, tuple]] = []
        inserted: list[tuple[Any, tuple]] = []
        for key, rows in wanted.items():
            rowids = self.keys.get(key, [])
            if self.identity is None:
                if len(rows) > 1:
                    rows.sort(key=_order)  # the same content, told apart by type (1, 1.0)
                surplus = len(rowids) - len(rows)
                if surplus > 0:
                    deleted += rowids[-surplus:]
                    del rowids[-surplus:]
                inserted += [(key, row) for row in rows[len(rowids) :]]
            elif not rows:
                deleted += rowids
                rowids = []
            elif rowids:
                row, old = rows[0], self.rows[rowids[0]]
                if old != row or _types(old) != _types(row):
                    updated.append((rowids[0], row))
            else:
                inserted.append((key, rows[0]))
            if not rowids:
                self.keys.pop(key, None)
        events = [self._event("delete", rowid, self.rows.pop(rowid)) for rowid in sorted(deleted)]
        for rowid, row in sorted(updated, key=lambda u: u[0]):
            self.rows[rowid] = row
            events.append(self._event("update", rowid, row))
        for key, row in sorted(inserted, key=lambda i: (_order(i[0]), _order(i[1]))):
            rowid = self.next_rowid
            self.next_rowid += 1
            self.rows[rowid] = row
            self.keys.setdefault(key, []).append(rowid)
            events.append(self._event("insert", rowid, row))
        return events

    def _event(self, kind: str, rowid: int, row: tuple) -> Event:
        self.change_id += 1
        event = Event(kind, rowid, row, self.change_id)
        self.changes.append(event)
        return event

    def snapshot(self) -> Snapshot:
        return Snapshot(self.columns, sorted(self.rows.items()), self.change_id)

    def since(self, change_id: int) -> list[Event]:
        """The changes after ``change_id``; ``SubscriptionError`` if some of them are no
        longer kept, or ``change_id`` has not happened."""
        if change_id > self.change_id:
            raise SubscriptionError(
                f"change {change_id} has not happened yet (the last is {self.change_id})"
            )
        if change_id == self.change_id:
            return []
        oldest = self.changes[0].change_id if self.changes else self.change_id + 1
        if oldest > change_id + 1:
            raise SubscriptionError(
                f"cannot resume from change {change_id}: changes {change_id + 1} to "
                f"{oldest - 1} were purged "
                f"(this subscription keeps its last {self.keep_changes}, "
                f"db.subscriptions_keep_changes; the oldest kept is {oldest}); "
                "subscribe with from=0 for a fresh snapshot"
            )
        return [e for e in self.changes if e.change_id > change_id]


def _types(row: tuple) -> tuple:
    return tuple(map(type, row))


def _order(values: tuple) -> tuple:
    """A total order of rows of SQLite values (NULL, numbers, text, blobs; an integer before
    the equal real): the order of a batch's inserts."""
    return tuple(
        (0, 0, False)
        if v is None
        else (1, v, isinstance(v, float))
        if isinstance(v, int | float)
        else (2, v, False)
        if isinstance(v, str)
        else (3, v, False)
        for v in values
    )


@dataclass
class Attached:
    """A client's view of a subscription: what to send first, then the live changes."""

    snapshot: Snapshot | None  # columns, rows, eoq (None: send none of them)
    backlog: list[Event]  # the changes after the client's ``from``
    receive: Any  # memory-object receive stream of the next changes
    close: Callable[[], None]
    sub: Subscription

    def ended(self) -> str:
        """Why ``receive`` ended: the subscription was dropped, or this client was cut off
        for reading too slowly (it can resume with ``from``)."""
        return self.sub.dropped or "subscriber fell too far behind"


class Subscriptions:
    """The agent's live queries, re-evaluated off the event loop on a read connection, each
    kept in its own file under ``directory`` (None: in memory only)."""

    def __init__(
        self,
        open_reader: Any,
        release_reader: Any,
        *,
        timeout: float | None = None,
        directory: Path | None = None,
        keep_changes: int = KEEP_CHANGES,
        incremental: bool = True,
    ) -> None:
        self._open = open_reader
        self._release = release_reader
        self.timeout = timeout  # seconds a run of a subscription's query may take (None: any)
        self.directory = directory
        self.keep_changes = keep_changes
        self.incremental = incremental  # False: every query re-runs whole (tests, benchmarks)
        self.by_id: dict[str, Subscription] = {}
        self._by_query: dict[tuple[str, str], str] = {}
        self._building: dict[tuple[str, str], anyio.Event] = {}
        self._wake = anyio.Event()
        self._directory_lock: DatabaseLock | None = None

    def tables(self) -> set[str]:
        out: set[str] = set()
        for sub in self.by_id.values():
            out |= sub.tables
        return out

    # -- start-up ---------------------------------------------------------------------------

    async def restore(self) -> None:
        """At start-up, before anything can change the database: read every subscription file
        back and bring it up to date (re-run, diff, append the changes). A file that cannot
        be used is logged and removed; it never stops the agent."""
        if self.directory is None:
            return
        await anyio.to_thread.run_sync(self._take_directory)
        restored = changes = 0
        for directory in await anyio.to_thread.run_sync(subscription_dirs, self.directory):
            try:
                sub, caught_up = await anyio.to_thread.run_sync(self._restore_one, directory)
            except SubscriptionFileError as exc:
                log.warning("subscription file %s dropped: %s", directory / FILE_NAME, exc)
                await anyio.to_thread.run_sync(remove_directory, directory)
                continue
            self._register(sub)
            restored += 1
            changes += caught_up
        if restored:
            log.info(
                "restored %d subscription(s); %d change(s) while the agent was down",
                restored,
                changes,
            )

    def _take_directory(self) -> None:
        assert self.directory is not None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"db.subscriptions_path: cannot create {str(self.directory)!r}: "
                f"{exc.strerror or exc}"
            ) from None
        lock = DatabaseLock(self.directory / "agent")  # flock on <dir>/agent.lock
        try:
            lock.acquire()
        except DatabaseInUse:
            raise ConfigError(
                f"db.subscriptions_path: {str(self.directory)!r} is in use by another running "
                "agent: give each agent its own"
            ) from None
        self._directory_lock = lock

    def _restore_one(self, directory: Path) -> tuple[Subscription, int]:
        file, stored = SubscriptionFile.open(directory, self.keep_changes)
        try:
            return self._catch_up(file, stored)
        except BaseException:
            file.close()
            raise

    def _catch_up(
        self, file: SubscriptionFile, stored: StoredSubscription
    ) -> tuple[Subscription, int]:
        conn = self._open()
        try:
            try:
                described = describe(conn, stored.sql, stored.params)
            except SubscriptionError as exc:
                raise SubscriptionFileError(f"its query no longer runs: {exc}") from None
            if described.columns != stored.columns:
                raise SubscriptionFileError(
                    f"its query's columns changed from {stored.columns} to {described.columns}"
                )
            sub = Subscription(
                stored.id,
                stored.sql,
                stored.params,
                described.columns,
                described.tables,
                described.identity,
                plan=described.plan if self.incremental else None,
                full_rerun=described.full_rerun if self.incremental else "disabled",
                hash=stored.hash,
                change_id=stored.change_id,
                next_rowid=stored.next_rowid,
                keep_changes=self.keep_changes,
                changes=deque(Event(c.kind, c.rowid, c.row, c.change_id) for c in stored.changes),
                file=file,
            )
            sub.restore(stored.rows)
            try:
                with Deadline(conn, self.timeout), unguarded(conn):
                    rows = conn.execute(sub.query, sub.params).fetchall()
            except apsw.Error as exc:
                log.warning("subscription %s: its query failed at start-up (%s)", sub.id, exc)
                sub.dirty = True  # run again with the first change
                return sub, 0
        finally:
            self._release(conn)
        events = sub.diff(rows)
        file.append(events, sub.next_rowid, self.keep_changes)
        return sub, len(events)

    def _register(self, sub: Subscription) -> None:
        sub.lock = anyio.Lock()
        self.by_id[sub.id] = sub
        self._by_query[(normalize_sql(sub.sql), repr(sub.params))] = sub.id
        if sub.dirty:
            self._wake.set()

    # -- clients ----------------------------------------------------------------------------

    async def get_or_create(self, sql: str, params: Any) -> tuple[Subscription, bool]:
        """The subscription of this query (the same normalised SQL and parameters), and
        whether it was created by this call."""
        normalized = normalize_sql(sql)
        qkey = (normalized, repr(params))
        while True:
            sid = self._by_query.get(qkey)
            if sid is not None and sid in self.by_id:
                return self.by_id[sid], False
            building = self._building.get(qkey)
            if building is None:
                break
            await building.wait()  # the same query, being created by another client

        self._building[qkey] = built = anyio.Event()
        try:
            # shielded: a client that goes away must not leave a file without its subscription
            with anyio.CancelScope(shield=True):
                sub = await anyio.to_thread.run_sync(self.build, sql, params)
                self._register(sub)
        finally:
            del self._building[qkey]
            built.set()
        return sub, True

    def build(self, sql: str, params: Any) -> Subscription:
        """A new subscription of ``sql``: described, run once, and (with a ``directory``)
        written to its file. Blocking: the agent runs it in a worker thread; a host without
        threads (the simulator) calls it directly. Not registered: see ``get_or_create``."""
        normalized = normalize_sql(sql)
        conn = self._open()
        try:
            described = describe(conn, sql, params)
            sub = Subscription(
                str(uuid.uuid4()),
                sql,
                params,
                described.columns,
                described.tables,
                described.identity,
                plan=described.plan if self.incremental else None,
                full_rerun=described.full_rerun if self.incremental else "disabled",
                hash=query_hash(normalized, params),
                keep_changes=self.keep_changes,
            )
            if described.plan is None:
                log.debug("subscription %s: full re-runs (%s)", sub.id, described.full_rerun)
            with Deadline(conn, self.timeout) as deadline:
                try:
                    with unguarded(conn):  # checked by describe; the plan's rewrite too
                        sub.load(conn.execute(sub.query, params).fetchall())
                except apsw.Error:
                    if deadline.expired:
                        raise SubscriptionError(
                            deadline.message("the query", "api.query_timeout sets it")
                        ) from None
                    raise
        except apsw.Error as exc:
            raise SubscriptionError(str(exc)) from None
        finally:
            self._release(conn)
        if self.directory is not None:
            sub.file = self._create_file(sub, normalized)
        return sub

    def _create_file(self, sub: Subscription, normalized: str) -> SubscriptionFile:
        assert self.directory is not None
        directory = directory_of(self.directory, sub.id)
        try:
            return SubscriptionFile.create(
                directory,
                sid=sub.id,
                sql=sub.sql,
                normalized=normalized,
                params=sub.params,
                hash=sub.hash,
                columns=sub.columns,
                rows=sub.rows.items(),
                next_rowid=sub.next_rowid,
            )
        except (OSError, apsw.Error) as exc:
            raise SubscriptionStorageError(
                f"cannot write the subscription's file in {str(directory)!r}: {exc}"
            ) from None

    async def attach(self, sub: Subscription, from_id: int | None, skip_rows: bool) -> Attached:
        """A new listener of ``sub``: from a fresh snapshot (``from_id`` None or 0; none with
        ``skip_rows``: only the changes from now on) or after change ``from_id``. Raises
        ``SubscriptionError`` if those changes are not kept."""
        async with sub.lock:  # no batch of changes half sent while this client attaches
            if self.by_id.get(sub.id) is not sub:  # dropped meanwhile
                raise SubscriptionGone(f"could not find subscription with id {sub.id}")
            if from_id:
                backlog, snapshot = sub.since(from_id), None
            else:
                backlog, snapshot = [], None if skip_rows else sub.snapshot()
            receive, close = self.listen(sub)
        return Attached(snapshot, backlog, receive, close, sub)

    def listen(self, sub: Subscription, buffer: int = 10_240) -> Any:
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        sub.listeners.append(send)

        def close() -> None:
            if send in sub.listeners:
                sub.listeners.remove(send)
            if not sub.listeners:
                sub.idle_since = time.monotonic()
            send.close()

        return receive, close

    # -- changes ----------------------------------------------------------------------------

    def notify(self, changes: Iterable[Any]) -> None:
        """Committed changes (crdt.ChangeRow: table and packed pk first): note, for each
        subscription reading a table they touched, which rows to re-evaluate."""
        by_table: dict[str, set[bytes]] = {}
        for table, pk, *_ in changes:
            by_table.setdefault(table, set()).add(pk)
        hit = False
        for sub in self.by_id.values():
            touched = sub.tables & by_table.keys()
            if not touched:
                continue
            hit = True
            if sub.plan is None or sub.dirty:
                sub.dirty = True
                continue
            for table in touched:
                sub.pending.setdefault(table, set()).update(by_table[table])
            if sum(map(len, sub.pending.values())) > _slice_limit(sub):
                sub.dirty = True  # so many rows: the whole query costs less
                sub.pending.clear()
        if hit:
            self._wake.set()

    def rerun_all(self) -> None:
        """The schema changed: every query runs whole again (rows may have changed with no
        change to name them, and a plan's columns may be gone)."""
        for sub in self.by_id.values():
            sub.dirty = True
            sub.pending.clear()
        if self.by_id:
            self._wake.set()

    async def run(self) -> None:
        """Re-evaluate dirty subscriptions (debounced) and fan their events out; drop idle ones."""
        last = -DEBOUNCE
        while True:
            with anyio.move_on_after(60):
                await self._wake.wait()
            self._wake = anyio.Event()
            # the first change after a quiet spell goes out at once; those of a burst gather
            quiet = time.monotonic() - last
            if quiet < DEBOUNCE:
                await anyio.sleep(DEBOUNCE - quiet)
            now = time.monotonic()
            for sub in list(self.by_id.values()):
                if not sub.listeners and now - sub.idle_since > IDLE_EXPIRY:
                    await self.drop(sub.id)
                    continue
                await self.evaluate(sub)
            last = time.monotonic()

    async def evaluate(self, sub: Subscription) -> None:
        """Bring ``sub`` up to date with the changes noted: the full re-run when ``dirty``,
        else the rows of the changed primary keys."""
        try:
            if sub.dirty:
                sub.dirty = False
                sub.pending = {}
                rows = await anyio.to_thread.run_sync(self.rerun_rows, sub)
                if rows is not None and self.by_id.get(sub.id) is sub:
                    await self._publish(sub, partial(sub.diff, rows))
            elif sub.pending:
                pending, sub.pending = sub.pending, {}
                sliced = await anyio.to_thread.run_sync(self.slice_rows, sub, pending)
                if sliced is None:
                    sub.dirty = True  # the restricted queries failed: run it all
                    self._wake.set()
                elif self.by_id.get(sub.id) is sub:
                    await self._publish(sub, partial(sub.patch, *sliced))
        except ColumnsChanged as exc:
            log.warning("subscription %s dropped: %s; its clients subscribe again", sub.id, exc)
            await self.drop(sub.id, f"subscription dropped: {exc}; subscribe again")

    async def _publish(self, sub: Subscription, diff: Callable[[], list[Event]]) -> None:
        """Diff, write the changes to the subscription's file, then send them: a change a
        client has seen is always on disk."""
        async with sub.lock:
            events = diff()
            if not events:
                return
            if sub.file is not None:
                try:
                    with anyio.CancelScope(shield=True):  # memory and file stay in step
                        await anyio.to_thread.run_sync(
                            sub.file.append, events, sub.next_rowid, self.keep_changes
                        )
                except (OSError, apsw.Error) as exc:
                    log.error("subscription %s dropped: cannot write its changes: %s", sub.id, exc)
                    self._forget(sub.id, "subscription dropped: the agent cannot store its changes")
                    await anyio.to_thread.run_sync(sub.file.delete)
                    return
            for event in events:
                for send in list(sub.listeners):
                    try:
                        send.send_nowait(event)
                    except (
                        anyio.WouldBlock,
                        anyio.BrokenResourceError,
                        anyio.ClosedResourceError,
                    ):
                        sub.listeners.remove(send)  # too slow: cut off, it can resume
                        send.close()

    def rerun_rows(self, sub: Subscription) -> list[tuple] | None:
        """The whole result of ``sub``'s query now (None: it failed; blocking)."""
        conn = self._open()
        try:
            with Deadline(conn, self.timeout), unguarded(conn):
                return _fetch(sub, conn.execute(sub.query, sub.params))
        except apsw.Error:
            return None
        finally:
            self._release(conn)

    def slice_rows(
        self, sub: Subscription, pending: dict[str, set[bytes]]
    ) -> tuple[list[tuple[int, list[tuple]]], list[tuple]] | None:
        """The rows holding the changed primary keys now, in one read transaction: (source
        index, primary keys) touched, and the rows of the plan's restricted queries."""
        plan = sub.plan
        assert plan is not None
        touched: list[tuple[int, list[tuple]]] = []
        for i, source in enumerate(plan.sources):
            pks = []
            for packed in sorted(pending.get(source.table, ())):
                try:
                    pk = tuple(crdt.unpack_pk(packed))
                except crdt.PackError:
                    continue
                if len(pk) == len(source.pk):
                    pks.append(pk)
            if pks:
                touched.append((i, pks))
        rows: list[tuple] = []
        conn = self._open()
        try:
            with Deadline(conn, self.timeout), unguarded(conn):
                conn.execute("BEGIN")  # one snapshot for every restricted query
                try:
                    for i, pks in touched:
                        for sql, params in plan.restricted(i, pks, sub.params):
                            rows += _fetch(sub, conn.execute(sql, params))
                finally:
                    conn.execute("COMMIT")
        except apsw.Error:
            return None
        finally:
            self._release(conn)
        return touched, rows

    # -- the end of subscriptions -----------------------------------------------------------

    def _forget(self, sid: str, reason: str = "subscription dropped") -> Subscription | None:
        sub = self.by_id.pop(sid, None)
        if sub is None:
            return None
        sub.dropped = reason
        for key, value in list(self._by_query.items()):
            if value == sid:
                del self._by_query[key]
        for send in sub.listeners:
            send.close()
        return sub

    async def drop(self, sid: str, reason: str = "subscription dropped") -> None:
        """Remove a subscription and its file (its listeners' streams end, and are told
        ``reason``)."""
        sub = self._forget(sid, reason)
        if sub is not None and sub.file is not None:
            with anyio.CancelScope(shield=True):
                async with sub.lock:
                    await anyio.to_thread.run_sync(sub.file.delete)

    def close(self) -> None:
        """The agent stops: close the files (they stay, to be restored at the next start)."""
        for sub in self.by_id.values():
            if sub.file is not None:
                sub.file.close()
        if self._directory_lock is not None:
            self._directory_lock.release()
            self._directory_lock = None
