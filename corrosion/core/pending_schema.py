"""Versions that arrive before this node has their schema: kept, served, applied when it arrives.

Schema is not replicated: every node loads its own files, so during a rollout one node can write
to a table (or a column) that another has not created yet. Such a version is *kept*, not
rejected, by these rules (the store calls this module inside its own transactions):

* A version is applied whole or kept whole: if any of its changes names a table that is not a CRR
  here, or a column its table lacks, all of its changes are kept (a transaction is never shown
  half applied). Changes that are malformed in any other way are left to the merge, which
  rejects them as before.
* A kept version counts as received: it is booked in ``__corro_bookkeeping`` (``db_version``
  NULL) in the same transaction that stores its changes in ``__corro_pending_changes``, so sync
  neither re-fetches it nor reports a gap, and a restart loses nothing.
* While kept, the version is served to peers from the kept changes, exactly as received (a NULL
  ``db_version`` otherwise means "held, no changes left").
* When the schema arrives (``corrosion reload``, or a start with the new files), every kept
  version whose tables and columns now all exist is merged with the ordinary merge rules, and its
  bookkeeping row takes the local ``db_version`` it was stamped with. Merging is commutative
  (per-column last-writer-wins under causal length), so applying a version after later ones
  gives the same rows as applying it in order. A version the merge refuses even then (the
  schemas differ in another way) stays kept, and is reported.

Threads: the functions on a connection run in the store's worker thread, inside its
transactions; ``PendingSchema`` (what ``/v1/health`` shows) belongs to the event loop, which
installs what those functions return.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any, cast

import apsw

from crdt import Change, ChangeRow
from crdt.schema import is_internal
from crdt.tableinfo import SENTINEL, is_crr, read_table_info

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS __corro_pending_changes (
    "table" TEXT NOT NULL, pk BLOB NOT NULL, cid TEXT NOT NULL, val,
    col_version INTEGER NOT NULL, db_version INTEGER NOT NULL, site_id BLOB, cl INTEGER NOT NULL,
    seq INTEGER NOT NULL, actor_id BLOB NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (actor_id, version, seq)) WITHOUT ROWID;
"""
# ``val`` has no declared type, so no affinity: a text '123' stays text (``ANY`` in a table that
# is not STRICT has NUMERIC affinity and would turn it into an integer).

_CHANGE_COLUMNS = '"table", pk, cid, val, col_version, db_version, site_id, cl, seq'


class _AnyColumn:
    """Stands for a table the merge must judge (a malformed or internal name): nothing is
    missing from it, so its version goes to the merge, which rejects it as malformed."""

    def __contains__(self, item: object) -> bool:
        return True


_MERGE_DECIDES = _AnyColumn()
_UNREAD = object()
_TABLE_COLUMN = itemgetter(0, 2)  # of a change
_COLUMN = itemgetter(2)  # of a change


class SchemaView:
    """Which tables and columns this database has, read once per transaction."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        self._columns: dict[Any, Any] = {}
        self._present: set[tuple[Any, Any]] = set()  # (table, column) pairs seen to exist

    def _read(self, table: Any) -> Any:
        if not isinstance(table, str) or is_internal(table):
            return _MERGE_DECIDES
        if not is_crr(self.conn, table):
            return None
        return frozenset(read_table_info(self.conn, table).non_pk_names) | {SENTINEL}

    def covers(self, tables: set[Any], versions: Sequence[Sequence[Any]]) -> bool:
        """Whether this database has every table and column the changes of ``versions`` name
        (``tables``: the tables they name), for the usual batch, whose changes all name one
        table: one pass of C over them, no pair built per change. False means "ask ``missing``
        of each version"."""
        if len(tables) != 1:
            return not tables
        (table,) = tables
        cols = self._columns.get(table, _UNREAD)
        if cols is _UNREAD:
            cols = self._columns[table] = self._read(table)
        if cols is None:
            return False
        return cols is _MERGE_DECIDES or cols.issuperset(
            map(_COLUMN, chain.from_iterable(versions))
        )

    def missing(self, changes: Sequence[Any]) -> dict[str, int]:
        """What ``changes`` need that this database lacks: ``"t"`` for a table, ``"t.c"`` for a
        column, each with the number of changes waiting on it; empty when all can merge."""
        present = self._present
        if present.issuperset(map(_TABLE_COLUMN, changes)):
            return {}  # the usual case, in one pass of C
        out: dict[str, int] = {}
        columns = self._columns
        for c in changes:
            table = c[0]
            cols = columns.get(table, _UNREAD)
            if cols is _UNREAD:
                cols = columns[table] = self._read(table)
            if cols is None:
                key = table
            elif c[2] in cols:
                present.add((table, c[2]))
                continue
            else:
                key = f"{table}.{c[2]}"
            out[key] = out.get(key, 0) + 1
        return out


@dataclass
class PendingSummary:
    """Kept versions, and what they wait for (``"t"`` or ``"t.c"`` -> changes waiting)."""

    versions: int = 0
    missing: dict[str, int] = field(default_factory=dict)

    def add(self, missing: dict[str, int]) -> None:
        self.versions += 1
        for key, n in missing.items():
            self.missing[key] = self.missing.get(key, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {"versions": self.versions, "missing": dict(sorted(self.missing.items()))}


def keep(conn: apsw.Connection, actor: bytes, version: int, changes: Sequence[ChangeRow]) -> None:
    conn.executemany(
        f"INSERT OR IGNORE INTO __corro_pending_changes ({_CHANGE_COLUMNS}, actor_id, version) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(*c, actor, version) for c in changes],
    )


def kept_versions(conn: apsw.Connection, actor: bytes, start: int, end: int) -> list[int]:
    return [
        v
        for (v,) in conn.execute(
            "SELECT DISTINCT version FROM __corro_pending_changes "
            "WHERE actor_id = ? AND version BETWEEN ? AND ? ORDER BY version",
            (actor, start, end),
        )
    ]


def kept_changes(conn: apsw.Connection, actor: bytes, version: int) -> list[Change]:
    return [
        Change(*row)
        for row in conn.execute(
            f"SELECT {_CHANGE_COLUMNS} FROM __corro_pending_changes "
            "WHERE actor_id = ? AND version = ? ORDER BY seq",
            (actor, version),
        )
    ]


def all_kept(conn: apsw.Connection) -> Iterator[tuple[bytes, int, list[Change]]]:
    """Every kept version with its changes, in (actor, version) order."""
    rows = conn.execute(
        "SELECT DISTINCT actor_id, version FROM __corro_pending_changes ORDER BY actor_id, version"
    ).fetchall()
    for actor, version in cast("list[tuple[bytes, int]]", rows):
        yield actor, version, kept_changes(conn, actor, version)


def forget(conn: apsw.Connection, actor: bytes, version: int) -> None:
    conn.execute(
        "DELETE FROM __corro_pending_changes WHERE actor_id = ? AND version = ?", (actor, version)
    )


def summary(conn: apsw.Connection) -> PendingSummary:
    view = SchemaView(conn)
    out = PendingSummary()
    (out.versions,) = cast(
        "tuple[int]",
        conn.execute(
            "SELECT count(*) FROM (SELECT DISTINCT actor_id, version FROM __corro_pending_changes)"
        ).fetchone(),
    )
    rows = conn.execute(
        'SELECT "table", cid, count(*) FROM __corro_pending_changes GROUP BY "table", cid '
        'ORDER BY "table", cid'
    ).fetchall()
    for table, cid, n in cast("list[tuple[str, str, int]]", rows):
        for key, _ in view.missing([(table, None, cid)]).items():
            out.missing[key] = out.missing.get(key, 0) + n
    return out


class PendingSchema:
    """The agent's view of kept versions, for ``/v1/health``, metrics and the logs. Owned by the
    event loop: the store computes summaries and per-apply additions in its worker thread and
    returns them; the loop installs them here, in the order their transactions committed."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._summary = PendingSummary()
        self._logged: dict[str, None] = {}  # missing keys already logged (ordered, not a set)
        self.kept_total = 0  # versions kept since start
        self.applied_total = 0  # kept versions applied since start

    @property
    def versions(self) -> int:
        return self._summary.versions

    @property
    def missing(self) -> dict[str, int]:
        return self._summary.missing

    def to_json(self) -> dict[str, Any]:
        return self._summary.to_json()

    def kept(self, added: PendingSummary) -> None:
        """An apply kept ``added.versions`` more versions, waiting for ``added.missing``."""
        self.kept_total += added.versions
        total = PendingSummary(self._summary.versions + added.versions, dict(self.missing))
        for key, n in added.missing.items():
            total.missing[key] = total.missing.get(key, 0) + n
        self.install(total)

    def applied(self, versions: int) -> None:
        self.applied_total += versions
        if versions:
            self._log.info("applied %d kept versions now that their schema is here", versions)

    def install(self, summary: PendingSummary) -> None:
        """Take ``summary`` as the current state; log each newly missing table or column once
        (again only if it is missing again after its schema arrived)."""
        for key in summary.missing:
            if key not in self._logged:
                self._logged[key] = None
                what = "column" if "." in key else "table"
                self._log.warning(
                    "changes for unknown %s %s kept until its schema arrives", what, key
                )
        for key in [k for k in self._logged if k not in summary.missing]:
            del self._logged[key]
        self._summary = summary
