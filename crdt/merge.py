"""Merging remote changes: the rules of ``INSERT INTO crsql_changes``, applied in batches.

Precedence, per incoming change ``C`` against the local row (cr-sqlite 0.16.3):

1. **Causal length.** ``local_cl`` is the sentinel's col_version, else 1 if the row has any
   clock, else 0. ``C.cl < local_cl``: ignored. An even ``C.cl`` is a delete (whatever the cid):
   unless equal to ``local_cl`` it deletes the row, records the tombstone and drops the column
   clocks. A ``'-1'`` change with a larger odd cl resurrects the row.
2. A column change with a larger odd cl first resurrects the row (column clocks are zeroed and
   re-stamped, the sentinel takes ``C.cl``), then wins.
3. With equal cl: **col_version**, then the **value** (cr-sqlite's cross-type order), then, only
   with ``merge-equal-values``, the **site id** bytes. A full tie keeps the local value.

Every winning write stamps its clock with ``next_db_version(C.db_version)``, so versions inside one
merge are a running maximum; the incoming seq and site are kept. ``rows_impacted`` counts each
winning column, delete, sentinel merge and resurrection.

How it is fast: cr-sqlite runs 5–8 statements per change. Here a batch is evaluated in memory —
each touched row's key and col_versions are read once, in one statement, every rule above runs on
Python dicts — and the outcome is written with multi-row statements for the base table and the
clocks. The read returns two columns per clock, not the whole clock row: building the Python
values of what SQLite returns is most of a read's cost, and a clock's site and seq are only needed
by a resurrection or a site tie (``_site_seq`` reads them then). With a hot loop that tests the
usual change (a column of a live row at its causal length) first, that took 10% of the instructions
off a merge into an existing replica (valgrind, 20k changes: 28.8k a change before, 25.9k after;
8% into a fresh one). ``bench/crdt_bench.py --merge-only``, 100k changes, interleaved rounds,
medians: into an existing replica 371k changes/s before, 408k after, into a fresh one 523k, 561k
(load 5; at load 10, 368k to 396k and 496k to 548k). Of the ~245 ms into an existing replica,
~95 ms are the clock writes (a DELETE and an INSERT per rewritten clock and its index entry,
measured cheaper than an upsert, INSERT OR REPLACE or UPDATE ... FROM) and ~42 ms the reads; the
rest is Python, ~0.55 us a change in the loop. Two hidden slow paths in it (callgrind): ``type(v)
in (str, bytes)`` compares a type outside the tuple with both by rich comparison (a frozenset
compares none), and chaining a row's clock entries into the flushed list steps through them one
value at a time (adding each entry tuple copies it at once); both fixed, ~4% off a merge into an
existing replica (A/B, 100k changes, medians: 412k changes/s before, 425k after at load 8.7;
413k and 435k at load 3). Binding each row's key once for all its clocks (rows grouped by
their number of clocks) gained ~2% more there but cost merges of small changesets ~4%: apsw's
statement cache re-prepares a flush's statements, and the numbered form prepares slower.
SQLite's per-call connection mutex costs another ~4% of the instructions, but opening connections
with SQLITE_OPEN_NOMUTEX is not safe here: apsw then lets a second thread use a connection while
the first is stepping a statement (it raises ThreadingViolationError only with the mutex). The
sequence of per-change writes collapses exactly: a row's base writes after its last delete are an
upsert of the columns set since (columns not set take their defaults, as a resurrection's
``INSERT OR IGNORE`` would give them). Key creation and site ordinals still happen in first-seen
order, as upstream. A change that ties on col_version with a value the batch set compares with that
value as its column stores it (cr-sqlite compares with the stored value). A large flush writes the
base rows with triggers off when every trigger on the table is ours (see ``flush``).

Resolving a batch set-based in SQL instead (changes bulk-loaded into a TEMP table, winners joined
against the clocks and lookaside, a window function for the running db_version, UPDATE ... FROM a
pivot for the base rows) was measured at 100k changes, in its most favourable form (no duplicates,
no deletes): 1.9x slower into a fresh replica and 1.5x into an existing one. Loading the TEMP table
alone through apsw costs about what the whole per-change loop here costs (~0.9 us a change, the
binding of nine values), and the joins, window and pivot cost more than the dict work they replace.

The whole call is atomic: it runs in a savepoint, and on any error the database and the
connection's in-memory version state are restored.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import apsw

from .changes import CompactChanges
from .errors import MergeError, PackError
from .gcpause import gc_paused
from .pack import unpack_pk
from .sqlutil import ident, idents, placeholders
from .state import CrrState
from .tableinfo import (
    SENTINEL,
    TableInfo,
    is_crr,
    read_table_info,
)
from .triggers import TRIGGER_INFIX
from .values import compare_values

MAX_NAME_BYTES = 2048
MAX_SITE_ID_BYTES = 16
FLUSH_ROWS = 20_000  # touched rows held in memory before writing them out
ROWS_PER_STATEMENT = 100  # rows written by one multi-row INSERT (see _write_rows)
QUIET_TRIGGERS_ROWS = 500  # a flush of this many rows writes base tables with triggers off

# clock entry: (key, col_name, col_version, db_version, site_ordinal, seq), a clock table row as
# flush writes it
_SITE, _SEQ = 4, 5


class _Table:
    """Cached statements for one CRR table."""

    __slots__ = (
        "affinities",
        "clock",
        "col_index",
        "defaults",
        "delete_row",
        "info",
        "insert_key",
        "npk",
        "select_clocks",
        "select_row",
        "select_sites",
        "upserts",
    )

    def __init__(self, info: TableInfo) -> None:
        self.info = info
        self.clock = info.clock  # quoted name (a property that builds it on each read)
        pk_where = " AND ".join(f"{ident(c)} = ?{i}" for i, c in enumerate(info.pk_names, 1))
        pk_cols = idents(info.pk_names)
        self.npk = len(info.pks)
        self.insert_key = (
            f"INSERT INTO {info.pks_table} ({pk_cols}) VALUES ({placeholders(self.npk)}) "
            "ON CONFLICT DO NOTHING RETURNING __crsql_key"
        )
        select_key = f"SELECT __crsql_key FROM {info.pks_table} WHERE {pk_where}"
        # A row's key and col_versions by its pk, in one statement: (NULL, key) when the key
        # exists, then (col_name, col_version) per clock. Two columns, not the whole clock row:
        # building the values of a row SQLite returns is most of a read's cost, and the rest of
        # a clock (site, seq) is only needed by the rare resurrection or site tie (select_sites).
        self.select_clocks = (
            f"SELECT NULL, __crsql_key FROM {info.pks_table} WHERE {pk_where} UNION ALL "
            f"SELECT col_name, col_version FROM {info.clock} WHERE key = ({select_key})"
        )
        self.select_sites = f"SELECT col_name, site_id, seq FROM {info.clock} WHERE key = ?"
        self.select_row = (
            f"SELECT {idents(info.non_pk_names)} FROM {info.quoted} WHERE {pk_where}"
            if info.non_pks
            else None
        )
        self.delete_row = f"DELETE FROM {info.quoted} WHERE {pk_where}"
        self.upserts: dict[tuple[int, ...], tuple[str, str]] = {}
        self.col_index = {**info.non_pk_index, SENTINEL: -1}  # cid -> non-pk index, -1
        self.defaults: dict[str, Any] = {}
        self.affinities: list[str | None] | None = None  # see Merger._as_stored

    def upsert_sql(self, cols: tuple[int, ...]) -> tuple[str, str]:
        """The statement writing the pk and columns ``cols`` of rows, as the text before and
        after its VALUES list; no columns: create the row if it is missing."""
        sql = self.upserts.get(cols)
        if sql is None:
            info = self.info
            pk_cols = idents(info.pk_names)
            if not cols:
                sql = (f"INSERT OR IGNORE INTO {info.quoted} ({pk_cols}) VALUES ", "")
            else:
                names = [info.non_pks[i].name for i in cols]
                sql = (
                    f"INSERT INTO {info.quoted} ({pk_cols}, {idents(names)}) VALUES ",
                    " ON CONFLICT DO UPDATE SET "
                    + ", ".join(f"{ident(n)} = excluded.{ident(n)}" for n in names),
                )
            self.upserts[cols] = sql
        return sql


class _Row:
    """In-memory state of one row touched by the batch."""

    __slots__ = (
        "base_deleted",
        "base_ensure",
        "cleared",
        "had_clocks",
        "key",
        "pk",
        "sites",
        "stored",
        "table",
        "values",
        "versions",
        "written",
    )

    def __init__(
        self, table: _Table, pk: tuple[Any, ...], key: int, versions: dict[str, int]
    ) -> None:
        self.table = table
        self.pk = pk
        self.key = key
        self.versions = versions  # cid -> col_version of each clock the row has now
        self.had_clocks = bool(versions)  # the key has clock rows in the database
        # cid -> clock entry written by this batch, in first-write order; a clock in versions
        # but not here is as the database holds it
        self.written: dict[str, tuple[Any, ...]] = {}
        self.cleared = False  # column clocks dropped by a delete in this batch
        self.base_deleted = False  # base row deleted in this batch (then maybe rebuilt)
        self.base_ensure = False  # base row must exist (resurrection)
        self.values: dict[int, Any] = {}  # column index -> value set by this batch
        # name -> (site ordinal, seq) of each clock as the database holds it (None: unread)
        self.sites: dict[str, tuple[int, int]] | None = None
        # base row as read from the db (False: unread)
        self.stored: tuple[Any, ...] | Literal[False] | None = False


class Merger:
    """Applies batches of changes to one connection. Create one per merge call."""

    def __init__(self, conn: apsw.Connection, state: CrrState) -> None:
        self.conn = conn
        self.state = state
        self.tables: dict[str, _Table | None] = {}
        self.quiet: bool | None = None  # see _quiet
        self.rows: dict[tuple[str, bytes], _Row] = {}
        self.site_ordinals: dict[bytes, int] = {}
        self.ordinal_sites: dict[int, bytes] = {}
        for site, ordinal in conn.execute("SELECT site_id, ordinal FROM crsql_site_id"):
            self.site_ordinals[site] = ordinal
            self.ordinal_sites[ordinal] = site
        self.impacted = 0
        self.version: int | None = None  # when set, every winning write is stamped with it
        self.seen = 0  # changes offered, winning or not
        self.last_key_was_new = False
        self.cursor = conn.cursor()
        self.max_length = conn.limit(apsw.SQLITE_LIMIT_LENGTH, -1)
        self.max_value_chars = self.max_length // 4  # below this, no str can be too long
        if state.pending == -1:
            # the inlined next_db_version in apply() relies on a loaded db_version
            state.fill_db_version_if_needed()

    # -- lookups -----------------------------------------------------------------------

    def _table(self, name: Any) -> _Table:
        t: _Table | Literal[False] | None = self.tables.get(name, False)
        if t is False:
            if not isinstance(name, str) or len(name.encode()) > MAX_NAME_BYTES:
                raise MergeError("table name must be text of at most 2048 bytes")
            t = _Table(read_table_info(self.conn, name)) if is_crr(self.conn, name) else None
            self.tables[name] = t
        if t is None:
            raise MergeError(f"could not find the schema information for table {name}")
        return t

    def _row(self, table: _Table, pk_blob: Any) -> _Row:
        cache_key = (table.info.name, pk_blob)
        row = self.rows.get(cache_key)
        if row is not None:
            return row
        if not isinstance(pk_blob, bytes):
            raise MergeError(f"pk must be a blob, not {type(pk_blob).__name__}")
        try:
            pk = unpack_pk(pk_blob)
        except PackError as exc:
            raise MergeError(f"malformed pk for table {table.info.name}: {exc}") from None
        if len(pk) != table.npk:
            raise MergeError(
                f"pk for table {table.info.name} has {len(pk)} columns, expected {table.npk}"
            )
        # A reused cursor (a new one per statement costs as much as the lookup), whose
        # statements always run to completion (fetchall), so that none is left active.
        cursor = self.cursor
        # One statement for most rows: a batch tends to be all new rows (a fresh replica) or
        # all known ones, so try first what the previous row needed.
        inserted: Any = (
            cursor.execute(table.insert_key, pk).fetchall() if self.last_key_was_new else []
        )
        if inserted:
            key, versions = inserted[0][0], {}
        else:
            found: Any = cursor.execute(table.select_clocks, pk).fetchall()
            versions = dict(found)
            key = versions.pop(None, None)
            if key is None:  # no key yet: the INSERT returns it
                inserted = cursor.execute(table.insert_key, pk).fetchall()
                key = inserted[0][0]
        self.last_key_was_new = bool(inserted)
        row = _Row(table, pk, key, versions)
        self.rows[cache_key] = row
        return row

    def _ordinal(self, site: bytes | None) -> int:
        if not site:
            return 0
        ordinal = self.site_ordinals.get(site)
        if ordinal is None:
            inserted = self.conn.execute(
                "INSERT INTO crsql_site_id (site_id) VALUES (?) RETURNING ordinal", (site,)
            ).fetchone()
            assert inserted is not None  # INSERT ... RETURNING returns the row
            ordinal = inserted[0]
            self.site_ordinals[site] = ordinal
            self.ordinal_sites[ordinal] = site
        return ordinal

    def _current_value(self, row: _Row, idx: int) -> Any:
        """The column's value as the row holds it now: what this batch set (or a default after
        a delete in it) as the column would store it, since upstream compares a later change
        with the stored value (a TEXT column stores the integer 5 as '5')."""
        table = row.table
        if idx in row.values:
            return self._as_stored(table, idx, row.values[idx])
        if row.base_deleted:
            # rebuilt from defaults after a delete in this batch
            return self._as_stored(table, idx, self._default(table, idx))
        if row.stored is False:
            assert table.select_row is not None  # idx is a non-pk column, so the table has one
            row.stored = self.conn.execute(table.select_row, row.pk).fetchone()
        if row.stored is None:
            raise MergeError(f"could not find row to merge with for table {table.info.name}")
        return row.stored[idx]

    def _as_stored(self, table: _Table, idx: int, val: Any) -> Any:
        """``val`` converted by the column's affinity, as SQLite itself converts it (by storing
        it in a temp table's column of that affinity; only a tie on col_version with a value
        this batch set, which is rare, gets here)."""
        if table.affinities is None:
            table.affinities = _affinities(self.conn, table.info)
        affinity = table.affinities[idx]
        if affinity is None or val is None or type(val) in _UNCONVERTED[affinity]:
            return val
        conn = self.conn
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS crsql_merge_affinity "
            "(TEXT TEXT, NUMERIC NUMERIC, INTEGER INTEGER, REAL REAL)"
        )
        stored = conn.execute(
            f"INSERT INTO temp.crsql_merge_affinity ({affinity}) VALUES (?) RETURNING {affinity}",
            (val,),
        ).fetchall()[0][0]
        conn.execute("DELETE FROM temp.crsql_merge_affinity")
        return stored

    def _default(self, table: _Table, idx: int) -> Any:
        col = table.info.non_pks[idx]
        if col.name not in table.defaults:
            table.defaults[col.name] = (
                next(self.conn.execute(f"SELECT {col.default}"))[0]
                if col.default is not None
                else None
            )
        return table.defaults[col.name]

    # -- the rules -----------------------------------------------------------------------

    def _stamp(self, dbv: int) -> int:
        if self.version is not None:
            self.state.pending = self.version
            return self.version
        return self.state.next_db_version(dbv)

    def _set_clock(self, row: _Row, col: str, cv: int, dbv: int, site: Any, seq: int) -> None:
        row.versions[col] = cv
        row.written[col] = (row.key, col, cv, self._stamp(dbv), self._ordinal(site), seq)

    def _site_seq(self, row: _Row, col: str) -> tuple[int, int]:
        """The site ordinal and seq of the row's clock ``col`` as it stands now: as this batch
        wrote it, else as the database holds it (read once per row, on first need)."""
        clock = row.written.get(col)
        if clock is not None:
            return clock[_SITE], clock[_SEQ]
        if row.sites is None:
            found: Any = self.conn.execute(row.table.select_sites, (row.key,)).fetchall()
            row.sites = {name: (site, seq) for name, site, seq in found}
        return row.sites[col]

    def _resurrect(self, row: _Row, sentinel_cv: int, dbv: int, site: Any, seq: int) -> None:
        row.base_ensure = True
        zeroed = [c for c in row.versions if c != SENTINEL]
        if zeroed:
            version = self._stamp(dbv)
            for c in zeroed:
                row.written[c] = (row.key, c, 0, version, *self._site_seq(row, c))
                row.versions[c] = 0
        self._set_clock(row, SENTINEL, sentinel_cv, dbv, site, seq)

    def _invalid(self, change: Any, compact: CompactChanges | None = None) -> MergeError:
        """Say precisely what is wrong with a change that failed the fast checks (a row of
        ``compact``, when given)."""
        if compact is not None:
            change = compact.expand(change)
        try:
            table_name, _pk, cid, _val, cv, dbv, site, cl, seq = change
        except (TypeError, ValueError):
            return MergeError("a change has exactly nine fields")
        table = self._table(table_name)
        if type(cid) is not str:
            return MergeError(f"cid must be text, not {type(cid).__name__}")
        for field, v in (("col_version", cv), ("db_version", dbv), ("cl", cl), ("seq", seq)):
            if type(v) is not int:
                return MergeError(f"{field} must be an integer, not {type(v).__name__}")
        if site is not None:
            if not isinstance(site, bytes):
                return MergeError(f"site_id must be a blob, not {type(site).__name__}")
            if len(site) > MAX_SITE_ID_BYTES:
                return MergeError("site_id is longer than 16 bytes")
        if len(cid.encode()) > MAX_NAME_BYTES:
            return MergeError("cid is longer than 2048 bytes")
        return MergeError(f"table {table.info.name} has no column {cid!r} to merge into")

    def _check_size(self, val: str | bytes) -> None:
        size = len(val.encode("utf-8")) if isinstance(val, str) else len(val)
        if size > self.max_length:
            raise MergeError(
                f"value of {size} bytes is larger than this database's limit of "
                f"{self.max_length} bytes"
            )

    def apply(self, change: Any) -> None:
        """Merge one change into the in-memory batch."""
        self.apply_all((change,), flush=False)

    def _value_wins(self, row: _Row, idx: int, val: Any, cid: str, site: Any) -> bool:
        """Equal col_version: the greater value wins; equal values keep the local one unless
        merge-equal-values breaks the tie by site id."""
        cmp = compare_values(val, self._current_value(row, idx))
        if cmp == 0 and self.state.merge_equal_values:
            local_ordinal = self._site_seq(row, cid)[0]
            local_site = (
                self.state.site_id if local_ordinal == 0 else self.ordinal_sites.get(local_ordinal)
            )
            cmp = _compare_bytes(site or b"", local_site or b"")
        return cmp > 0

    # -- writing out -------------------------------------------------------------------

    def _quiet(self) -> bool:
        """Whether the base writes of a flush may run with triggers off, a setting of the whole
        connection: every trigger in the database is one of ours, which do nothing while the
        sync bit is set (a CRR's own, ``<table>__crsql_*``, and crsql_fract_as_ordered's,
        ``__crsql_*``). A user's trigger anywhere keeps them on: a merge fires it in cr-sqlite,
        on the CRR itself or on a table a foreign key's cascade from the CRR writes."""
        if self.quiet is None:
            self.quiet = all(
                name.startswith((table + TRIGGER_INFIX, TRIGGER_INFIX))
                for schema in ("main.sqlite_schema", "temp.sqlite_schema")
                for name, table in self.conn.execute(
                    f"SELECT name, tbl_name FROM {schema} WHERE type = 'trigger'"
                )
            )
        return self.quiet

    def flush(self) -> None:
        if not self.rows:
            return
        conn = self.conn
        by_clock: dict[str, list[Any]] = {}  # clock table -> flat (key, col, cv, dbv, site, seq)*
        clear_by_clock: dict[str, list[tuple[Any, ...]]] = {}
        replaced_by_clock: dict[str, list[int]] = {}
        # Base-table writes, grouped by statement. Deletes go first: a row deleted and then
        # rebuilt in this batch is written back by its upsert below.
        deletes: dict[_Table, list[tuple[Any, ...]]] = {}
        upserts: dict[tuple[_Table, tuple[int, ...]], list[Any]] = {}
        # rows of a batch mostly share their table and columns: keep the last lists at hand
        last_clock: str | None = None
        last_group: tuple[_Table, tuple[int, ...]] | None = None
        clock_flat: list[Any] = []
        base_flat: list[Any] = []
        replaced: list[int] = []
        for row in self.rows.values():
            table = row.table
            written = row.written
            if written:  # (a row cleared or replaced has written clocks)
                clock = table.clock
                if clock is not last_clock:
                    clock_flat = by_clock.setdefault(clock, [])
                    replaced = replaced_by_clock.setdefault(clock, [])
                    last_clock = clock
                if row.cleared:
                    clear_by_clock.setdefault(clock, []).append((row.key,))
                elif row.had_clocks and len(written) == len(row.versions):
                    # Every clock of the key is rewritten: deleting them in one range and
                    # inserting them anew costs less than updating each in place (index entries
                    # included).
                    replaced.append(row.key)
                # each entry: key, col_name, col_version, db_version, site, seq (a tuple added
                # to a list is copied in one step: cheaper than chaining the row's entries)
                for entry in written.values():
                    clock_flat += entry
            if row.base_deleted:
                deletes.setdefault(table, []).append(row.pk)
            values = row.values
            if values or row.base_ensure:
                # columns as set; rows of one batch mostly agree, sharing a statement
                group = (table, tuple(values))
                if group != last_group:
                    base_flat = upserts.setdefault(group, [])
                    last_group = group
                base_flat += row.pk
                base_flat += values.values()  # in the order of the group's columns
        state = self.state
        # Each base row written fires our triggers (one per column updated), whose WHEN clause
        # is false while the sync bit is set; switching triggers off for a large flush saves
        # running them (turning the setting off and on re-prepares the connection's statements,
        # which only a large flush repays).
        quiet = len(self.rows) >= QUIET_TRIGGERS_ROWS and self._quiet()
        if quiet:
            quiet = conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1) == 1
        state.sync_bit = 1
        try:
            if quiet:
                conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
            for table, pks in deletes.items():
                conn.executemany(table.delete_row, pks)
            for (table, cols), flat in upserts.items():
                head, tail = table.upsert_sql(cols)
                _write_rows(conn, head, tail, flat, table.npk + len(cols))
        finally:
            state.sync_bit = 0
            if quiet:
                conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1)
        for clock, keys in clear_by_clock.items():
            conn.executemany(
                f"DELETE FROM {clock} WHERE key = ? AND col_name != '{SENTINEL}'", keys
            )
        for clock, replaced in replaced_by_clock.items():
            for i in range(0, len(replaced), ROWS_PER_STATEMENT):
                chunk = replaced[i : i + ROWS_PER_STATEMENT]
                in_list = placeholders(len(chunk))
                conn.execute(f"DELETE FROM {clock} WHERE key IN ({in_list})", chunk)
        for clock, flat in by_clock.items():
            # an upsert updates an existing clock row in place; OR REPLACE would delete and
            # re-insert it (and its index entry), which costs twice as much
            _write_rows(
                conn,
                f"INSERT INTO {clock} (key, col_name, col_version, db_version, site_id, seq) "
                "VALUES ",
                " ON CONFLICT (key, col_name) DO UPDATE SET col_version = excluded.col_version, "
                "db_version = excluded.db_version, site_id = excluded.site_id, seq = excluded.seq",
                flat,
                6,
            )
        self.rows.clear()

    def apply_all(
        self,
        changes: Iterable[Sequence[Any]],
        *,
        flush: bool = True,
        compact: CompactChanges | None = None,
    ) -> int:
        """Merge ``changes`` into the in-memory batch, flushing every FLUSH_ROWS touched rows
        (and at the end with ``flush``); return the rows impacted so far. With ``compact``,
        ``changes`` are its eight-field rows (``CompactChanges``).

        The hot loop of every merge, kept flat: the rules run inline on locals, the row of the
        previous change is reused when the next one names the same objects (a row's changes
        arrive together), and only deletes and resurrections call out."""
        rows = self.rows
        rows_get = rows.get
        state = self.state
        version = self.version
        ordinals_get = self.site_ordinals.get
        max_value_chars = self.max_value_chars
        # the types _check_size checks, as a set: testing a type not in it compares no types
        sized = frozenset((str, bytes))
        type_, int_ = type, int  # as locals: cheaper to load than builtins, per change
        last_table: Any = None
        last_pk: Any = None
        row: _Row | None = None
        # the row's state, refreshed whenever the row changes, or after a delete or resurrection
        # (which set row to None)
        col_index: dict[str, int] = {}
        versions: dict[str, int] = {}
        values: dict[int, Any] = {}
        written: dict[str, tuple[Any, ...]] = {}
        row_key = local_cl = 0
        last_site: Any = None
        last_ordinal = 0
        checked_site: Any = None  # the last site id found valid (changes share the object)
        won = seen = 0
        # rows a decoder checked (CompactChanges.checked): their types are not tested again
        unchecked = compact is None or not compact.checked
        if compact is not None:
            compact_site, compact_dbv = compact.site, compact.db_version
        # the version state, in locals between the calls out that stamp versions themselves:
        # top is the floor of the next stamp, max(db_version + 1, pending), as next_db_version
        pending = state.pending
        top = max(pending, state.db_version + 1)
        try:
            for change in changes:
                seen += 1
                try:
                    if compact is None:
                        table_name, pk_blob, cid, val, cv, dbv, site, cl, seq = change
                    else:
                        table_name, pk_blob, cid, val, cv, site, cl, seq = change
                        dbv = compact_dbv
                        if site is None:
                            site = compact_site
                except (TypeError, ValueError):
                    raise MergeError(
                        "a change has exactly nine fields"
                        if compact is None
                        else "a compact change has exactly eight fields"
                    ) from None
                # the previous change's row when this one names the same objects (changes read
                # from a database share them) or equal ones (decoded rows do not)
                if (
                    row is None
                    or (pk_blob is not last_pk and pk_blob != last_pk)
                    or (table_name is not last_table and table_name != last_table)
                ):
                    row = rows_get((table_name, pk_blob))
                    if row is None:
                        if len(rows) >= FLUSH_ROWS:
                            self.flush()
                        row = self._row(self._table(table_name), pk_blob)
                    last_table, last_pk = table_name, pk_blob
                    col_index = row.table.col_index
                    versions, values, written = row.versions, row.values, row.written
                    row_key = row.key
                    sentinel = versions.get(SENTINEL)
                    local_cl = sentinel if sentinel is not None else (1 if versions else 0)
                try:
                    idx = col_index[cid]
                except KeyError:  # (an unhashable cid raises TypeError, as ever)
                    raise self._invalid(change, compact) from None
                if unchecked and (
                    type_(cv) is not int_
                    or type_(dbv) is not int_
                    or type_(cl) is not int_
                    or type_(seq) is not int_
                ):
                    raise self._invalid(change, compact)
                if site is not None and site is not checked_site:
                    if type(site) is not bytes or len(site) > MAX_SITE_ID_BYTES:
                        raise self._invalid(change, compact)
                    checked_site = site
                if type_(val) in sized and len(val) > max_value_chars:
                    self._check_size(val)

                if cl == local_cl and cl & 1 and idx >= 0:
                    # the usual change: a column of a live row, at the row's causal length
                    local_cv = versions.get(cid)
                    if local_cv is not None:
                        if cv < local_cv:
                            continue
                        if cv == local_cv and not self._value_wins(row, idx, val, cid, site):
                            continue
                else:
                    if cl < local_cl:
                        continue
                    if cl & 1 == 0:
                        if cl == local_cl:
                            continue
                        row.base_deleted = True
                        row.base_ensure = False
                        row.values.clear()
                        row.versions = {}
                        row.written = {}
                        row.cleared = True
                        state.pending = pending
                        self._set_clock(row, SENTINEL, cv, dbv, site, seq)
                        pending = state.pending
                        top = max(pending, state.db_version + 1)
                        won += 1
                        row = None
                        continue
                    if idx == -1:
                        if cl == local_cl:
                            continue
                        state.pending = pending
                        self._resurrect(row, cv, dbv, site, seq)
                        pending = state.pending
                        top = max(pending, state.db_version + 1)
                        won += 1
                        row = None
                        continue
                    # a column change with a larger causal length
                    if local_cl != 0 or cl > 1:
                        state.pending = pending
                        self._resurrect(row, cl, dbv, site, seq)
                        pending = state.pending
                        top = max(pending, state.db_version + 1)
                        won += 1
                        local_cl = cl  # the sentinel's col_version now
                    else:  # the row's first clock: no longer a row without any
                        sentinel = versions.get(SENTINEL)
                        local_cl = sentinel if sentinel is not None else 1
                values[idx] = val
                # _set_clock, inlined: this runs once per winning change
                if version is None:
                    nd = top if top > dbv else dbv
                    top = nd
                else:
                    nd = version
                pending = nd
                if not site:
                    ordinal = 0
                elif site is last_site:
                    ordinal = last_ordinal
                else:
                    found = ordinals_get(site)
                    ordinal = self._ordinal(site) if found is None else found
                    last_site, last_ordinal = site, ordinal
                versions[cid] = cv
                written[cid] = (row_key, cid, cv, nd, ordinal, seq)
                won += 1
            state.pending = pending  # (on an error, the caller restores the whole state)
        finally:
            self.impacted += won
            self.seen += seen
        if flush:
            self.flush()
        return self.impacted


# value types each affinity stores unchanged (bytes and None: every affinity)
_UNCONVERTED: dict[str, tuple[type, ...]] = {
    "TEXT": (str, bytes),
    "NUMERIC": (int, bytes),
    "INTEGER": (int, bytes),
    "REAL": (float, bytes),
}


def _affinities(conn: apsw.Connection, info: TableInfo) -> list[str | None]:
    """Each non-pk column's affinity by SQLite's rules for its declared type (None: BLOB, or
    ANY in a STRICT table, which convert nothing)."""
    row = conn.execute(
        "SELECT strict FROM pragma_table_list WHERE name = ?", (info.name,)
    ).fetchone()
    strict = bool(row and row[0])
    out: list[str | None] = []
    for col in info.non_pks:
        t = col.decl_type.upper()
        if "INT" in t:
            out.append("INTEGER")
        elif "CHAR" in t or "CLOB" in t or "TEXT" in t:
            out.append("TEXT")
        elif "BLOB" in t or not t or (strict and t == "ANY"):
            out.append(None)
        elif "REAL" in t or "FLOA" in t or "DOUB" in t:
            out.append("REAL")
        else:
            out.append("NUMERIC")
    return out


def _write_rows(conn: apsw.Connection, head: str, tail: str, flat: list[Any], width: int) -> None:
    """Run ``head VALUES (...), (...) tail`` over ``flat``, rows of ``width`` values laid end to
    end, up to ROWS_PER_STATEMENT rows a statement: stepping one statement per row costs about
    as much as the row's B-tree writes."""
    rows = len(flat) // width
    per = max(1, min(ROWS_PER_STATEMENT, conn.limit(apsw.SQLITE_LIMIT_VARIABLE_NUMBER) // width))
    one = "(" + placeholders(width) + ")"
    full = rows // per
    if full:
        size = per * width
        conn.executemany(
            head + ", ".join([one] * per) + tail,
            [flat[i : i + size] for i in range(0, full * size, size)],
        )
    rest = rows - full * per
    if rest:
        conn.execute(head + ", ".join([one] * rest) + tail, flat[full * per * width :])


def _as_merge_error(exc: BaseException) -> BaseException:
    """SQLite's refusals of a change's values (caught when they are bound or written, which
    costs nothing per change), restated as a MergeError; anything else unchanged."""
    if isinstance(exc, OverflowError):
        return MergeError(f"an integer in a change does not fit in 64 bits ({exc})")
    if isinstance(exc, TypeError) and "binding" in str(exc):
        return MergeError(
            "change values must be NULL, integers, reals, text or blobs "
            f"(SQLite refused one: {exc})"
        )
    if isinstance(exc, apsw.TooBigError):
        # a value just under the length limit passes _check_size, but its row does not fit
        return MergeError(f"a change's row is larger than this database's length limit ({exc})")
    if isinstance(exc, apsw.MismatchError):
        return MergeError(
            "a primary-key value does not fit its column (an INTEGER PRIMARY KEY takes integers "
            f"only): {exc}"
        )
    return exc


@contextmanager
def _undone_on_error(state: CrrState) -> Iterator[None]:
    """On any error, put the connection's in-memory version state back as it was (the database
    side is undone by the caller's savepoint or statement journal) and restate SQLite's value
    refusals as MergeError."""
    snap = state.snapshot()
    try:
        yield
    except BaseException as exc:
        state.restore(snap)
        state.sync_bit = 0
        mapped = _as_merge_error(exc)
        if mapped is not exc:
            raise mapped from exc
        raise


_DB_VERSION = operator.itemgetter(5)  # a change's db_version


def _compare_bytes(a: bytes, b: bytes) -> int:
    return 0 if a == b else (-1 if a < b else 1)


def merge(conn: apsw.Connection, state: CrrState, changes: Iterable[tuple[Any, ...]]) -> int:
    """Merge ``changes`` in one transaction (a savepoint when one is open); return rows impacted."""
    outermost = conn.get_autocommit()
    commits = state.commits
    with _undone_on_error(state), conn, gc_paused():
        merger = Merger(conn, state)
        impacted = merger.apply_all(changes)
        state.rows_impacted += impacted
    if outermost and merger.seen and state.commits == commits:
        # Nothing was written, so SQLite ran no commit hook; in cr-sqlite every merged change is
        # a write to its virtual table, whose commit always runs the hook (db_version := pending,
        # here -1, so it is reloaded from the clocks). Keep the same observable version.
        state.on_commit()
    return impacted


def _top_db_version(changes: list[Any]) -> int:
    """The largest integer db_version of ``changes`` (0: none)."""
    try:  # in C for the usual all-integer changes
        top = max(map(_DB_VERSION, changes), default=0)
    except TypeError:
        top = None
    if type(top) is not int:
        top = max((c[5] for c in changes if type(c[5]) is int), default=0)
    return top


def merge_changesets(
    conn: apsw.Connection, state: CrrState, changesets: Iterable[Iterable[tuple[Any, ...]]]
) -> list[int | None]:
    """Merge several changesets inside the caller's transaction, each stamped with a local
    db_version of its own (larger than any before it); return that version per changeset, or
    None when nothing in it won.

    This is the agent's apply path: a node must later be able to serve "version v of actor a"
    to a peer, and reads it back as the clock rows at the version recorded for it. Plain
    ``merge`` would give every change of a batch the same running-maximum version and mix
    changesets together. For the same reason the first changeset starts past the transaction's
    pending version when a local write or an earlier call already stamped rows with it.
    """
    out: list[int | None] = []
    with _undone_on_error(state), gc_paused():
        merger = Merger(conn, state)
        floor = state.pending + 1 if state.pending != -1 else 0
        for changes in changesets:
            rows: Sequence[Sequence[Any]]
            if type(changes) is CompactChanges:
                compact: CompactChanges | None = changes
                rows, top = changes.rows, changes.db_version
                if type(top) is not int:
                    raise MergeError(f"db_version must be an integer, not {type(top).__name__}")
                if type(changes.site) is not bytes or len(changes.site) > MAX_SITE_ID_BYTES:
                    raise MergeError(
                        "a compact changeset's site id must be a blob of 16 bytes or less"
                    )
            else:
                compact = None
                rows = list(changes)
                top = _top_db_version(rows)
            version = max(state.db_version + 1, state.pending, top, floor)
            merger.version = version
            before = merger.impacted
            merger.apply_all(rows, flush=False, compact=compact)
            if merger.impacted > before:
                out.append(version)
                floor = version + 1
            else:
                out.append(None)
        merger.flush()
        state.rows_impacted += merger.impacted
    return out


def merge_one_in_statement(conn: apsw.Connection, state: CrrState, change: tuple[Any, ...]) -> int:
    """Merge one change inside a running statement (``INSERT INTO crsql_changes``): no savepoint
    of our own, since SQLite's statement journal already undoes the statement on error."""
    with _undone_on_error(state):
        merger = Merger(conn, state)
        merger.apply(change)
        merger.flush()
    state.rows_impacted += merger.impacted
    return merger.impacted
