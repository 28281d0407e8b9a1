"""Standard SQLite can read what the CRR engine writes: a database with CRRs of many shapes, after
every kind of write, opens in Python's stdlib ``sqlite3`` (whose SQLite may be as old as 3.37),
passes ``integrity_check`` and reads the same rows as apsw; a database whose triggers an earlier
release wrote is upgraded on open; a write through plain SQLite is refused and changes nothing."""

from __future__ import annotations

import sqlite3

import apsw
import pytest
from stdlib_readers import (
    check_parses_in_stdlib,
    read_everything,
    read_tables,
    store_pre_fix_utrig,
    stored_schema,
)

import crdt
from crdt.crr import upgrade_triggers
from crdt.schema import apply_schema

SCHEMA = """
CREATE TABLE ints (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER DEFAULT 0, c REAL, d BLOB);
CREATE INDEX ints_a ON ints (a);
CREATE TABLE texts (k TEXT PRIMARY KEY NOT NULL, v ANY);
CREATE TABLE blobs (k BLOB PRIMARY KEY NOT NULL, v TEXT);
CREATE TABLE composite (t TEXT NOT NULL, b BLOB NOT NULL, i INTEGER NOT NULL, x,
    y TEXT NOT NULL DEFAULT '', PRIMARY KEY (i, t, b));
CREATE TABLE pk_only (a INTEGER NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE strict_table (k TEXT PRIMARY KEY NOT NULL, n INTEGER) WITHOUT ROWID, STRICT;
CREATE TABLE "odd ""name"" t" ("the key" TEXT PRIMARY KEY NOT NULL, "va'l" TEXT);
CREATE TABLE rekeyed (id INTEGER PRIMARY KEY NOT NULL, v TEXT);
"""
# The alter paths: a column added to a CRR, a primary key changed (table rebuilt, clocks
# re-created).
ALTERED = SCHEMA.replace("v ANY);", "v ANY, w INTEGER DEFAULT 7);").replace(
    "CREATE TABLE rekeyed (id INTEGER PRIMARY KEY NOT NULL, v TEXT);",
    "CREATE TABLE rekeyed (id INTEGER NOT NULL, v TEXT NOT NULL DEFAULT '', PRIMARY KEY (id, v));",
)

WRITES = [
    "INSERT INTO ints (id, a, b, c, d) VALUES (1, 'one', 1, 1.5, x'00ff'), (2, 'two', 2, NULL, "
    "NULL), (3, 'three', 3, 3.25, x'')",
    "UPDATE ints SET a = 'uno', c = 1.75 WHERE id = 1",
    "UPDATE ints SET b = 2 WHERE id = 2",  # no change: no clock write
    "UPDATE ints SET id = 10 WHERE id = 1",  # pk change: clocks move
    "DELETE FROM ints WHERE id = 2",
    "INSERT INTO ints (id, a) VALUES (2, 'again')",  # re-insert after delete
    "INSERT OR REPLACE INTO ints (id, a) VALUES (3, 'replaced')",
    "UPDATE OR REPLACE ints SET id = 3 WHERE id = 10",  # pk change onto a live row
    "INSERT INTO texts VALUES ('a', 1), ('b', 'text'), ('c', x'01'), ('d', 2.5), ('e', NULL)",
    "UPDATE texts SET k = 'z' WHERE k = 'a'",
    "UPDATE texts SET v = 1.0 WHERE k = 'b'",
    "DELETE FROM texts WHERE k = 'c'",
    "INSERT INTO blobs VALUES (x'01', 'a'), (x'0203', 'b'), (x'', 'empty')",
    "UPDATE blobs SET k = x'ff' WHERE k = x'01'",
    "DELETE FROM blobs WHERE k = x''",
    "INSERT INTO composite (t, b, i, x) VALUES ('a', x'01', 1, 1), ('a', x'02', 1, 'x'), "
    "('b', x'01', 2, NULL)",
    "UPDATE composite SET b = x'03', y = 'moved' WHERE t = 'a' AND i = 1 AND b = x'01'",
    "UPDATE composite SET i = 5 WHERE t = 'b'",
    "DELETE FROM composite WHERE b = x'02'",
    "INSERT INTO pk_only VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    "UPDATE pk_only SET b = 'bb' WHERE a = 2",
    "DELETE FROM pk_only WHERE a = 3",
    "INSERT INTO pk_only VALUES (3, 'c')",
    "INSERT INTO strict_table VALUES ('k1', 1), ('k2', 2)",
    "UPDATE strict_table SET k = 'k3', n = 3 WHERE k = 'k1'",
    "INSERT INTO \"odd \"\"name\"\" t\" VALUES ('k', 'v'), ('k2', NULL)",
    'UPDATE "odd ""name"" t" SET "the key" = \'k3\', "va\'l" = \'w\' WHERE "the key" = \'k\'',
    "INSERT INTO rekeyed VALUES (1, 'a'), (2, 'b')",
]
AFTER_ALTER = [
    "UPDATE texts SET w = 8 WHERE k = 'b'",
    "UPDATE rekeyed SET v = 'c' WHERE id = 1",
    "INSERT INTO rekeyed VALUES (3, 'd')",
]


def make_database(path) -> None:
    """Every kind of write the engine tracks, the alter paths, and a merge from a peer."""
    conn = crdt.connect(str(path), wal=True)
    peer = crdt.connect()
    try:
        for db in (conn, peer):
            apply_schema(db, SCHEMA)
        for sql in WRITES:
            conn.execute(sql)
        peer.execute("INSERT INTO texts VALUES ('from peer', 'p'), ('b', 'peer wins?')")
        peer.execute("INSERT INTO composite (t, b, i, x) VALUES ('p', x'09', 9, 9)")
        crdt.merge(conn, crdt.changes_since(peer, 0))
        apply_schema(conn, ALTERED, allow_destructive=True)
        for sql in AFTER_ALTER:
            conn.execute(sql)
    finally:
        peer.close()
        conn.close()


def test_stdlib_sqlite3_reads_every_table_of_a_crr_database(tmp_path):
    path = tmp_path / "crr.db"
    make_database(path)
    got = read_everything(path)  # also asserts integrity_check == ok
    conn = crdt.connect(str(path))
    try:
        assert got == read_tables(conn)
        schema = stored_schema(conn)
    finally:
        conn.close()
    assert got["ints"] == [(2, "again", 0, None, None), (3, "uno", 1, 1.75, b"\x00\xff")]
    assert ("from peer", "p", 7) in got["texts"]
    assert len(got["rekeyed__crsql_clock"]) > 0
    # every kind of object we store, each of them re-created by the stdlib module
    kinds = {kind for kind, _name, _sql in schema}
    assert kinds == {"table", "index", "trigger"}
    check_parses_in_stdlib(schema)


def test_stdlib_sqlite3_reads_while_the_writer_holds_the_database(tmp_path):
    """WAL: a stdlib reader sees committed rows while our connection is open and mid-write."""
    path = tmp_path / "live.db"
    conn = crdt.connect(str(path), wal=True)
    try:
        apply_schema(conn, SCHEMA)
        conn.execute("INSERT INTO ints (id, a) VALUES (1, 'committed')")
        conn.execute("BEGIN")
        conn.execute("UPDATE ints SET id = 5, a = 'pending' WHERE id = 1")
        got = read_everything(path)
        assert got["ints"] == [(1, "committed", 0, None, None)]
        conn.execute("COMMIT")
        assert read_everything(path)["ints"] == [(5, "pending", 0, None, None)]
    finally:
        conn.close()


def _pk_change_and_its_changes(conn) -> list[tuple]:
    """A pk-changing update and what it records (everything but the site id, which differs
    between databases)."""
    conn.execute("UPDATE composite SET i = 7 WHERE t = 'a'")
    return [c._replace(site_id=None) for c in crdt.changes_since(conn, 1)]


def _seeded(path) -> crdt.Connection:
    conn = crdt.connect(str(path))
    apply_schema(conn, SCHEMA)
    conn.execute("INSERT INTO composite (t, b, i, x) VALUES ('a', x'01', 1, 1), ('b', x'02', 2, 2)")
    return conn


def test_old_triggers_are_rewritten_on_open(tmp_path):
    path = tmp_path / "old.db"
    conn = _seeded(path)
    with conn:
        for table in ("ints", "composite"):
            store_pre_fix_utrig(conn, table)
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="malformed database schema"):
        read_everything(path)

    conn = crdt.connect(str(path))  # the upgrade runs here
    try:
        assert upgrade_triggers(conn) == []  # already done
        schema_version = conn.execute("PRAGMA schema_version").fetchone()
        recorded = _pk_change_and_its_changes(conn)
    finally:
        conn.close()
    control = _seeded(tmp_path / "control.db")
    try:
        assert recorded == _pk_change_and_its_changes(control)  # tracked as by fresh triggers
    finally:
        control.close()
    assert read_everything(path)["composite"] == [
        ("a", b"\x01", 7, 1, ""),
        ("b", b"\x02", 2, 2, ""),
    ]

    conn = crdt.connect(str(path))  # a second open rewrites nothing
    try:
        assert conn.execute("PRAGMA schema_version").fetchone() == schema_version
    finally:
        conn.close()


def test_read_only_open_does_not_touch_old_triggers(tmp_path):
    path = tmp_path / "ro.db"
    conn = crdt.connect(str(path))
    apply_schema(conn, SCHEMA)
    with conn:
        store_pre_fix_utrig(conn, "ints")
    conn.close()
    ro = crdt.connect(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert ro.execute("SELECT count(*) FROM ints").fetchone() == (0,)
    finally:
        ro.close()
    with pytest.raises(sqlite3.DatabaseError, match="malformed database schema"):
        read_everything(path)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO ints (id, a) VALUES (9, 'x')",
        "UPDATE ints SET a = 'x'",
        "UPDATE ints SET id = 9 WHERE id = 1",
        "DELETE FROM ints",
    ],
)
def test_a_write_through_plain_sqlite_is_refused_and_changes_nothing(tmp_path, sql):
    """The triggers call functions only a crdt connection defines: SQLite refuses the statement
    when preparing it, so an untracked write cannot slip into a CRR."""
    path = tmp_path / "plain.db"
    conn = crdt.connect(str(path))
    apply_schema(conn, SCHEMA)
    conn.execute("INSERT INTO ints (id, a) VALUES (1, 'a')")
    conn.close()
    before = read_everything(path)
    db = sqlite3.connect(str(path))
    try:
        with pytest.raises(
            sqlite3.OperationalError, match="no such function: crsql_internal_local_write"
        ):
            db.execute(sql)
        db.commit()
    finally:
        db.close()
    assert read_everything(path) == before
