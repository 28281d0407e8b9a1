"""Turning tables into CRRs and back, and altering them (``crsql_as_crr``, ``crsql_as_table``,
``crsql_begin_alter`` / ``crsql_commit_alter``), as cr-sqlite 0.16.3 does.

``as_crr`` is idempotent (a table whose insert trigger exists is already a CRR). It creates the
clock table ``<t>__crsql_clock`` and the lookaside ``<t>__crsql_pks`` (one row per pk tuple ever
seen; only compaction removes them), the three triggers, and backfills clocks for existing rows at
the *next* db_version. ``commit_alter`` compacts clocks of dropped columns and vanished rows,
pins ``pre_compact_dbversion`` so the version cannot regress, and backfills at the *current*
version only what differs from column defaults, so a migration run on every node does not create
a fleet-wide change storm.
"""

from __future__ import annotations

from typing import Any, cast

import apsw

from . import triggers
from .sqlutil import ident, idents, literal, placeholders
from .state import CrrState
from .tableinfo import (
    SENTINEL,
    TableInfo,
    check_compatible,
    is_crr,
    read_table_info,
)

DBV_INDEX_SUFFIX = "__crsql_clock_dbv_idx"
# Upstream indexes db_version alone. With seq as well, reading changes in (db_version, seq)
# order -- what every sync does -- walks the index instead of sorting (~12% faster reads); with
# col_version and site_id too, the index covers the clock's columns that a read needs besides
# the key, so it does not look each row up in the clock table (~20% faster reads). Writes cost
# the same: every clock write sets db_version and seq, so rewrites its index entry anyway.
DBV_INDEX_COLUMNS = ["db_version", "seq", "col_version", "site_id"]
_DBV_INDEX_SQL = (
    'CREATE INDEX IF NOT EXISTS {index} ON {clock} ("db_version", "seq", "col_version", "site_id")'
)


def ensure_dbv_index(conn: apsw.Connection, info: TableInfo) -> None:
    """Upgrade a clock's index made by upstream or an earlier release, (db_version) or
    (db_version, seq), to DBV_INDEX_COLUMNS."""
    name = info.name + DBV_INDEX_SUFFIX
    cols = [r[0] for r in conn.execute("SELECT name FROM pragma_index_info(?)", (name,))]
    if cols != DBV_INDEX_COLUMNS:
        conn.execute(f"DROP INDEX IF EXISTS {ident(name)}")
        conn.execute(_DBV_INDEX_SQL.format(index=ident(name), clock=info.clock))


def _clock_ddl(info: TableInfo) -> list[str]:
    pk_cols = idents(info.pk_names)
    return [
        f"CREATE TABLE IF NOT EXISTS {info.clock} ("
        "key INTEGER NOT NULL, col_name TEXT NOT NULL, col_version INTEGER NOT NULL, "
        "db_version INTEGER NOT NULL, site_id INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL, "
        "PRIMARY KEY (key, col_name)) WITHOUT ROWID, STRICT",
        _DBV_INDEX_SQL.format(index=ident(info.name + DBV_INDEX_SUFFIX), clock=info.clock),
        f"CREATE TABLE IF NOT EXISTS {info.pks_table} (__crsql_key INTEGER PRIMARY KEY, {pk_cols})",
        f"CREATE UNIQUE INDEX IF NOT EXISTS {ident(info.name + '__crsql_pks_pks')} "
        f"ON {info.pks_table} ({pk_cols})",
    ]


def drop_triggers(conn: apsw.Connection, table: str) -> None:
    """Drop every CRR trigger of ``table`` (named ``<t>__crsql_*``)."""
    prefix = triggers.trigger_prefix(table)
    names = [
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,)
        )
        if name.startswith(prefix)
    ]
    for name in names:
        conn.execute(f"DROP TRIGGER IF EXISTS {ident(name)}")


def create_triggers(conn: apsw.Connection, info: TableInfo) -> None:
    drop_triggers(conn, info.name)
    for sql in triggers.create_triggers_sql(info):
        conn.execute(sql)


def _stored_form(create_sql: str) -> str:
    """A generated ``CREATE TRIGGER`` as sqlite_master keeps it (SQLite drops IF NOT EXISTS)."""
    return create_sql.replace("CREATE TRIGGER IF NOT EXISTS ", "CREATE TRIGGER ", 1)


def upgrade_triggers(conn: apsw.Connection) -> list[str]:
    """Recreate the triggers of every CRR whose stored trigger SQL is not what this release
    generates; return those tables. Run on every writable open, so a database written by an
    earlier release picks up fixed triggers (e.g. SQL that older SQLite could not parse, which
    made the whole file unreadable to the sqlite3 shell). When nothing differs it only reads
    sqlite_master and each CRR's table_info."""
    stored: dict[str, list[str]] = {}
    crrs: list[str] = []
    rows = conn.execute(
        "SELECT tbl_name, name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY rowid"
    ).fetchall()
    for table, name, sql in cast("list[tuple[str, str, str]]", rows):
        if not name.startswith(triggers.trigger_prefix(table)):
            continue
        stored.setdefault(table, []).append(sql)
        if name == table + "__crsql_itrig":
            crrs.append(table)
    upgraded = []
    for table in crrs:
        info = read_table_info(conn, table)
        want = [_stored_form(sql) for sql in triggers.create_triggers_sql(info)]
        if sorted(want) != sorted(stored[table]):
            create_triggers(conn, info)
            upgraded.append(table)
    return upgraded


def as_crr(conn: apsw.Connection, state: CrrState, table: str) -> str:
    with conn:  # SAVEPOINT: all or nothing
        info = check_compatible(conn, table)
        if is_crr(conn, table):
            ensure_dbv_index(conn, info)
            return "OK"
        for sql in _clock_ddl(info):
            conn.execute(sql)
        create_triggers(conn, info)
        backfill(conn, state, info, commit_alter=False)
    return "OK"


def as_table(conn: apsw.Connection, table: str) -> None:
    """Downgrade a CRR to a plain table: drop its triggers, clock and lookaside tables. Returns
    NULL in SQL, as upstream does."""
    with conn:
        drop_triggers(conn, table)
        conn.execute(f"DROP TABLE IF EXISTS {ident(table + '__crsql_clock')}")
        conn.execute(f"DROP TABLE IF EXISTS {ident(table + '__crsql_pks')}")


def backfill(
    conn: apsw.Connection, state: CrrState, info: TableInfo, *, commit_alter: bool
) -> None:
    """Give clocks to rows (and columns) that have none.

    Rows missing from the lookaside get a key and a clock for every non-pk column (a pk-only table:
    a sentinel), in ``EXCEPT`` order, all at one version: the next one for ``as_crr``, the current
    one for ``commit_alter``. Then rows that have a key but lack a clock for some column get one
    where the value differs from the column's default (NULL when it has none).
    """
    pk_cols = idents(info.pk_names)
    new_rows = conn.execute(
        f"SELECT {pk_cols} FROM {info.quoted} EXCEPT SELECT {pk_cols} FROM {info.pks_table}"
    ).fetchall()
    version: int | None = None

    def stamp() -> int:
        nonlocal version
        if version is None:
            version = state.current_db_version() if commit_alter else state.next_db_version()
        return version

    select_key = f"SELECT __crsql_key FROM {info.pks_table} WHERE " + " AND ".join(
        f"{ident(c)} = ?" for c in info.pk_names
    )
    insert_key = (
        f"INSERT INTO {info.pks_table} ({pk_cols}) VALUES ({placeholders(len(info.pks))}) "
        "RETURNING __crsql_key"
    )
    insert_clock = (
        f"INSERT OR IGNORE INTO {info.clock} (key, col_name, col_version, db_version, seq) "
        "VALUES (?, ?, 1, ?, ?)"
    )

    def key_for(pk: tuple[Any, ...]) -> int:
        row = conn.execute(select_key, pk).fetchone()
        if row is None:
            row = conn.execute(insert_key, pk).fetchone()
            assert row is not None  # INSERT ... RETURNING returns the row
        return cast(int, row[0])

    col_names = info.non_pk_names or (SENTINEL,)
    clocks = []
    for pk in new_rows:
        key = key_for(pk)
        for cid in col_names:
            clocks.append((key, cid, stamp(), state.bump_seq()))
    if clocks:
        conn.executemany(insert_clock, clocks)

    on = " AND ".join(f"t1.{ident(c)} = t2.{ident(c)}" for c in info.pk_names)
    for col in info.non_pks:
        # values equal to the column's default (NULL without one) need no clock: a peer that
        # adds the same column already holds them
        default = col.default if col.default is not None else "NULL"
        cond = f" AND t1.{ident(col.name)} IS NOT {default}"
        missing = conn.execute(
            f"SELECT t2.__crsql_key FROM {info.quoted} AS t1 JOIN {info.pks_table} AS t2 ON {on} "
            f"LEFT JOIN {info.clock} AS t3 ON t3.key = t2.__crsql_key AND t3.col_name = ? "
            f"WHERE t3.key IS NULL{cond}",
            (col.name,),
        ).fetchall()
        if missing:
            conn.executemany(
                insert_clock, [(key, col.name, stamp(), state.bump_seq()) for (key,) in missing]
            )


def begin_alter(conn: apsw.Connection, table: str) -> str:
    conn.execute("SAVEPOINT alter_crr")
    drop_triggers(conn, table)
    return "OK"


def _pk_set_changed(conn: apsw.Connection, info: TableInfo) -> bool:
    indexed = [
        r[0]
        for r in conn.execute(
            f"SELECT name FROM pragma_index_info({literal(info.name + '__crsql_pks_pks')})"
        )
    ]
    return sorted(indexed) != sorted(info.pk_names)


def commit_alter(conn: apsw.Connection, state: CrrState, table: str) -> None:
    try:
        state.fill_db_version_if_needed()
        current = state.db_version
        info = read_table_info(conn, table)
        if _pk_set_changed(conn, info):
            conn.execute(f"DROP TABLE IF EXISTS {info.clock}")
            conn.execute(f"DROP TABLE IF EXISTS {info.pks_table}")
        else:
            compact(conn, info)
        conn.execute(
            "INSERT OR REPLACE INTO crsql_master (key, value) VALUES ('pre_compact_dbversion', ?)",
            (current,),
        )
        info = check_compatible(conn, table)
        for sql in _clock_ddl(info):
            conn.execute(sql)
        create_triggers(conn, info)
        backfill(conn, state, info, commit_alter=True)
        state.invalidate_db_version()
    except BaseException:
        conn.execute("ROLLBACK TO alter_crr")
        conn.execute("RELEASE alter_crr")
        state.invalidate_db_version()
        raise
    conn.execute("RELEASE alter_crr")
    return None  # NULL in SQL, as upstream


def compact(conn: apsw.Connection, info: TableInfo) -> None:
    """Drop clocks of removed columns and of rows gone from the table (keeping tombstones), then
    lookaside rows left without any clock."""
    conn.execute(
        f"DELETE FROM {info.clock} WHERE col_name NOT IN "
        f"(SELECT name FROM pragma_table_info({literal(info.name)}) UNION SELECT '{SENTINEL}')"
    )
    on = " AND ".join(
        f"{info.quoted}.{ident(c)} = {info.pks_table}.{ident(c)}" for c in info.pk_names
    )
    conn.execute(
        f"DELETE FROM {info.clock} WHERE (col_name != '{SENTINEL}' OR col_version % 2 != 0) "
        f"AND NOT EXISTS (SELECT 1 FROM {info.quoted} JOIN {info.pks_table} ON {on} "
        f"WHERE {info.clock}.key = {info.pks_table}.__crsql_key LIMIT 1)"
    )
    conn.execute(
        f"DELETE FROM {info.pks_table} WHERE __crsql_key NOT IN (SELECT key FROM {info.clock})"
    )
