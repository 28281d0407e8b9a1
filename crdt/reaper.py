"""Collecting the metadata of deleted rows (tombstone GC).

A delete leaves its key's pk-lookaside row and the sentinel clock row (cid ``'-1'``, an even
causal length) forever: they are what makes a late, older change for that key lose. Once the
caller knows no such change can reach this node any more (``corrosion.core.tombstones`` decides
that from what every member holds), ``reap_tombstones`` deletes both, straight from the clock and
lookaside tables: no trigger fires, no change is recorded, no version is taken.

After a reap the key is unknown here, so a local insert of it would start again at causal
length 1, while a peer that has not reaped yet still holds the tombstone (cl ``c``) and would
ignore that insert: the nodes would disagree. So each table keeps a **floor**, the largest causal
length reaped from it, and a local transaction that creates keys in a table with a floor gives
them a sentinel of ``floor + 1`` (``mark_new_keys`` before, ``lift_new_keys`` after): odd, so
alive, and above every tombstone that can still exist for them, so a peer holding one
resurrects the row exactly as a peer that reaped it creates it. Tables never reaped have no
floor and their writes are unchanged (cr-sqlite's, bit for bit).

The floor lives in ``crsql_master`` (``tombstone_floor.<table>``). The reap also pins
``pre_compact_dbversion``: the db_version is derived from the clocks' maximum, and deleting the
newest tombstone must not take it backwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import apsw

from .sqlutil import ident, literal
from .state import CrrState
from .tableinfo import SENTINEL, crr_tables, is_crr, read_table_info

FLOOR_KEY = "tombstone_floor."


@dataclass
class Reaped:
    """What one ``reap_tombstones`` call collected: keys per table, clock rows deleted, and per
    table the db_version below which every tombstone up to the bound is now gone (the next
    call's ``after``)."""

    keys: dict[str, int] = field(default_factory=dict)
    clock_rows: int = 0
    scanned: dict[str, int] = field(default_factory=dict)

    @property
    def total_keys(self) -> int:
        return sum(self.keys.values())


def floors(conn: apsw.Connection) -> dict[str, int]:
    """Each table's floor: the largest causal length reaped from it (never reaped: absent)."""
    return {
        key[len(FLOOR_KEY) :]: int(value)
        for key, value in conn.execute(
            "SELECT key, value FROM crsql_master WHERE key LIKE ? ESCAPE '\\'",
            (FLOOR_KEY.replace("_", "\\_") + "%",),
        )
    }


def reap_tombstones(
    conn: apsw.Connection,
    state: CrrState,
    max_db_version: int,
    limit: int,
    after: dict[str, int] | None = None,
) -> Reaped:
    """Delete the lookaside and clock rows of up to ``limit`` deleted keys whose tombstone was
    stamped at a local db_version ``<= max_db_version`` (and above ``after[table]``: where the
    previous call had got to), in one transaction. A key whose base row exists (re-inserted
    since) or whose sentinel is odd is never touched: the candidates are chosen and deleted in
    the same transaction, so nothing can revive one in between."""
    out = Reaped()
    after = after or {}
    if limit <= 0:
        return out
    with conn:
        state.fill_db_version_if_needed()
        pinned = conn.execute(
            "SELECT CAST(value AS INTEGER) FROM crsql_master WHERE key = 'pre_compact_dbversion'"
        ).fetchone()
        if pinned is None or pinned[0] < state.db_version:
            conn.execute(
                "INSERT OR REPLACE INTO crsql_master (key, value) "
                "VALUES ('pre_compact_dbversion', ?)",
                (state.db_version,),
            )
        known = floors(conn)
        for table in crr_tables(conn):
            if limit <= 0:
                break
            info = read_table_info(conn, table)
            match = " AND ".join(f"b.{ident(c)} IS k.{ident(c)}" for c in info.pk_names)
            start = after.get(table, 0)
            # a range of the db_version index: a pass reads what is new since the last one
            rows = conn.execute(
                f"SELECT c.key, c.col_version, c.db_version FROM {info.clock} AS c "
                f"JOIN {info.pks_table} AS k ON k.__crsql_key = c.key "
                f"WHERE c.db_version > ? AND c.db_version <= ? "
                f"AND c.col_name = {literal(SENTINEL)} AND c.col_version % 2 = 0 "
                f"AND NOT EXISTS (SELECT 1 FROM {info.quoted} AS b WHERE {match}) "
                "ORDER BY c.db_version LIMIT ?",
                (start, max_db_version, limit),
            ).fetchall()
            # cut short by the limit: the last version read may have more, read it again
            full = len(rows) == limit
            out.scanned[table] = max(start, cast(int, rows[-1][2]) - 1) if full else max_db_version
            if not rows:
                continue
            keys = [(k,) for k, _cl, _v in rows]
            before = conn.total_changes()
            conn.executemany(f"DELETE FROM {info.clock} WHERE key = ?", keys)
            out.clock_rows += conn.total_changes() - before
            conn.executemany(f"DELETE FROM {info.pks_table} WHERE __crsql_key = ?", keys)
            floor = max(known.get(table, 0), *(int(cast(int, cl)) for _k, cl, _v in rows))
            conn.execute(
                "INSERT OR REPLACE INTO crsql_master (key, value) VALUES (?, ?)",
                (FLOOR_KEY + table, floor),
            )
            out.keys[table] = len(rows)
            limit -= len(rows)
    return out


def mark_new_keys(conn: apsw.Connection, table_floors: dict[str, int]) -> dict[str, int]:
    """Before a local transaction's statements: the highest lookaside key of each table with a
    floor (keys above it are created by the transaction). Tables this database does not have
    (dropped since, or a floor heard from a peer before the schema arrived) are skipped."""
    marks = {}
    for table in table_floors:
        if not is_crr(conn, table):
            continue
        info = read_table_info(conn, table)
        row = conn.execute(f"SELECT max(__crsql_key) FROM {info.pks_table}").fetchone()
        marks[table] = row[0] if row and row[0] is not None else 0
    return marks


def lift_new_keys(
    conn: apsw.Connection, state: CrrState, table_floors: dict[str, int], marks: dict[str, int]
) -> int:
    """After the statements, before the commit: give every key the transaction created in a
    table with a floor a sentinel of ``floor + 1`` (raising the ``1`` a pk-only table's insert
    wrote), and keep the floors (some may have been heard from peers: ``save_floors``). Returns
    the keys lifted. Only runs inside a write that already took a db_version."""
    lifted = 0
    if state.pending == -1:
        return 0
    save_floors(conn, {t: table_floors[t] for t in marks})
    for table, mark in marks.items():
        info = read_table_info(conn, table)
        cl = table_floors[table] + 1
        fresh = [
            k
            for (k,) in conn.execute(
                f"SELECT k.__crsql_key FROM {info.pks_table} AS k WHERE k.__crsql_key > ? "
                f"AND NOT EXISTS (SELECT 1 FROM {info.clock} AS c WHERE c.key = k.__crsql_key "
                f"AND c.col_name = {literal(SENTINEL)} AND c.col_version > 1) "
                f"AND EXISTS (SELECT 1 FROM {info.clock} AS c WHERE c.key = k.__crsql_key)",
                (mark,),
            )
        ]
        for key in fresh:
            conn.execute(
                f"INSERT INTO {info.clock} (key, col_name, col_version, db_version, seq, site_id) "
                f"VALUES (?, {literal(SENTINEL)}, ?, ?, ?, 0) ON CONFLICT (key, col_name) "
                "DO UPDATE SET col_version = excluded.col_version, "
                "db_version = excluded.db_version, seq = excluded.seq, site_id = 0",
                (key, cl, state.pending, state.bump_seq()),
            )
        lifted += len(fresh)
    return lifted


def save_floors(conn: apsw.Connection, table_floors: dict[str, int]) -> None:
    """Raise the stored floors to ``table_floors`` (a floor never goes down)."""
    for table, floor in table_floors.items():
        conn.execute(
            "INSERT INTO crsql_master (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
            "SET value = excluded.value WHERE CAST(value AS INTEGER) < excluded.value",
            (FLOOR_KEY + table, floor),
        )


def merge_floors(mine: dict[str, int], theirs: dict[str, int]) -> dict[str, int]:
    """The larger floor of each table."""
    out = dict(mine)
    for table, floor in theirs.items():
        if floor > out.get(table, 0):
            out[table] = floor
    return out
