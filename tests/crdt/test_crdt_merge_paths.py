"""The large-batch paths give the same database as the paths small batches take.

A large flush writes base rows with triggers off (merge.QUIET_TRIGGERS_ROWS), and a read that
returns much of a table takes causal lengths from one pass over its sentinels
(changes.SCAN_FRACTION) or reads the whole table once (changes.PASS_PER_KEY). Random batches
with duplicates, deletes, resurrections, equal col_versions and equal values, over tables with
and without non-pk columns, must leave the same tables, clocks (versions, sites, seqs) and
db_version either way, and as merging change by change through crsql_changes; and every read
must return the same changes in the same order by each path, what ``crsql_changes`` returns.
"""

from __future__ import annotations

import importlib
import random

import apsw
import pytest

import crdt
from crdt import Change
from crdt.sqlutil import ident

merge_module = importlib.import_module("crdt.merge")
changes_module = importlib.import_module("crdt.changes")

SITES = [bytes([i]) * 16 for i in range(1, 4)]
VALUES = [None, 0, 1, 1.0, 2.5, "", "a", "b", b"", b"a", b"b", 10**12]
TABLES = {
    "t": "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c TEXT DEFAULT 'd')",
    "m": "CREATE TABLE m (x TEXT NOT NULL, y INTEGER NOT NULL, v, PRIMARY KEY (x, y))",
    "p": "CREATE TABLE p (k NOT NULL PRIMARY KEY)",
}
COLUMNS = {"t": ["b", "c"], "m": ["v"], "p": []}
ORDER = {"t": "a", "m": "x, y", "p": "k"}


def db(merge_equal_values: bool, site: int) -> crdt.Connection:
    conn = crdt.connect(merge_equal_values=merge_equal_values, site_id=bytes([9, site]) * 8)
    for table, ddl in TABLES.items():
        conn.execute(ddl)
        conn.execute("SELECT crsql_as_crr(?)", (table,))
    return conn


def random_batch(rng: random.Random, n: int) -> list[Change]:
    pks = {
        "t": [(i,) for i in range(12)],
        "m": [(x, y) for x in ("a", "b") for y in range(4)],
        "p": [(i,) for i in ("k1", "k2", 3, b"k4")],
    }
    out = []
    for _ in range(n):
        table = rng.choice(list(TABLES))
        pk = crdt.pack_pk(rng.choice(pks[table]))
        cl = rng.choice([1, 1, 1, 1, 2, 3, 4])
        if not COLUMNS[table] or rng.random() < 0.15:
            cid, val, cv = "-1", None, cl  # a sentinel carries its cl as col_version
        else:
            cid, val, cv = rng.choice(COLUMNS[table]), rng.choice(VALUES), rng.randint(1, 3)
        site = rng.choice(SITES)
        out.append(Change(table, pk, cid, val, cv, rng.randint(1, 40), site, cl, rng.randint(0, 9)))
    if rng.random() < 0.5:
        out += rng.sample(out, len(out) // 4)  # the same change again, later in the batch
    return out


def state(conn: crdt.Connection) -> tuple:
    out: list = [crdt.db_version(conn)]
    for table in TABLES:
        out.append(conn.execute(f"SELECT * FROM {table} ORDER BY {ORDER[table]}").fetchall())
        out.append(
            conn.execute(
                "SELECT p.*, c.col_name, c.col_version, c.db_version, s.site_id, c.seq "
                f"FROM {table}__crsql_clock AS c JOIN {table}__crsql_pks AS p "
                "ON p.__crsql_key = c.key JOIN crsql_site_id AS s ON s.ordinal = c.site_id "
                "ORDER BY c.key, c.col_name"
            ).fetchall()
        )
    return tuple(out)


def merged(batches: list[list[Change]], mev: bool, how: str, monkeypatch) -> crdt.Connection:
    monkeypatch.setattr(merge_module, "QUIET_TRIGGERS_ROWS", 1 if how == "quiet" else 10**9)
    conn = db(mev, 1)
    conn.execute("INSERT INTO t VALUES (0, 'local', 'row')")
    conn.execute("INSERT INTO p VALUES ('k1')")
    for batch in batches:
        if how == "one by one":
            with conn:
                for change in batch:
                    conn.execute(
                        "INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", change
                    )
        else:
            crdt.merge(conn, batch)
    return conn


@pytest.mark.parametrize("seed", range(40))
def test_large_batch_paths_write_what_change_by_change_writes(seed, monkeypatch):
    rng = random.Random(seed)
    mev = seed % 2 == 1
    batches = [random_batch(rng, rng.randint(1, 120)) for _ in range(3)]
    quiet_seen: list[bool] = []
    real_quiet = merge_module.Merger._quiet

    def spy(self):
        quiet_seen.append(real_quiet(self))
        return quiet_seen[-1]

    monkeypatch.setattr(merge_module.Merger, "_quiet", spy)
    results = {
        how: merged(batches, mev, how, monkeypatch) for how in ("quiet", "loud", "one by one")
    }
    assert quiet_seen and all(quiet_seen)  # the quiet path was taken
    expected = state(results["one by one"])
    assert state(results["quiet"]) == expected
    assert state(results["loud"]) == expected


# The ways a read can take: (SCAN_FRACTION, PASS_PER_KEY, PASS_PER_COLUMN) forcing each.
READ_PATHS = {
    "joins per change": (0, 10**9, 0),
    "one pass over the sentinels": (10**9, 10**9, 0),
    "one pass over the table": (0, 0, 0),
}


def read_by_each_path(monkeypatch, conn, *args, **kwargs) -> list[list[Change]]:
    out = []
    for scan, per_key, per_column in READ_PATHS.values():
        monkeypatch.setattr(changes_module, "SCAN_FRACTION", scan)
        monkeypatch.setattr(changes_module, "PASS_PER_KEY", per_key)
        monkeypatch.setattr(changes_module, "PASS_PER_COLUMN", per_column)
        out.append(crdt.changes_since(conn, *args, **kwargs))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_reads_by_each_path_match_crsql_changes(seed, monkeypatch):
    rng = random.Random(1000 + seed)
    conn = merged([random_batch(rng, 150) for _ in range(2)], False, "loud", monkeypatch)
    conn.execute("DELETE FROM t WHERE a % 3 = 0")
    conn.execute("INSERT INTO t (a, b) VALUES (3, 'again')")
    top = crdt.db_version(conn)
    for since in sorted({0, 1, top // 2, top - 1, top}):
        for exclude in (None, SITES[0], b"\x77" * 16):
            vtab = conn.execute(
                "SELECT * FROM crsql_changes WHERE db_version > ? AND site_id IS NOT ?",
                (since, exclude),
            ).fetchall()
            reads = read_by_each_path(monkeypatch, conn, since, exclude_site=exclude)
            got = reads[0]
            assert sorted(got) == sorted(vtab)
            assert [(c.db_version, c.seq) for c in got] == sorted(
                (c.db_version, c.seq) for c in got
            )
            assert all(read == got for read in reads)  # the same changes in the same order
            limited = read_by_each_path(monkeypatch, conn, since, exclude_site=exclude, limit=5)
            assert all(read == got[:5] for read in limited)


def test_a_table_pass_reads_odd_clock_rows_as_the_joins_do(monkeypatch):
    """Clock rows only the per-change joins handle (no lookaside row: left out; a column the
    table lacks: no value; a site ordinal crsql_site_id lacks: no site id) make the table pass
    give way to them, for that table only."""
    conn = db(False, 1)
    with conn:
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, i, str(i)) for i in range(20)])
        conn.executemany("INSERT INTO m VALUES (?, ?, ?)", [("x", i, i) for i in range(20)])
    expected = read_by_each_path(monkeypatch, conn, 0)
    assert all(read == expected[0] for read in expected)
    odd_rows = (
        "DELETE FROM t__crsql_pks WHERE a = 4",
        "INSERT INTO t__crsql_clock VALUES (2, 'gone', 1, 1, 0, 90)",
        "UPDATE t__crsql_clock SET site_id = 77 WHERE key = 3 AND col_name = 'b'",
    )
    for sql in odd_rows:
        with conn:
            conn.execute(sql)
        reads = read_by_each_path(monkeypatch, conn, 0)
        assert reads[2] == reads[0] != expected[0], sql
        assert [c for c in reads[2] if c.table == "m"] == [c for c in expected[0] if c.table == "m"]
        expected = reads


@pytest.mark.parametrize(
    "odd_row",
    [
        "DELETE FROM t__crsql_pks WHERE a = 4",  # a key in the middle without its row
        "DELETE FROM t__crsql_pks WHERE a = 19",  # the largest key without its row
        "INSERT INTO t__crsql_clock VALUES (2, 'gone', 1, 1, 0, 90)",  # a column t lacks
        "UPDATE t__crsql_clock SET site_id = 77 WHERE key = 3 AND col_name = 'b'",
        "INSERT INTO t__crsql_clock VALUES (-3, 'b', 1, 1, 0, 91)",  # a key below 0
        "UPDATE t__crsql_pks SET __crsql_key = -7 WHERE a = 5",  # a lookaside key below 0
    ],
)
def test_a_table_pass_gives_way_to_the_joins_for_each_odd_clock_row_alone(odd_row, monkeypatch):
    """Each odd row alone (the pass indexes lists by key and column position: a key past the
    end, a gap, a key below 0, which would index from the end, a name it has no position for)
    reads as the per-change joins read it."""
    conn = db(False, 1)
    with conn:
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, i, str(i)) for i in range(20)])
    with conn:
        conn.execute(odd_row)
    reads = read_by_each_path(monkeypatch, conn, 0)
    assert reads[2] == reads[1] == reads[0]
    vtab = conn.execute("SELECT * FROM crsql_changes WHERE db_version > 0").fetchall()
    assert sorted(reads[0]) == sorted(vtab)


def test_a_table_pass_reads_wide_tables_and_any_one_column_pk_as_the_joins_do(monkeypatch):
    """The table pass finds a clock row's column by a search over the sorted column names in
    SQL (odd names: quotes, spaces, non-ASCII, digits, a prefix of another) and packs a
    one-column pk inline when it is a non-negative integer (any other value: pack_pk)."""
    names = ["b", "Bx", "ba", "a b", "it's", "é", "日本", "0", "-0", "z", "Z9", "_", "ß", "c"]
    conn = crdt.connect()
    conn.execute(f"CREATE TABLE w (k PRIMARY KEY NOT NULL, {', '.join(map(ident, names))})")
    conn.execute("SELECT crsql_as_crr('w')")
    pks = [0, 1, 255, 256, 2**63 - 1, -1, -(2**63), 1.5, -2.5, "k", "", b"\x00", b"k"]
    row = ", ".join("?" * (1 + len(names)))
    with conn:
        conn.executemany(f"INSERT INTO w VALUES ({row})", [(pk, *range(len(names))) for pk in pks])
    with conn:
        conn.execute(f"UPDATE w SET {ident('é')} = 'again', {ident('-0')} = NULL WHERE k != 1")
        conn.execute("DELETE FROM w WHERE k = 256")
    for since in (0, 1):
        vtab = conn.execute("SELECT * FROM crsql_changes WHERE db_version > ?", (since,))
        expected = sorted(vtab.fetchall(), key=lambda c: (c[5], c[8]))
        reads = read_by_each_path(monkeypatch, conn, since)
        assert all(read == expected for read in reads)
    assert len({c.cid for c in reads[0]}) == 3  # since 1: é, -0 and a delete's sentinel
    # and the pass read it all itself, not giving way to the joins (which give the same)
    expected = read_by_each_path(monkeypatch, conn, 0)[2]
    assert len({c.cid for c in expected}) == len(names) + 1
    monkeypatch.setattr(changes_module, "table_select", None)
    assert crdt.changes_since(conn, 0) == expected


def test_a_users_trigger_still_fires_in_a_large_merge(monkeypatch):
    monkeypatch.setattr(merge_module, "QUIET_TRIGGERS_ROWS", 1)
    src, dst = db(False, 1), db(False, 2)
    with src:
        src.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, i, str(i)) for i in range(50)])
    dst.execute("CREATE TABLE log (a, b)")
    dst.execute(
        "CREATE TRIGGER t_log AFTER INSERT ON t BEGIN INSERT INTO log VALUES (NEW.a, 1); END"
    )
    dst.execute(
        "CREATE TEMP TRIGGER t_log_update AFTER UPDATE ON main.t "
        "BEGIN INSERT INTO log VALUES (NEW.a, 2); END"
    )
    crdt.merge(dst, crdt.changes_since(src, 0))
    assert dst.execute("SELECT count(*) FROM log WHERE b = 1").fetchone() == (50,)
    with src:
        src.execute("UPDATE t SET b = b + 1")
    crdt.merge(dst, crdt.changes_since(src, 0))
    assert dst.execute("SELECT count(*) FROM log WHERE b = 2").fetchone() == (50,)
    # and the connection's triggers are on again afterwards
    dst.execute("INSERT INTO t VALUES (1000, 0, 'x')")
    assert dst.execute("SELECT count(*) FROM log WHERE a = 1000").fetchone() == (1,)
    assert crdt.changes_since(dst, crdt.db_version(dst) - 1)[0].pk == crdt.pack_pk((1000,))


def test_a_users_trigger_on_a_table_a_cascade_writes_still_fires(monkeypatch):
    """Triggers off is a setting of the whole connection: a merged delete cascading (by a
    plain table's foreign key) into a table with a user's trigger must still fire it."""
    monkeypatch.setattr(merge_module, "QUIET_TRIGGERS_ROWS", 1)
    src, dst = db(False, 1), db(False, 2)
    with src:
        src.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, i, str(i)) for i in range(20)])
    crdt.merge(dst, crdt.changes_since(src, 0))
    dst.execute("PRAGMA foreign_keys = ON")
    dst.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, a REFERENCES t (a) ON DELETE CASCADE)")
    dst.execute("CREATE TABLE gone (id)")
    dst.execute(
        "CREATE TRIGGER notes_gone AFTER DELETE ON notes "
        "BEGIN INSERT INTO gone VALUES (OLD.id); END"
    )
    dst.executemany("INSERT INTO notes VALUES (?, ?)", [(i, i) for i in range(20)])
    since = crdt.db_version(src)
    with src:
        src.execute("DELETE FROM t")
    crdt.merge(dst, crdt.changes_since(src, since))
    assert dst.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert dst.execute("SELECT count(*) FROM notes").fetchone() == (0,)
    assert dst.execute("SELECT count(*) FROM gone").fetchone() == (20,)


def test_an_ordered_table_merges_alike_with_triggers_off(monkeypatch):
    def run(threshold: int) -> tuple:
        monkeypatch.setattr(merge_module, "QUIET_TRIGGERS_ROWS", threshold)
        src, dst = crdt.connect(site_id=SITES[0]), crdt.connect(site_id=SITES[1])
        for c in (src, dst):
            c.execute("CREATE TABLE l (id INTEGER PRIMARY KEY NOT NULL, pos, body)")
            c.execute("SELECT crsql_as_crr('l')")
            c.execute("SELECT crsql_fract_as_ordered('l', 'pos')")
        for i in range(40):
            src.execute("INSERT INTO l VALUES (?, ?, ?)", (i, 1 if i % 2 else -1, f"b{i}"))
        crdt.merge(dst, crdt.changes_since(src, 0))
        return (
            dst.execute("SELECT * FROM l ORDER BY id").fetchall(),
            sorted(crdt.changes_since(dst, 0)),
        )

    assert run(1) == run(10**9)


def test_a_tie_within_a_batch_compares_with_the_value_as_the_column_stores_it():
    """Upstream compares a change with the stored value: the TEXT column holds the integer 5
    as '5', which sorts below the integer 4, so the second change wins (a batch that compared
    with the incoming 5 kept it, and replicas merging in other batchings diverged)."""
    pk = crdt.pack_pk((7,))
    batch = [
        Change("t", pk, "c", 5, 1, 3, SITES[0], 1, 0),
        Change("t", pk, "c", 4, 1, 4, SITES[1], 1, 0),
    ]
    batched, one_by_one = db(False, 1), db(False, 2)
    crdt.merge(batched, batch)
    for change in batch:
        crdt.merge(one_by_one, [change])
    for conn in (batched, one_by_one):
        assert conn.execute("SELECT c FROM t WHERE a = 7").fetchall() == [("4",)]


def test_that_tie_is_resolved_as_cr_sqlite_resolves_it(oracle):
    theirs = oracle.open("affinity_tie")
    try:
        theirs.execute(TABLES["t"])
        theirs.execute("SELECT crsql_as_crr('t')")
        pk = crdt.pack_pk((7,))
        theirs.execute("BEGIN")
        for val, site in ((5, SITES[0]), (4, SITES[1])):
            theirs.execute(
                "INSERT INTO crsql_changes VALUES ('t', ?, 'c', ?, 1, 3, ?, 1, 0)", (pk, val, site)
            )
        theirs.execute("COMMIT")
        assert theirs.execute("SELECT c FROM t WHERE a = 7") == [("4",)]
    finally:
        theirs.close()


def test_a_merge_failing_while_triggers_are_off_turns_them_back_on(monkeypatch):
    monkeypatch.setattr(merge_module, "QUIET_TRIGGERS_ROWS", 1)
    conn = db(False, 1)
    good = Change("t", crdt.pack_pk((1,)), "b", 1, 1, 1, SITES[0], 1, 0)
    bad = Change("t", crdt.pack_pk(("not an integer",)), "b", 1, 1, 1, SITES[0], 1, 0)
    with pytest.raises(crdt.MergeError, match="INTEGER PRIMARY KEY takes integers"):
        crdt.merge(conn, [good, bad])
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    conn.execute("INSERT INTO t VALUES (2, 'local', 'write')")
    assert [c.pk for c in crdt.changes_since(conn, 0)] == [crdt.pack_pk((2,))] * 2


def test_a_large_merge_leaves_triggers_off_when_the_connection_had_them_off(monkeypatch):
    """The trigger setting is the connection's own: a merge that runs quiet turns triggers back
    on afterwards only if they were on before it."""
    monkeypatch.setattr(merge_module, "QUIET_TRIGGERS_ROWS", 1)
    conn = db(False, 1)
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    batch = [Change("t", crdt.pack_pk((n,)), "b", n, 1, 1, SITES[0], 1, 0) for n in range(3)]
    assert crdt.merge(conn, batch) == 3
    assert conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1) == 0
    assert conn.execute("SELECT a, b FROM t ORDER BY a").fetchall() == [(0, 0), (1, 1), (2, 2)]
