"""The agent's database: the CRR data plus corrosion's bookkeeping tables, written together.

One writer connection (``crdt.connect``: WAL, ``synchronous=FULL``, recursive triggers,
merge-equal-values); every write goes through it, one transaction at a time, and every
transaction that changes data also updates the bookkeeping in the same commit, so a crash at any
point leaves them consistent. Readers open their own read-only connections.

``synchronous=FULL`` (corrosion sets NORMAL): a version acknowledged to a client and broadcast
must survive a power cut, or the node reuses its number for a new write after restart, peers
drop that as a duplicate, and the cluster never reconverges on those rows
(tests/simulations/test_sim_storage_faults.py shows both; docs/agent.md, "Durability").

Tables (corrosion's names):

``__corro_state(key, value)``                      cluster id, internal schema version
``__corro_bookkeeping(actor_id, start_version, end_version, db_version, last_seq, ts)``
    versions held: one row per version with data (``db_version`` = the local version its changes
    were stamped with, so it can be served again), ranges with ``db_version`` NULL for versions
    known to be empty (superseded everywhere they could be read from)
``__corro_bookkeeping_gaps(actor_id, start, end)``  versions known to be missing
``__corro_seq_bookkeeping(site_id, version, start_seq, end_seq, last_seq, ts)``
    seq ranges received of partial versions
``__corro_buffered_changes(...)``                   the changes of partial versions, applied only
    once every seq of the version is present
``__corro_members(actor_id, address, state, meta, updated_at)``  last known membership
``__corro_pending_changes(...)``                    the changes of versions kept until this node
    has their table or column (``pending_schema``); booked with ``db_version`` NULL meanwhile

Ownership: ``Store.bookie`` (the tables' in-memory mirror) has one owner, the host's event loop.
The transactions (``execute_local``, ``apply``) run in a worker thread: they read the bookie and
return what to book (``LocalCommit``, ``ApplyResult.booked``) without changing it. The loop
installs that with ``install`` (through ``Replicator.install_commit`` / ``install_apply``) before
it lets the next transaction run (the agent holds its database lock across both), so every
transaction reads the bookkeeping of the ones before it, and no thread reads the bookie while
the loop changes it.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, cast, overload

import apsw

import crdt
from crdt import Change, ChangeRow, CompactChanges, reaper
from crdt.gcpause import gc_paused
from crdt.schema import SchemaOutcome, apply_schema, reconcile_schema

from ..errors import CorrosionError
from . import cluster_schema, pending_schema
from .bookie import Booked, Bookie, Partial
from .changeset import Changeset, EmptyVersions, chunk_version
from .cluster_schema import Advance, Proposal
from .pending_schema import PendingSummary, SchemaView
from .ranges import RangeSet
from .sqlguard import CLIENT_PREPARE_FLAGS, Deadline, Guard, client_timeout

SCHEMA_VERSION = 1

_MIGRATION = """
CREATE TABLE IF NOT EXISTS __corro_state (key TEXT PRIMARY KEY NOT NULL, value);
CREATE TABLE IF NOT EXISTS __corro_bookkeeping (
    actor_id BLOB NOT NULL, start_version INTEGER NOT NULL, end_version INTEGER NOT NULL,
    db_version INTEGER, last_seq INTEGER, ts INTEGER,
    PRIMARY KEY (actor_id, start_version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __corro_bookkeeping_gaps (
    actor_id BLOB NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
    PRIMARY KEY (actor_id, start)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __corro_seq_bookkeeping (
    site_id BLOB NOT NULL, version INTEGER NOT NULL, start_seq INTEGER NOT NULL,
    end_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL, ts INTEGER,
    PRIMARY KEY (site_id, version, start_seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __corro_buffered_changes (
    "table" TEXT NOT NULL, pk BLOB NOT NULL, cid TEXT NOT NULL, val,
    col_version INTEGER NOT NULL, db_version INTEGER NOT NULL, site_id BLOB, cl INTEGER NOT NULL,
    seq INTEGER NOT NULL, actor_id BLOB NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (actor_id, version, seq, "table", pk, cid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __corro_members (
    actor_id BLOB PRIMARY KEY NOT NULL, address TEXT NOT NULL, state TEXT NOT NULL,
    meta BLOB, updated_at INTEGER NOT NULL);
"""


def _untype_buffered_values(conn: apsw.Connection) -> None:
    """Databases made before this fix declared ``__corro_buffered_changes.val`` as ``ANY``, which
    in a table that is not STRICT means NUMERIC affinity: a text '123' in a chunked version came
    out as the integer 123. Rebuild the table with an untyped ``val`` (no affinity).

    And they keyed a buffered change by its seq alone, but two changes of one version can share
    a seq: a node that merges a change resurrecting a row stamps the row's sentinel with that
    change's seq, and serves both in the version; the second was dropped, and the version applied
    without it. Rebuild with the cell in the key too."""
    found = conn.execute(
        "SELECT type FROM pragma_table_info('__corro_buffered_changes') WHERE name = 'val'"
    ).fetchone()
    keyed = conn.execute(
        "SELECT count(*) FROM pragma_table_info('__corro_buffered_changes') WHERE pk > 0"
    ).fetchone()
    if found is None or (found[0] == "" and keyed == (6,)):
        return
    conn.execute("ALTER TABLE __corro_buffered_changes RENAME TO __corro_buffered_changes_old")
    conn.execute(_MIGRATION)
    conn.execute("INSERT INTO __corro_buffered_changes SELECT * FROM __corro_buffered_changes_old")
    conn.execute("DROP TABLE __corro_buffered_changes_old")


class StatementError(CorrosionError):
    """A statement of a transaction failed; the whole transaction was rolled back."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


class StatementRefused(StatementError):
    """A statement does what clients may not do (``sqlguard``); nothing was applied."""


class StatementTimeout(StatementError):
    """The transaction ran past its timeout and was interrupted; nothing was applied."""


@contextlib.contextmanager
def _write_transaction(conn: apsw.Connection) -> Iterator[None]:
    """One write transaction, taken at once (``BEGIN IMMEDIATE``: no upgrade deadlock with
    readers), committed when the block ends and rolled back whole when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise


@dataclass
class StatementResult:
    rows_affected: int
    time: float


@dataclass
class LocalCommit:
    """A local transaction that changed replicated data, booked as ``version``."""

    version: int
    db_version: int
    changes: list[Change]
    last_seq: int
    ts: int


_SEQUENCES = (CompactChanges, tuple, list)  # kept as they are by ChangeList.extend


class ChangeList(Sequence[ChangeRow]):
    """The changes of the versions an apply merged, end to end, each version's as it came
    (``crdt.CompactChanges`` build each ChangeRow only when read: most applies have no
    subscription or watcher to read them, only a count)."""

    __slots__ = ("_len", "_parts")

    def __init__(self, changes: Iterable[ChangeRow] = ()) -> None:
        self._parts: list[Sequence[ChangeRow]] = []
        self._len = 0
        self.extend(changes)

    def extend(self, changes: Iterable[ChangeRow]) -> None:
        part = changes if isinstance(changes, _SEQUENCES) else list(changes)
        n = len(part)  # once: a CompactChanges' len is a call of Python
        if n:
            self._parts.append(part)
            self._len += n

    def __iadd__(self, changes: Iterable[ChangeRow]) -> ChangeList:
        self.extend(changes)
        return self

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[ChangeRow]:
        return chain.from_iterable(self._parts)

    @overload
    def __getitem__(self, i: int) -> ChangeRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[ChangeRow]: ...
    def __getitem__(self, i: int | slice) -> ChangeRow | list[ChangeRow]:
        return list(self)[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, as the list it stands for

    def __repr__(self) -> str:
        return f"ChangeList({list(self)!r})"


@dataclass
class ApplyResult:
    """What one apply transaction did."""

    applied: list[tuple[bytes, int]] = field(default_factory=list)  # versions now held, with data
    emptied: int = 0  # versions marked held without data
    buffered: int = 0  # chunks stored for partial versions
    duplicates: int = 0  # chunks that were already held
    rejected: list[tuple[bytes, int, str]] = field(default_factory=list)  # bad changesets
    changes_applied: int = 0  # rows impacted in the CRR tables
    # the changes of the applied versions (plain tuples as received, or Changes)
    changes: ChangeList = field(default_factory=ChangeList)
    tables: set[str] = field(default_factory=set)  # the tables they name, or more (never fewer)
    # versions kept until this node has their schema, and what they wait for
    kept: list[tuple[bytes, int]] = field(default_factory=list)
    kept_missing: PendingSummary = field(default_factory=PendingSummary)
    # the new bookkeeping of every actor the transaction touched, for ``Store.install``
    booked: dict[bytes, Booked] = field(default_factory=dict)
    # when the batch brought cluster schema versions: what following them did, the kept
    # versions they let merge, and what is still kept
    schema: Advance | None = None
    kept_applied: ApplyResult | None = None
    pending: PendingSummary | None = None


@dataclass
class SchemaProposal:
    """What proposing a schema did: the proposal, its local version (None when the schema was
    already the cluster's), the kept versions it let merge, and what is still kept."""

    proposal: Proposal
    commit: LocalCommit | None
    applied: ApplyResult
    pending: PendingSummary


@dataclass
class SchemaReload:
    """What applying the schema files did: the schema diff, the kept versions it let apply
    (``applied.applied``; ``applied.rejected`` for those the merge still refuses), and what is
    still kept."""

    outcome: SchemaOutcome
    applied: ApplyResult
    pending: PendingSummary


Statement = tuple[str, Sequence[Any] | dict[str, Any]]

_TABLE_OF = operator.itemgetter(0)  # a change's table


def _rows_of(changes: Sequence[ChangeRow]) -> Sequence[Sequence[Any]]:
    """What to read a version's changes' table, pk and cid from (the first three fields of a
    ChangeRow and of a compact row alike) without building their ChangeRows."""
    return changes.rows if type(changes) is CompactChanges else changes


class Store:
    def __init__(
        self, path: str | Path, *, site_id: bytes | None = None, vfs: str | None = None
    ) -> None:
        """``vfs``: an SQLite VFS registered under that name (the storage-fault simulations
        open the store through ``simulations.faulty_vfs``); None: the default one."""
        self.path = str(path)
        opts = {} if vfs is None else {"vfs": vfs}
        self.conn = crdt.connect(
            self.path, site_id=site_id, wal=True, merge_equal_values=True, **opts
        )
        self.conn.execute("PRAGMA synchronous = FULL")  # see the module's docstring
        self.conn.execute("PRAGMA recursive_triggers = ON")
        with self.conn:
            self.conn.execute(_MIGRATION + pending_schema.TABLE_SQL)
            _untype_buffered_values(self.conn)
            cluster_schema.ensure_table(self.conn)
            self.conn.execute(
                "INSERT OR IGNORE INTO __corro_state (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
        self.actor_id: bytes = crdt.site_id(self.conn)
        self.bookie = self._load_bookie()
        # tables tombstone GC reaped, and their floors (crdt.reaper): set by the loop (O3)
        self.tombstone_floors: dict[str, int] = reaper.floors(self.conn)
        # checks client statements only, inside execute_local (sqlguard)
        self.guard = Guard(writes=True).install(self.conn)
        # the cluster schema (cluster_schema): apply the versions that arrive, or only record
        # them (db.schema_source = "files"); schema this node adds to each (its extensions')
        self.follow_cluster_schema = True
        self.schema_extra = ""
        self._lost_cells = self._read_lost_cells()

    def close(self) -> None:
        self.conn.close()

    # -- state ---------------------------------------------------------------------------

    def get_state(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM __corro_state WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_state(self, key: str, value: Any) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO __corro_state (key, value) VALUES (?, ?)", (key, value)
            )

    def apply_schema(self, sql: str, *, allow_destructive: bool = False) -> list[str]:
        return apply_schema(self.conn, sql, allow_destructive=allow_destructive)

    def reload_schema(self, sql: str, *, allow_destructive: bool = False) -> SchemaReload:
        """Apply the schema files (tables they do not list are kept and reported unless
        ``allow_destructive``), then the kept versions the new schema lets merge."""
        outcome = reconcile_schema(self.conn, sql, allow_destructive=allow_destructive)
        applied = self.apply_kept()
        return SchemaReload(outcome, applied, self.pending_summary())

    def pending_summary(self) -> PendingSummary:
        return pending_schema.summary(self.conn)

    def apply_kept(self) -> ApplyResult:
        """Merge every kept version whose tables and columns all exist now, each in its own
        savepoint (one the merge refuses stays kept, in ``rejected``), and give its bookkeeping
        row the local db_version it was stamped with."""
        with _write_transaction(self.conn):
            return self._merge_kept()

    def _merge_kept(self) -> ApplyResult:
        """``apply_kept`` inside the caller's transaction."""
        conn = self.conn
        result = ApplyResult()
        before = conn.crr.rows_impacted
        view = SchemaView(conn)
        for actor, version, received in pending_schema.all_kept(conn):
            changes = self._without_lost(received)
            if view.missing(changes):
                continue
            conn.execute("SAVEPOINT kept_version")
            try:
                (local,) = crdt.merge_changesets(conn, [changes])
            except crdt.MergeError as exc:
                conn.execute("ROLLBACK TO kept_version")
                conn.execute("RELEASE kept_version")
                result.rejected.append((actor, version, str(exc)))
                continue
            conn.execute("RELEASE kept_version")
            conn.execute(
                "UPDATE __corro_bookkeeping SET db_version = ? "
                "WHERE actor_id = ? AND start_version = ? AND end_version = ?",
                (local, actor, version, version),
            )
            pending_schema.forget(conn, actor, version)
            if local is not None:
                result.applied.append((actor, version))
                result.changes.extend(changes)
            else:
                result.emptied += 1
        result.changes_applied = conn.crr.rows_impacted - before
        return result

    # -- the cluster schema (cluster_schema) -----------------------------------------------

    def set_schema_source(self, follow: bool, extra: str) -> None:
        """Follow the cluster schema's versions (or only record them), adding ``extra`` (this
        node's extensions' schema) to each."""
        self.follow_cluster_schema = follow
        self.schema_extra = extra
        self._lost_cells = self._read_lost_cells()

    def follow_schema(self) -> tuple[Advance, ApplyResult, PendingSummary]:
        """Apply the cluster schema versions this node has not run yet (at start-up), then the
        kept versions they let merge."""
        with _write_transaction(self.conn):
            adv = cluster_schema.advance(
                self.conn, self.schema_extra, follow=self.follow_cluster_schema
            )
            self._lost_cells = self._read_lost_cells()
            kept = self._merge_kept() if adv.moved or self._lost_cells else ApplyResult()
        return adv, kept, self.pending_summary()

    def propose_schema(
        self, sql: str, ts: int, *, allow_destructive: bool = False
    ) -> SchemaProposal:
        """Write ``sql`` as the cluster's next schema version and apply it here, in one
        transaction with its local version (``install`` the commit before the next one);
        ``cluster_schema.ProposalRefused`` or ``SchemaError`` leave everything as it was."""
        with _write_transaction(self.conn):
            proposal = cluster_schema.propose(
                self.conn,
                sql,
                self.actor_id,
                ts,
                self.schema_extra,
                allow_destructive=allow_destructive,
            )
            commit = self._book_local(ts)  # before merging: they take later db_versions
            kept = self._merge_kept() if proposal.new else ApplyResult()
        return SchemaProposal(proposal, commit, kept, self.pending_summary())

    def _read_lost_cells(self) -> frozenset[Any]:
        if not self.follow_cluster_schema:
            return frozenset()
        versions = cluster_schema.read_versions(self.conn)
        return cluster_schema.lost_cells(versions, cluster_schema.chain(versions))

    def _without_lost(self, changes: Sequence[ChangeRow]) -> Sequence[ChangeRow]:
        """``changes`` without the cells of columns only losing proposals defined."""
        lost = self._lost_cells
        if not lost:
            return changes
        return [c for c in changes if (c[0], c[2]) not in lost]

    def schema_outcome(
        self, proposed: cluster_schema.SchemaVersion
    ) -> tuple[cluster_schema.SchemaVersion | None, cluster_schema.SchemaVersion | None]:
        return cluster_schema.outcome(self.conn, proposed)

    def schema_state(self) -> Advance:
        """The cluster schema as this node sees it, without applying anything."""
        return cluster_schema.advance(self.conn, follow=False)

    # -- bookkeeping ---------------------------------------------------------------------

    def _load_bookie(self) -> Bookie:
        bookie = Bookie()
        for actor, start, end in self.conn.execute(
            "SELECT actor_id, start_version, end_version FROM __corro_bookkeeping "
            "ORDER BY actor_id, start_version"
        ):
            bookie.get(actor).held.add(start, end)
        for actor, version, start, end, last, ts in self.conn.execute(
            "SELECT site_id, version, start_seq, end_seq, last_seq, ts FROM __corro_seq_bookkeeping"
            " ORDER BY site_id, version, start_seq"
        ):
            b = bookie.get(actor)
            p = b.partials.get(version)
            if p is None:
                p = b.partials[version] = Partial(last, ts or 0)
            p.seqs.add(start, end)
        # gaps are derived; the table mirrors them for readers (health, inspection)
        return bookie

    def install(self, done: ApplyResult | LocalCommit | None) -> None:
        """Book what a transaction returned (on the event loop, before the next one runs)."""
        if isinstance(done, LocalCommit):
            self.bookie.get(self.actor_id).held.add(done.version, done.version)
        elif done is not None:
            self.bookie.actors.update(done.booked)

    def _write_gaps(self, actor: bytes, booked: Booked) -> None:
        self.conn.execute("DELETE FROM __corro_bookkeeping_gaps WHERE actor_id = ?", (actor,))
        gaps = booked.gaps()
        if gaps:
            self.conn.executemany(
                'INSERT INTO __corro_bookkeeping_gaps (actor_id, start, "end") VALUES (?, ?, ?)',
                [(actor, s, e) for s, e in gaps],
            )

    def reconcile_gaps(self) -> list[tuple[bytes, int, int]]:
        """Rewrite ``__corro_bookkeeping_gaps`` from the bookkeeping where they disagree (the
        gaps are derived: the table only mirrors them for readers), in one transaction; return
        ``(actor, rows deleted, rows inserted)`` for each actor rewritten (``corrosion sync
        reconcile-gaps``). Reads the bookie: run it under the agent's database lock."""
        rows: dict[bytes, list[tuple[int, int]]] = {}
        for actor, start, end in self.conn.execute(
            'SELECT actor_id, start, "end" FROM __corro_bookkeeping_gaps ORDER BY actor_id, start'
        ):
            rows.setdefault(actor, []).append((start, end))
        done = []
        with _write_transaction(self.conn):
            for actor in sorted(set(rows) | set(self.bookie.actors)):
                booked = self.bookie.actors.get(actor)
                derived = list(booked.gaps()) if booked is not None else []
                kept = rows.get(actor, [])
                if kept == derived:
                    continue
                if booked is None:
                    self.conn.execute(
                        "DELETE FROM __corro_bookkeeping_gaps WHERE actor_id = ?", (actor,)
                    )
                else:
                    self._write_gaps(actor, booked)
                done.append((actor, len(kept), len(derived)))
        return done

    def booked_version(self, actor: bytes, version: int) -> tuple[int | None, int | None] | None:
        """``(db_version, last_seq)`` of a held version of ``actor`` (``db_version`` None: held
        without data: empty, or kept for want of schema); None when it is not booked."""
        row = self.conn.execute(
            "SELECT start_version, end_version, db_version, last_seq FROM __corro_bookkeeping "
            "WHERE actor_id = ? AND start_version <= ? ORDER BY start_version DESC LIMIT 1",
            (actor, version),
        ).fetchone()
        if row is None or row[1] < version:
            return None
        return row[2], row[3]

    # -- local transactions ----------------------------------------------------------------

    def execute_local(
        self, statements: Sequence[Statement], ts: int, *, timeout: float | None = None
    ) -> tuple[list[StatementResult], LocalCommit | None]:
        """Run a client's statements in one transaction; book and return the new version if
        replicated data changed (``install`` it before the next transaction). Any failing
        statement rolls back everything (``StatementError``; ``StatementRefused`` for what
        clients may not do, ``sqlguard``; ``StatementTimeout`` past ``timeout`` seconds of
        running them)."""
        conn = self.conn
        results: list[StatementResult] = []
        floors = self.tombstone_floors
        with _write_transaction(conn):
            marks = reaper.mark_new_keys(conn, floors) if floors else None
            with self.guard.client(conn), Deadline(conn, timeout) as deadline:
                for i, (sql, params) in enumerate(statements):
                    t0 = time.perf_counter()
                    try:
                        cursor = conn.cursor()
                        counted = _DirectChanges(cursor)
                        self.guard.statement(cursor)
                        cursor.execute(sql, params, prepare_flags=CLIENT_PREPARE_FLAGS)
                        for _ in cursor:
                            pass  # rows of RETURNING are not part of the answer, as corrosion
                    except apsw.Error as exc:
                        if deadline.expired:
                            limit = client_timeout("api.transaction_timeout")
                            raise StatementTimeout(
                                i,
                                deadline.message("the transaction", limit)
                                + "; nothing was applied",
                            ) from None
                        refused = self.guard.refused(exc)
                        if refused is not None:
                            raise StatementRefused(i, refused.message) from None
                        raise StatementError(i, str(exc)) from None
                    if conn.get_autocommit():
                        raise StatementError(i, "transaction control statements are not allowed")
                    results.append(StatementResult(counted.total(), time.perf_counter() - t0))
            if marks:
                reaper.lift_new_keys(conn, conn.crr, floors, marks)
            commit = self._book_local(ts)
        return results, commit

    def _book_local(self, ts: int) -> LocalCommit | None:
        """Book the open transaction's replicated changes as this node's next version."""
        conn = self.conn
        state = conn.crr
        if state.pending == -1:
            return None
        changes = [
            c for c in crdt.changes_for_version(conn, state.pending) if c.site_id == self.actor_id
        ]
        if not changes:
            return None
        version = self.bookie.head(self.actor_id) + 1
        last_seq = max(c.seq for c in changes)
        conn.execute(
            "INSERT INTO __corro_bookkeeping (actor_id, start_version, end_version, "
            "db_version, last_seq, ts) VALUES (?, ?, ?, ?, ?, ?)",
            (self.actor_id, version, version, state.pending, last_seq, ts),
        )
        return LocalCommit(version, state.pending, changes, last_seq, ts)

    # -- applying remote versions --------------------------------------------------------

    def apply(self, items: Sequence[Changeset | EmptyVersions]) -> ApplyResult:
        """Apply chunks and empty-version notices in one transaction (bookkeeping included;
        ``install`` the result before the next transaction).

        A changeset that fails to merge (bad data) is dropped on its own and reported in
        ``rejected``; the rest of the batch still applies."""
        with gc_paused():  # the batch's bookkeeping too, not only its merge (crdt.gcpause)
            try:
                return self._apply(items, isolate=False)
            except crdt.MergeError:
                return self._apply(items, isolate=True)

    def _apply(self, items: Sequence[Changeset | EmptyVersions], *, isolate: bool) -> ApplyResult:
        conn = self.conn
        result = ApplyResult()
        touched: dict[bytes, Booked] = {}

        def booked(actor: bytes) -> Booked:
            b = touched.get(actor)
            if b is None:
                held = self.bookie.actors.get(actor)
                b = touched[actor] = held.copy() if held is not None else Booked()
            return b

        complete: list[tuple[bytes, int, Sequence[ChangeRow], int, int]] = []
        pending_versions: set[tuple[bytes, int]] = set()
        b_actor, b = None, Booked()  # the bookkeeping of the last actor seen
        with _write_transaction(conn):
            for item in items:
                if isinstance(item, EmptyVersions):
                    self._apply_empty(item, booked(item.actor), result)
                    continue
                cs = item
                actor, version = cs.actor, cs.version
                if actor == self.actor_id:
                    result.duplicates += 1  # our own versions come back through relays
                    continue
                if actor != b_actor:
                    b_actor, b = actor, booked(actor)
                key = (actor, version)
                if version in b.held or key in pending_versions:
                    result.duplicates += 1
                    continue
                partial = b.partials.get(version)
                if cs.complete and partial is None:
                    complete.append((actor, version, cs.changes, cs.last_seq, cs.ts))
                    pending_versions.add(key)
                    continue
                if partial is None:
                    partial = b.partials[cs.version] = Partial(cs.last_seq, cs.ts)
                if partial.seqs.covers(*cs.seqs):
                    result.duplicates += 1
                    continue
                self._buffer(cs)
                partial.seqs.add(*cs.seqs)
                result.buffered += 1
                if partial.complete:
                    changes: Sequence[ChangeRow] = self._take_buffered(cs.actor, cs.version)
                    del b.partials[cs.version]
                    complete.append((cs.actor, cs.version, changes, partial.last_seq, partial.ts))
                    pending_versions.add(key)
            if complete and self._lost_cells:
                complete = [(*e[:2], self._without_lost(e[2]), *e[3:]) for e in complete]
            # the tables the changes name, in one pass of C (for the schema checks below)
            rows_of = [_rows_of(e[2]) for e in complete]
            tables = set(map(_TABLE_OF, chain.from_iterable(rows_of)))
            result.tables = tables
            if complete:
                complete = self._keep_unknown_schema(complete, tables, rows_of, booked, result)
            if isolate:
                versions: list[int | crdt.MergeError | None] = []
                for entry in complete:
                    conn.execute("SAVEPOINT one_version")
                    try:
                        versions.extend(crdt.merge_changesets(conn, [entry[2]]))
                        conn.execute("RELEASE one_version")
                    except crdt.MergeError as exc:
                        conn.execute("ROLLBACK TO one_version")
                        conn.execute("RELEASE one_version")
                        versions.append(exc)
            else:
                versions = list(crdt.merge_changesets(conn, [entry[2] for entry in complete]))
            rows = []
            held_actor, held = None, RangeSet()  # the held versions of the last actor seen
            for (actor, version, changes, last_seq, ts), local in zip(
                complete, versions, strict=True
            ):
                if isinstance(local, Exception):
                    result.rejected.append((actor, version, str(local)))
                    continue
                rows.append((actor, version, version, local, last_seq, ts))
                if actor != held_actor:
                    held_actor, held = actor, booked(actor).held
                held.add(version, version)
                if local is not None:
                    result.applied.append((actor, version))
                    result.changes += changes
                else:
                    result.emptied += 1
            if rows:
                conn.executemany(
                    "INSERT OR REPLACE INTO __corro_bookkeeping (actor_id, start_version, "
                    "end_version, db_version, last_seq, ts) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
            for actor, b in touched.items():
                self._write_gaps(actor, b)
            result.changes_applied = conn.crr.rows_impacted
            if cluster_schema.TABLE in tables and cluster_schema.TABLE in map(
                _TABLE_OF, result.changes
            ):
                # new schema versions: follow them, then merge what waited for them
                result.schema = cluster_schema.advance(
                    conn, self.schema_extra, follow=self.follow_cluster_schema
                )
                self._lost_cells = self._read_lost_cells()
                if result.schema.moved or self._lost_cells:
                    result.kept_applied = self._merge_kept()
                    result.pending = pending_schema.summary(conn)
        result.booked = touched
        return result

    def _keep_unknown_schema(
        self,
        complete: list[tuple[bytes, int, Sequence[ChangeRow], int, int]],
        tables: set[Any],
        rows_of: list[Sequence[Sequence[Any]]],
        booked: Any,
        result: ApplyResult,
    ) -> list[tuple[bytes, int, Sequence[ChangeRow], int, int]]:
        """Keep (and book as held) the versions that need a table or column this node does not
        have yet; return the others, to merge (``rows_of``: each one's ``_rows_of``)."""
        view = SchemaView(self.conn)
        if view.covers(tables, rows_of):
            return complete
        to_merge = []
        for entry in complete:
            actor, version, changes, last_seq, ts = entry
            missing = view.missing(changes)
            if not missing:
                to_merge.append(entry)
                continue
            pending_schema.keep(self.conn, actor, version, changes)
            self.conn.execute(
                "INSERT OR REPLACE INTO __corro_bookkeeping (actor_id, start_version, "
                "end_version, db_version, last_seq, ts) VALUES (?, ?, ?, NULL, ?, ?)",
                (actor, version, version, last_seq, ts),
            )
            booked(actor).held.add(version, version)
            result.kept.append((actor, version))
            result.kept_missing.add(missing)
        return to_merge

    def _apply_empty(self, item: EmptyVersions, b: Booked, result: ApplyResult) -> None:
        for start, end in item.versions:
            new = RangeSet([(start, end)]).difference(b.held)
            for s, e in new:
                for v in range(s, e + 1):
                    if v in b.partials:
                        del b.partials[v]
                        self._drop_buffered(item.actor, v)
                b.held.add(s, e)
                self.conn.execute(
                    "INSERT OR REPLACE INTO __corro_bookkeeping (actor_id, start_version, "
                    "end_version, db_version, last_seq, ts) VALUES (?, ?, ?, NULL, NULL, ?)",
                    (item.actor, s, e, item.ts),
                )
                result.emptied += e - s + 1

    def _buffer(self, cs: Changeset) -> None:
        self.conn.executemany(
            'INSERT OR IGNORE INTO __corro_buffered_changes ("table", pk, cid, val, col_version, '
            "db_version, site_id, cl, seq, actor_id, version) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*c, cs.actor, cs.version) for c in cs.changes],
        )
        self.conn.execute(
            "INSERT OR REPLACE INTO __corro_seq_bookkeeping (site_id, version, start_seq, "
            "end_seq, last_seq, ts) VALUES (?, ?, ?, ?, ?, ?)",
            (cs.actor, cs.version, cs.seqs[0], cs.seqs[1], cs.last_seq, cs.ts),
        )

    def _take_buffered(self, actor: bytes, version: int) -> list[ChangeRow]:
        rows = self.conn.execute(
            'SELECT "table", pk, cid, val, col_version, db_version, site_id, cl, seq '
            "FROM __corro_buffered_changes WHERE actor_id = ? AND version = ? ORDER BY seq",
            (actor, version),
        ).fetchall()
        self._drop_buffered(actor, version)
        return cast("list[ChangeRow]", rows)  # the changes, in crsql_changes' column order

    def _drop_buffered(self, actor: bytes, version: int) -> None:
        self.conn.execute(
            "DELETE FROM __corro_buffered_changes WHERE actor_id = ? AND version = ?",
            (actor, version),
        )
        self.conn.execute(
            "DELETE FROM __corro_seq_bookkeeping WHERE site_id = ? AND version = ?",
            (actor, version),
        )

    # -- serving versions to peers --------------------------------------------------------

    def serve(
        self, actor: bytes, versions: RangeSet, *, max_versions: int = 1000
    ) -> Iterator[Changeset | EmptyVersions]:
        """The current content of ``versions`` of ``actor`` held here: chunks for versions with
        surviving changes, empty notices for the rest. Versions not held are skipped."""
        served = 0
        empties: list[tuple[int, int]] = []
        for start, end in versions:
            rows = self.conn.execute(
                "SELECT start_version, end_version, db_version, last_seq, ts "
                "FROM __corro_bookkeeping WHERE actor_id = ? AND start_version <= ? "
                "AND end_version >= ? ORDER BY start_version",
                (actor, end, start),
            ).fetchall()
            for s, e, local, last_seq, ts in cast(
                "list[tuple[int, int, int | None, int | None, int | None]]", rows
            ):
                s, e = max(s, start), min(e, end)
                if local is None:
                    kept = pending_schema.kept_versions(self.conn, actor, s, e)
                    for v in kept:  # held, waiting for this node's schema: served as received
                        changes = pending_schema.kept_changes(self.conn, actor, v)
                        hint = max(c.db_version for c in changes)
                        yield from chunk_version(actor, v, changes, last_seq or 0, ts or 0, hint)
                    empties.extend(RangeSet([(s, e)]).difference(RangeSet((v, v) for v in kept)))
                    served += e - s + 1
                    continue
                changes = [
                    c for c in crdt.changes_for_version(self.conn, local) if c.site_id == actor
                ]
                if not changes:
                    empties.append((s, s))
                else:
                    yield from chunk_version(actor, s, changes, last_seq or 0, ts or 0, local)
                served += 1
                if served >= max_versions:
                    break
            if served >= max_versions:
                break
        if empties:
            yield EmptyVersions(actor, tuple(_coalesce(empties)))

    # -- members ---------------------------------------------------------------------------

    def save_member(self, actor: bytes, address: str, state: str, meta: bytes) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO __corro_members (actor_id, address, state, meta, "
                "updated_at) VALUES (?, ?, ?, ?, ?)",
                (actor, address, state, meta, int(time.time())),
            )

    def load_members(self) -> list[tuple[bytes, str, str, bytes]]:
        rows = self.conn.execute(
            "SELECT actor_id, address, state, meta FROM __corro_members ORDER BY updated_at DESC"
        ).fetchall()
        return cast("list[tuple[bytes, str, str, bytes]]", rows)


class _DirectChanges:
    """The rows a client's SQL text changed itself. SQLite's ``changes()`` is the count of the
    last completed write, so after a ``SELECT`` it still holds an earlier write's; count it only
    after each statement that writes (its direct rows: the CRR triggers' are excluded)."""

    def __init__(self, cursor: apsw.Cursor) -> None:
        self._conn = cursor.connection
        self._rows = 0
        self._writing = False  # the statement running now is not read-only
        cursor.exec_trace = self._started  # chained behind the guard's (sqlguard)

    def _started(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        self._count_finished()
        self._writing = not cursor.is_readonly
        return True

    def _count_finished(self) -> None:
        if self._writing:
            self._rows += self._conn.changes()
            self._writing = False

    def total(self) -> int:
        """Call once the text has run to its end."""
        self._count_finished()
        return self._rows


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out
