"""Local-write metadata, spot checks taken from cr-sqlite's documented behaviour (the differential
tests check the same against the real extension at random)."""

from __future__ import annotations

import apsw
import pytest

import crdt


def db(recursive_triggers: bool = False):
    conn = crdt.connect()
    if recursive_triggers:
        conn.execute("PRAGMA recursive_triggers = ON")
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)")
    conn.execute("SELECT crsql_as_crr('t')")
    return conn


def clocks(conn, table="t"):
    return conn.execute(
        f'SELECT key, col_name, col_version, db_version, site_id, seq FROM "{table}__crsql_clock" '
        "ORDER BY key, col_name"
    ).fetchall()


def test_surface_tables_and_functions():
    conn = db()
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {
        "crsql_master",
        "crsql_site_id",
        "crsql_tracked_peers",
        "t__crsql_clock",
        "t__crsql_pks",
    } <= names
    cols = [r[1] for r in conn.execute("PRAGMA table_info(t__crsql_clock)")]
    assert cols == ["key", "col_name", "col_version", "db_version", "site_id", "seq"]
    assert [r[1] for r in conn.execute("PRAGMA table_info(t__crsql_pks)")] == ["__crsql_key", "a"]
    site = conn.execute("SELECT crsql_site_id()").fetchone()[0]
    assert len(site) == 16 and site[6] >> 4 == 4  # UUIDv4 bits
    assert conn.execute(
        "SELECT crsql_db_version(), crsql_get_seq(), crsql_rows_impacted()"
    ).fetchone() == (0, 0, 0)
    assert conn.execute(
        "SELECT value FROM crsql_master WHERE key = 'crsqlite_version'"
    ).fetchone() == (160300,)
    assert conn.execute("SELECT crsql_as_crr('t')").fetchone() == ("OK",)  # idempotent


def test_site_id_persists(tmp_path):
    path = str(tmp_path / "x.db")
    a = crdt.connect(path)
    site = crdt.site_id(a)
    a.close()
    b = crdt.connect(path)
    assert crdt.site_id(b) == site
    assert b.execute("SELECT crsql_site_id()").fetchone()[0] == site


def test_insert_creates_column_clocks_without_sentinel():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 'x', 2)")
    assert clocks(conn) == [(1, "b", 1, 1, 0, 0), (1, "c", 1, 1, 0, 1)]
    assert conn.execute("SELECT crsql_db_version()").fetchone() == (1,)


def test_versions_are_per_transaction_and_pending_is_invisible():
    conn = db()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (1, 1, 1)")
    conn.execute("INSERT INTO t VALUES (2, 1, 1)")
    assert conn.execute("SELECT crsql_db_version(), crsql_get_seq()").fetchone() == (0, 4)
    conn.execute("COMMIT")
    assert {r[3] for r in clocks(conn)} == {1}
    assert [r[5] for r in clocks(conn)] == [0, 1, 2, 3]


def test_delete_and_reinsert_cycle_causal_length():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 'x', 2)")
    conn.execute("DELETE FROM t WHERE a = 1")
    assert clocks(conn) == [(1, "-1", 2, 2, 0, 0)]
    conn.execute("INSERT INTO t VALUES (1, 'y', 3)")
    # sentinel 2 -> 3, one seq for the create record, columns restart at 1
    assert clocks(conn) == [(1, "-1", 3, 3, 0, 0), (1, "b", 1, 3, 0, 1), (1, "c", 1, 3, 0, 2)]


def test_noop_update_advances_in_memory_version_only():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 'x', 2)")
    conn.execute("UPDATE t SET b = b")
    conn.execute("UPDATE t SET b = 'x'")
    assert conn.execute("SELECT crsql_db_version()").fetchone() == (3,)
    assert {r[3] for r in clocks(conn)} == {1}


def test_update_is_type_sensitive():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 1, 2)")
    conn.execute("UPDATE t SET b = 1.0")  # 1 -> 1.0 changes the storage class
    assert clocks(conn)[0][:4] == (1, "b", 2, 2)


@pytest.mark.parametrize("recursive", [False, True])
def test_insert_or_replace(recursive):
    conn = db(recursive)
    conn.execute("INSERT INTO t VALUES (1, 'x', 2)")
    conn.execute("INSERT OR REPLACE INTO t VALUES (1, 'y', 3)")
    if recursive:  # delete fires, then insert: cl 3, columns restart
        assert clocks(conn) == [(1, "-1", 3, 2, 0, 1), (1, "b", 1, 2, 0, 2), (1, "c", 1, 2, 0, 3)]
    else:  # no delete trigger: cl stays 1, columns +1, and a seq gap for the create record
        assert clocks(conn) == [(1, "b", 2, 2, 0, 1), (1, "c", 2, 2, 0, 2)]


def test_pk_change_re_stamps_moved_clocks():
    """Upstream moves column clocks with their old version, so a peer synced past it never sees
    the value under the new key. We re-stamp them (docs/crdt-compatibility.md)."""
    a, b = db(), db()
    a.execute("INSERT INTO t VALUES (1, 'x', 2)")
    crdt.merge(b, crdt.changes_since(a, 0))
    synced = crdt.db_version(a)
    a.execute("UPDATE t SET a = 5 WHERE a = 1")
    crdt.merge(b, crdt.changes_since(a, synced))
    assert b.execute("SELECT * FROM t").fetchall() == [(5, "x", 2)]
    moved = [r for r in clocks(a) if r[1] in ("b", "c")]
    assert {r[3] for r in moved} == {2}


def test_pk_only_table():
    conn = crdt.connect()
    conn.execute("CREATE TABLE p (a INTEGER NOT NULL, b TEXT NOT NULL, PRIMARY KEY (b, a))")
    conn.execute("SELECT crsql_as_crr('p')")
    conn.execute("INSERT INTO p VALUES (1, 'x')")
    assert clocks(conn, "p") == [(1, "-1", 1, 1, 0, 0)]
    (pk,) = conn.execute("SELECT pk FROM crsql_changes").fetchone()
    assert crdt.unpack_pk(pk) == ("x", 1)  # pk order, not column order


def test_backfill_on_as_crr():
    conn = crdt.connect()
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b)")
    conn.execute("INSERT INTO t VALUES (1, NULL), (2, 'x')")
    conn.execute("SELECT crsql_as_crr('t')")
    assert clocks(conn) == [(1, "b", 1, 1, 0, 0), (2, "b", 1, 1, 0, 1)]


def test_sync_bit_silences_triggers():
    conn = db()
    conn.execute("SELECT crsql_internal_sync_bit(1)")
    conn.execute("INSERT INTO t VALUES (1, 1, 1)")
    conn.execute("SELECT crsql_internal_sync_bit(0)")
    assert clocks(conn) == []


def test_incompatible_tables_are_refused_with_reasons():
    conn = crdt.connect()
    cases = {
        "CREATE TABLE a (x INTEGER PRIMARY KEY, y)": "nullable",
        "CREATE TABLE b (x, y)": "no primary key",
        "CREATE TABLE c (x INTEGER PRIMARY KEY NOT NULL, y UNIQUE)": "unique index",
        "CREATE TABLE d (x INTEGER PRIMARY KEY NOT NULL, y NOT NULL)": "DEFAULT",
        "CREATE TABLE e (x INTEGER PRIMARY KEY NOT NULL, y REFERENCES d(x))": "foreign key",
        "CREATE TABLE f (x INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL)": "AUTOINCREMENT",
    }
    for ddl, reason in cases.items():
        conn.execute(ddl)
        name = ddl.split()[2]
        with pytest.raises(apsw.SQLError, match=reason):
            conn.execute(f"SELECT crsql_as_crr('{name}')")
        assert not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = ?", (name + "__crsql_clock",)
        ).fetchone()


def test_as_table_downgrades():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 1, 1)")
    conn.execute("SELECT crsql_as_table('t')")
    conn.execute("INSERT INTO t VALUES (2, 1, 1)")
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "t__crsql_clock" not in names and conn.execute("SELECT count(*) FROM t").fetchone() == (
        2,
    )


def test_alter_add_column_keeps_versions():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 1, 1)")
    conn.execute("SELECT crsql_begin_alter('t')")
    conn.execute("ALTER TABLE t ADD COLUMN d TEXT DEFAULT 'z'")
    conn.execute("SELECT crsql_commit_alter('t')")
    assert [r[1] for r in clocks(conn)] == ["b", "c"]  # nothing backfilled for a default column
    conn.execute("UPDATE t SET d = 'q'")
    assert clocks(conn)[-1][:4] == (1, "d", 1, 2)
    assert conn.execute(
        "SELECT value FROM crsql_master WHERE key = 'pre_compact_dbversion'"
    ).fetchone() == (1,)


def test_a_column_added_by_a_plain_alter_is_recorded_when_the_database_is_reopened(tmp_path):
    """Outside the alter functions the triggers do not know a new column (deviation 14); the
    next open rebuilds them and records the values they missed, at one new version, so a
    replica receives them. An open that finds nothing missed takes no version."""
    path = str(tmp_path / "a.db")
    conn = crdt.connect(path)
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b TEXT)")
    conn.execute("SELECT crsql_as_crr('t')")
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    conn.execute("ALTER TABLE t ADD COLUMN d TEXT")
    conn.execute("INSERT INTO t VALUES (2, 'y', 'new')")
    conn.execute("UPDATE t SET d = 'upd' WHERE a = 1")
    conn.execute("INSERT INTO t VALUES (3, 'z', NULL)")  # the default: nothing to record
    assert "d" not in [r[1] for r in clocks(conn)]
    conn.close()
    conn = crdt.connect(path)
    assert conn.execute("SELECT crsql_db_version()").fetchone() == (4,)
    recorded = conn.execute(
        "SELECT pk, val, db_version FROM crsql_changes WHERE cid = 'd' ORDER BY val"
    ).fetchall()
    assert [(r[1], r[2]) for r in recorded] == [("new", 4), ("upd", 4)]
    replica = crdt.connect()
    replica.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b TEXT, d TEXT)")
    replica.execute("SELECT crsql_as_crr('t')")
    crdt.merge(replica, crdt.changes_since(conn, 0))
    assert replica.execute("SELECT * FROM t ORDER BY a").fetchall() == [
        (1, "x", "upd"), (2, "y", "new"), (3, "z", None)
    ]  # fmt: skip
    conn.close()
    conn = crdt.connect(path)
    assert conn.execute("SELECT crsql_db_version()").fetchone() == (4,)
    conn.close()


def test_changes_vtab_refuses_update_and_delete():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 1, 1)")
    with pytest.raises(apsw.SQLError, match="Only INSERT and SELECT"):
        conn.execute("DELETE FROM crsql_changes")
    with pytest.raises(apsw.SQLError, match="Only INSERT and SELECT"):
        conn.execute("UPDATE crsql_changes SET val = 1")


def test_changes_filters_and_order():
    conn = db()
    for i in range(5):
        conn.execute("INSERT INTO t VALUES (?, ?, ?)", (i, i, i))
    rows = conn.execute(
        "SELECT db_version, seq FROM crsql_changes WHERE db_version > 2 AND site_id IS NOT ?",
        (b"x" * 16,),
    ).fetchall()
    assert rows == [(3, 0), (3, 1), (4, 0), (4, 1), (5, 0), (5, 1)]
    desc = conn.execute("SELECT db_version FROM crsql_changes ORDER BY db_version DESC").fetchall()
    assert [r[0] for r in desc] == sorted((r[0] for r in desc), reverse=True)
    mine = conn.execute("SELECT count(*) FROM crsql_changes WHERE site_id = crsql_site_id()")
    assert mine.fetchone() == (10,)


def test_pk_move_onto_a_live_row_replaced_without_recursive_triggers():
    """UPDATE OR REPLACE onto a live row: with recursive triggers off SQLite deletes the replaced
    row without firing its delete trigger, so the moved clocks must outrank the replaced row's
    (found by the convergence property test)."""
    a, b = db(), db()
    a.execute("INSERT INTO t VALUES (1, NULL, '0')")
    a.execute("INSERT INTO t VALUES (0, NULL, NULL)")
    crdt.merge(b, crdt.changes_since(a, 0))
    a.execute("UPDATE OR REPLACE t SET a = 1 WHERE a = 0")
    crdt.merge(b, crdt.changes_since(a, 0))
    assert a.execute("SELECT * FROM t").fetchall() == [(1, None, None)]
    assert b.execute("SELECT * FROM t").fetchall() == [(1, None, None)]


def test_clock_version_index_covers_reads_and_old_databases_are_upgraded():
    """Reads in (db_version, seq) order walk the index, which holds every clock column they
    need; a clock made with upstream's (db_version) index is upgraded when crsql_as_crr runs
    again, data untouched."""
    conn = crdt.connect()
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b)")
    conn.execute("SELECT crsql_as_crr('t')")
    cols = "SELECT name FROM pragma_index_info('t__crsql_clock_dbv_idx')"
    assert [r[0] for r in conn.execute(cols)] == ["db_version", "seq", "col_version", "site_id"]
    plan = " ".join(
        r[3]
        for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM t__crsql_clock WHERE db_version > 0 "
            "ORDER BY db_version, seq"
        )
    )
    assert "COVERING INDEX t__crsql_clock_dbv_idx" in plan and "TEMP B-TREE" not in plan
    conn.execute("INSERT INTO t VALUES (1, 'x')")
    before = conn.execute("SELECT * FROM crsql_changes").fetchall()
    conn.execute("DROP INDEX t__crsql_clock_dbv_idx")
    conn.execute('CREATE INDEX t__crsql_clock_dbv_idx ON t__crsql_clock ("db_version")')
    assert conn.execute("SELECT crsql_as_crr('t')").fetchone() == ("OK",)
    assert [r[0] for r in conn.execute(cols)] == ["db_version", "seq", "col_version", "site_id"]
    assert conn.execute("SELECT * FROM crsql_changes").fetchall() == before


def _trigger_table_scans(conn, sql: str) -> list[tuple[int, int]]:
    """(program, address) of every full scan of a real table inside the trigger programs that
    ``sql`` runs, read from its bytecode: EXPLAIN lists the statement's own program, then each
    trigger program, addresses starting again at 0."""
    scans = []
    program = -1
    previous = None
    opened: dict[int, bool] = {}  # cursor -> opened on a real table (not a scratch one)
    for addr, opcode, p1, *_ in conn.execute("EXPLAIN " + sql):
        if previous is not None and addr <= previous:
            program += 1
            opened = {}
        previous = addr
        if opcode in ("OpenRead", "OpenWrite"):
            opened[p1] = True
        elif opcode.startswith("Open") or opcode == "SorterOpen":
            opened[p1] = False
        elif opcode in ("Rewind", "Last") and program >= 0 and opened.get(p1):
            scans.append((program, addr))
    return scans


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO i VALUES (1, 'x', 2)",
        "INSERT OR REPLACE INTO i VALUES (1, 'x', 2)",
        "UPDATE i SET c = 5 WHERE a = 1",
        "UPDATE i SET a = 2 WHERE a = 1",
        "DELETE FROM i WHERE a = 1",
        "INSERT INTO comp VALUES ('k', 1, 2)",
        "UPDATE comp SET b = 3",
        "UPDATE comp SET n = 4",
        "DELETE FROM comp",
        "INSERT INTO num VALUES (1)",
        "UPDATE num SET a = 2",
        "DELETE FROM num",
    ],
)
def test_triggers_look_rows_up_by_index(sql):
    """No trigger statement scans a clock or lookaside table: NEW's column affinity must not
    reach a comparison with the untyped lookaside column (that turns every write into a scan,
    and inserts quadratic), whatever the pk's declared type."""
    conn = crdt.connect()
    conn.execute("CREATE TABLE i (a INTEGER PRIMARY KEY NOT NULL, b TEXT, c INTEGER)")
    conn.execute("CREATE TABLE comp (a TEXT NOT NULL, n INTEGER NOT NULL, b, PRIMARY KEY (a, n))")
    conn.execute("CREATE TABLE num (a NUMERIC PRIMARY KEY NOT NULL)")
    conn.execute("SELECT crsql_as_crr('i'), crsql_as_crr('comp'), crsql_as_crr('num')")
    assert _trigger_table_scans(conn, sql) == []
