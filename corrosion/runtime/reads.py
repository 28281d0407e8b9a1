"""Reads: clients' queries on read-only connections, in parallel with the writer (WAL).

Connections are pooled; the pool is the one thing shared with worker threads (``list.pop`` and
``append`` are atomic). Each connection carries a ``Guard`` (corrosion.core.sqlguard) that refuses
what clients may not read and stops a query at its deadline.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import anyio
import apsw

import crdt
import crdt.tableinfo
from crdt.schema import split_statements

from ..core.sqlguard import NOT_READONLY, Deadline, Guard, client_timeout, guard_of
from .results import QueryError, QueryTimeout
from .threadfeed import ThreadFeed

POOL_SIZE = 8  # idle read connections kept
ENCODED_FIRST = 512  # rows of an encoded stream's first trip (a point query: the only one)
ENCODED_BYTES = 1 << 20  # encoded output a later trip aims at
# Rows read and encoded at a time within a trip. CPython keeps up to 2,000 freed tuples of each
# small size for reuse: a chunk this size takes its row tuples (and the encoder's) from that
# free list, still in cache, and gives them back; 4,096 rows at a time cost ~12% more per row.
ENCODE_CHUNK = 1000
READ_AHEAD = 2  # encoded batches a stream reads ahead of what it has sent


class Reads:
    """The read connections of one database and the queries run on them."""

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path
        self._pool: list[apsw.Connection] = []
        self._closing = False

    def connection(self) -> apsw.Connection:
        """A pooled read-only connection, or a new one (call in a worker thread: opening does
        I/O); give it back with ``release``."""
        with contextlib.suppress(IndexError):  # pop is atomic: threads may share the pool
            return self._pool.pop()
        # NOMUTEX: SQLite skips locking the connection's mutex in every call (every
        # ``sqlite3_column_*`` of every row: a fifth of a read's CPU). Without that mutex
        # nothing stops two threads using the connection at once (apsw's ThreadingViolation
        # check is a try of it), so it is used by one thread at a time: a query holds it from
        # the pool until it ends, its trips to worker threads awaited one after another (or one
        # thread reading ahead, waited for before the connection goes back), and ``release``
        # closes every cursor made on it (``_Cursors``), so that none is finalized later from
        # another thread (the garbage collector's, a traceback's) while the next query runs.
        # ``interrupt()``, the one call made from another thread while it reads, is safe in
        # any threading mode.
        conn = crdt.connect(
            str(self._db_path), flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_NOMUTEX
        )
        conn.cursor_factory = _Cursors()
        conn.execute("PRAGMA query_only = ON")
        Guard(writes=False).install(conn)  # checks clients' queries (sqlguard)
        return conn

    def release(self, conn: apsw.Connection) -> None:
        """Give back a connection from ``connection`` (in the thread that last used it, or
        once no thread does): its cursors are closed, then it goes back to the pool."""
        cursors = conn.cursor_factory
        if isinstance(cursors, _Cursors):
            cursors.close_all()
        if len(self._pool) < POOL_SIZE and not self._closing:
            self._pool.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the idle connections; those in use close when released."""
        self._closing = True
        for conn in self._pool:
            conn.close()
        self._pool.clear()

    def is_replicated(self, table: str) -> bool:
        conn = self.connection()  # not the writer: a worker thread may be using it
        try:
            return crdt.tableinfo.is_crr(conn, table)
        finally:
            self.release(conn)

    async def describe(self, sql: str) -> list[tuple[str, str | None]] | None:
        """The columns (name, declared type or None) of one read-only statement, prepared with
        every parameter NULL but not run; None if it writes. Raises ``QueryError`` for a
        refused or invalid statement (the PostgreSQL server's Describe)."""
        if len(split_statements(sql)) != 1:
            raise QueryError("exactly one statement is expected")

        def prepare() -> list[tuple[str, str | None]] | None:
            conn = self.connection()
            guard = guard_of(conn)
            assert guard is not None
            seen: dict[str, Any] = {}

            def check(cur: apsw.Cursor, _sql: str, _bindings: Any) -> bool:
                seen["cols"] = list(cur.get_description())
                seen["readonly"] = bool(cur.is_readonly)
                return False  # describe only: do not run it

            try:
                cursor = conn.cursor()
                cursor.exec_trace = check
                guard.statement(cursor)
                conn.execute("SELECT 1 FROM sqlite_schema LIMIT 0")  # see the latest schema
                cursor.execute(sql, _AllNull(), can_cache=False)
            except (apsw.ExecTraceAbort, apsw.ReadOnlyError):
                pass
            except apsw.Error as exc:
                refused = guard.refused(exc)
                if refused is not None and refused.message == NOT_READONLY:
                    return None
                raise QueryError(refused.message if refused else str(exc)) from None
            finally:
                self.release(conn)
            return seen.get("cols", []) if seen.get("readonly", False) else None

        return await anyio.to_thread.run_sync(prepare)

    async def stream(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any],
        *,
        batch: int,
        seconds: float | None,
        interruptible: bool = False,
        encode: Callable[[list[tuple], int], bytes] | None = None,
    ) -> AsyncIterator[tuple[str, Any]]:
        """``("columns", [...])`` then ``("rows", [tuple, ...])`` batches; raises
        ``QueryError`` (before the columns for refused or invalid statements), ``QueryTimeout``
        once the query has run ``seconds`` (None or 0: no limit), reading rows included.
        ``interruptible``: cancelling the iterating task interrupts the running statement (at
        a small cost per call; the PostgreSQL server's CancelRequest needs it).

        With ``encode``, each batch is ``encode(rows, rows_before_it)`` instead (bytes), called
        in the worker thread that read it: a server writing rows out does its per-row work
        there, off the event loop. The first trip then reads up to ``ENCODED_FIRST`` rows (a
        point query: one trip); if more may follow, one thread reads on ahead of what has been
        consumed (``ThreadFeed``, ``READ_AHEAD`` batches at most) in batches of about
        ``ENCODED_BYTES`` of output, up to ``batch`` rows: many rows per batch when they are
        small, few when they are wide."""
        if len(split_statements(sql)) != 1:
            raise QueryError("exactly one statement is expected")
        # A point query should cost one trip to a worker thread, not four: take a pooled
        # connection here, stop after a short batch, and put the connection back here.
        try:
            conn = self._pool.pop()
        except IndexError:
            conn = await anyio.to_thread.run_sync(self.connection)
        guard = guard_of(conn)
        assert guard is not None
        deadline = Deadline(conn, seconds).__enter__()
        cursor = conn.cursor()
        feed: ThreadFeed[bytes] | None = None
        try:
            size = batch if encode is None else min(batch, ENCODED_FIRST)  # rows this trip

            def failed(exc: apsw.Error, *, client_error: bool) -> QueryError:
                if deadline.expired:
                    return QueryTimeout(
                        deadline.message("the query", client_timeout("api.query_timeout"))
                    )
                refused = guard.refused(exc)
                if refused is not None:
                    return QueryError(refused.message)
                return QueryError(str(exc), client_error=client_error)

            def first() -> tuple[list[str], tuple[int, Any]]:
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
                    return seen.get("cols", []), _fetch(cursor, size, encode, 0)
                except apsw.Error as exc:
                    raise failed(exc, client_error=False) from None

            run = _interruptible(conn) if interruptible else anyio.to_thread.run_sync
            cols, (n, rows) = await run(first)
            yield "columns", cols
            if encode is not None and n == size:  # more may follow: read on ahead (ThreadFeed)
                after = partial(_read_ahead, cursor, encode, batch, n, _next_size(batch, n, rows))
                feed = ThreadFeed(after, depth=READ_AHEAD)
                yield "rows", rows
                try:
                    async for rows in feed:
                        yield "rows", rows
                except apsw.Error as exc:  # a runtime error after the first batch
                    raise failed(exc, client_error=False) from None
                return
            done = 0
            while n:
                yield "rows", rows
                done += n
                if n < size:  # _fetch stopped at the end
                    break
                try:
                    n, rows = await run(_fetch, cursor, size, encode, done)
                except apsw.Error as exc:  # a runtime error after the first batch
                    raise failed(exc, client_error=False) from None
        finally:
            if feed is not None:
                await feed.stop(conn.interrupt)
            deadline.__exit__(None, None, None)
            if len(self._pool) < POOL_SIZE and not self._closing:
                self.release(conn)  # into the pool: nothing to close
            else:
                await anyio.to_thread.run_sync(self.release, conn)


class _AllNull(dict):
    """Bindings that give every parameter, whatever its name, NULL."""

    def __missing__(self, key: str) -> None:
        return None


def _interruptible(conn: apsw.Connection) -> Callable[..., Awaitable[Any]]:
    """``anyio.to_thread.run_sync`` for statements on ``conn`` that a cancellation of the
    awaiting task interrupts (``conn.interrupt()``, thread-safe): the worker thread returns at
    once, rather than when the statement ends, and the cancellation then takes effect."""

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        ended = threading.Event()

        def call() -> Any:
            try:
                return fn(*args)
            finally:
                ended.set()

        try:
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            conn.interrupt()
            with anyio.CancelScope(shield=True):  # the connection is free once the thread ends
                await anyio.to_thread.run_sync(ended.wait)
            raise

    return run


class _Cursors:
    """A read connection's cursor factory that remembers the cursors it made, so that
    ``Reads.release`` can close those still open: a closed cursor's finalization no longer
    touches the connection, whichever thread it happens in."""

    __slots__ = ("made",)

    def __init__(self) -> None:
        self.made: list[weakref.ref[apsw.Cursor]] = []

    def __call__(self, conn: apsw.Connection) -> apsw.Cursor:
        cursor = apsw.Cursor(conn)
        self.made.append(weakref.ref(cursor))
        return cursor

    def close_all(self) -> None:
        made, self.made = self.made, []
        for ref in made:
            cursor = ref()
            if cursor is not None:
                cursor.close(True)  # force: an unfinished statement is reset, not run on


def _next_size(batch: int, n: int, encoded: bytes) -> int:
    """Rows for the next trip of an encoded stream: about ``ENCODED_BYTES`` of output, going by
    the last one's ``n`` rows, at most ``batch``."""
    return max(1, min(batch, n * ENCODED_BYTES // max(1, len(encoded))))


def _read_ahead(
    cursor: apsw.Cursor,
    encode: Callable[[list[tuple], int], bytes],
    batch: int,
    done: int,
    size: int,
    put: Callable[[bytes], bool],
) -> None:
    """The batches of an encoded stream after its first ``done`` rows, to the end (in a
    ``ThreadFeed``'s thread)."""
    while True:
        n, encoded = _fetch(cursor, size, encode, done)
        if n and not put(encoded):
            return  # the stream was stopped
        if n < size:
            return
        done += n
        size = _next_size(batch, n, encoded)


def _fetch(
    cursor: apsw.Cursor, n: int, encode: Callable[[list[tuple], int], bytes] | None, before: int
) -> tuple[int, Any]:
    """Up to ``n`` rows (fewer only at the end): how many, and the rows (or what ``encode``
    made of them, encoded ``ENCODE_CHUNK`` rows at a time)."""
    if encode is None:
        rows = list(islice(cursor, n))
        return len(rows), rows
    parts: list[bytes] = []
    done = 0
    while done < n:
        want = min(ENCODE_CHUNK, n - done)
        rows = list(islice(cursor, want))
        if rows:
            parts.append(encode(rows, before + done))
            done += len(rows)
        if len(rows) < want:  # the end
            break
    return done, parts[0] if len(parts) == 1 else b"".join(parts)
