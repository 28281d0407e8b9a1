"""Tombstone GC (crdt.reaper): what a reap deletes and what it leaves, that it records no change,
and that a key reused after a reap merges the same on nodes that reaped and nodes that did not."""

from __future__ import annotations

import pytest

import crdt
from crdt import reaper


def db():
    conn = crdt.connect()
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)")
    conn.execute("SELECT crsql_as_crr('t')")
    conn.execute("CREATE TABLE p (k TEXT PRIMARY KEY NOT NULL)")  # pk-only
    conn.execute("SELECT crsql_as_crr('p')")
    return conn


def sync(src, dst):
    return crdt.merge(dst, crdt.changes_since(src, 0, exclude_site=crdt.site_id(dst)))


def metadata(conn, table="t"):
    clock = conn.execute(f"SELECT count(*) FROM {table}__crsql_clock").fetchone()[0]
    keys = conn.execute(f"SELECT count(*) FROM {table}__crsql_pks").fetchone()[0]
    return clock, keys


def reap(conn, bound=None, limit=1000):
    if bound is None:
        bound = crdt.db_version(conn)
    return reaper.reap_tombstones(conn, conn.crr, bound, limit)


def local(conn, sql, params=()):
    """A local write as the agent makes it: keys created in a reaped table are lifted."""
    floors = reaper.floors(conn)
    with conn:
        marks = reaper.mark_new_keys(conn, floors)
        conn.execute(sql, params)
        reaper.lift_new_keys(conn, conn.crr, floors, marks)


def table(conn, name="t"):
    return conn.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()


def test_reap_deletes_clock_and_lookaside_rows_and_records_nothing():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 'x', 1), (2, 'y', 2)")
    conn.execute("DELETE FROM t WHERE a = 1")
    version = crdt.db_version(conn)
    before = crdt.changes_since(conn, 0)
    assert metadata(conn) == (3, 2)  # row 2's two clocks + row 1's tombstone; two keys

    out = reap(conn)

    assert out.keys == {"t": 1} and out.clock_rows == 1
    assert metadata(conn) == (2, 1)
    assert table(conn) == [(2, "y", 2)]
    # no version taken, no change recorded: what a peer pulls is what it was, minus the tombstone
    assert crdt.db_version(conn) == version
    assert crdt.changes_since(conn, 0) == [c for c in before if c.cid != "-1"]
    assert reaper.floors(conn) == {"t": 2}


def test_reap_keeps_the_db_version_when_the_newest_tombstone_goes():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 'x', 1)")
    conn.execute("DELETE FROM t")
    version = crdt.db_version(conn)
    reap(conn)
    conn.crr.invalidate_db_version()  # as after a restart: derived from the clocks again
    assert crdt.db_version(conn) == version
    conn.execute("INSERT INTO t VALUES (5, 'z', 5)")
    assert crdt.db_version(conn) == version + 1


def test_only_tombstones_at_or_below_the_bound_are_reaped_in_batches():
    conn = db()
    for i in range(5):
        conn.execute("INSERT INTO t VALUES (?, 'x', 1)", (i,))
    for i in range(5):
        conn.execute("DELETE FROM t WHERE a = ?", (i,))
    third = conn.execute(
        "SELECT db_version FROM t__crsql_clock AS c JOIN t__crsql_pks AS k "
        "ON k.__crsql_key = c.key WHERE k.a = 2"
    ).fetchone()[0]
    assert reap(conn, third, limit=2).keys == {"t": 2}  # the two oldest
    assert reap(conn, third).keys == {"t": 1}
    assert reap(conn, third).keys == {}
    assert metadata(conn) == (2, 2)  # keys 3 and 4, above the bound
    assert reap(conn).keys == {"t": 2}
    assert metadata(conn) == (0, 0)


def test_a_pass_starts_where_the_last_one_got_to():
    conn = db()
    for i in range(4):
        conn.execute("INSERT INTO t VALUES (?, 'x', 1)", (i,))
        conn.execute("DELETE FROM t WHERE a = ?", (i,))
    first = reap(conn, limit=3)
    assert first.keys == {"t": 3} and first.scanned["t"] < crdt.db_version(conn)
    second = reaper.reap_tombstones(conn, conn.crr, crdt.db_version(conn), 10, first.scanned)
    version = crdt.db_version(conn)
    assert second.keys == {"t": 1} and second.scanned == {"t": version, "p": version}
    conn.execute("INSERT INTO t VALUES (9, 'x', 1)")
    conn.execute("DELETE FROM t WHERE a = 9")  # stamped above where the last pass got to
    third = reaper.reap_tombstones(conn, conn.crr, crdt.db_version(conn), 10, second.scanned)
    assert third.keys == {"t": 1} and metadata(conn) == (0, 0)


def test_live_rows_and_reinserted_keys_are_never_reaped():
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 'x', 1), (2, 'y', 2)")
    conn.execute("DELETE FROM t WHERE a = 1")
    conn.execute("INSERT INTO t VALUES (1, 'again', 1)")  # cl 3: alive
    assert reap(conn).keys == {}
    assert metadata(conn) == (5, 2)


def test_pk_only_tables_are_reaped_too():
    conn = db()
    conn.execute("INSERT INTO p VALUES ('a'), ('b')")
    conn.execute("DELETE FROM p WHERE k = 'a'")
    assert reap(conn).keys == {"p": 1}
    assert metadata(conn, "p") == (1, 1)


@pytest.mark.parametrize("name", ["t", "p"])
def test_a_reused_key_merges_the_same_where_reaped_and_where_not(name):
    """The floor: node 0 reaps, then inserts the key again; node 1 reaped too, node 2 still holds
    the tombstone. All three end with the row, at the same causal length."""
    nodes = [db() for _ in range(3)]
    row = "(1, 'x', 1)" if name == "t" else "('a')"
    nodes[0].execute(f"INSERT INTO {name} VALUES {row}")
    nodes[0].execute(f"DELETE FROM {name}")
    for other in nodes[1:]:
        sync(nodes[0], other)
    reap(nodes[0])
    reap(nodes[1])
    again = "(1, 'new', 2)" if name == "t" else "('a')"
    local(nodes[0], f"INSERT INTO {name} VALUES {again}")
    for other in nodes[1:]:
        sync(nodes[0], other)
    expected = table(nodes[0], name)
    assert expected and all(table(n, name) == expected for n in nodes)
    cls = [
        n.execute(f"SELECT DISTINCT cl FROM crsql_changes WHERE \"table\" = '{name}'").fetchall()
        for n in nodes
    ]
    assert cls == [[(3,)]] * 3
    # and the key's later life is ordinary: delete it on node 2, everyone follows
    nodes[2].execute(f"DELETE FROM {name}")
    for other in nodes[:2]:
        sync(nodes[2], other)
    assert all(table(n, name) == [] for n in nodes)


def test_without_the_floor_a_reused_key_would_be_lost_where_the_tombstone_is_kept():
    """Why ``lift_new_keys`` exists: a plain re-insert after a reap starts at cl 1, which a node
    still holding the tombstone (cl 2) ignores."""
    a, b = db(), db()
    a.execute("INSERT INTO t VALUES (1, 'x', 1)")
    a.execute("DELETE FROM t")
    sync(a, b)
    reap(a)
    a.execute("INSERT INTO t VALUES (1, 'new', 2)")  # not through local(): no floor applied
    sync(a, b)
    assert table(a) == [(1, "new", 2)] and table(b) == []


def test_a_late_old_insert_resurrects_a_reaped_row():
    """Why the reap waits for the watermark: an insert older than the delete, arriving after the
    reap, finds no tombstone to lose to. corrosion.core.tombstones only reaps once every member
    holds every change that could be older than the delete."""
    a, b, c = db(), db(), db()
    a.execute("INSERT INTO t VALUES (1, 'x', 1)")
    sync(a, b)
    b.execute("DELETE FROM t")
    sync(b, c)
    reap(c)
    sync(a, c)  # a's insert reaches c late
    assert table(c) == [(1, "x", 1)]  # resurrected: the case the watermark rules out


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["t", "p"])
def test_a_reused_key_merges_into_cr_sqlite_as_into_a_node_that_reaped(oracle, name):
    """cr-sqlite (WASM), holding the tombstone, and a fresh cr-sqlite node take the changes of a
    key inserted again after a reap exactly as our node that reaped does: same row, same
    ``crsql_changes`` (site ids aside)."""
    schema = {
        "t": "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)",
        "p": "CREATE TABLE p (k TEXT PRIMARY KEY NOT NULL)",
    }[name]
    row, again = {"t": ("(1, 'x', 1)", "(1, 'new', 2)"), "p": ("('a')", "('a')")}[name]
    a, b = db(), db()
    holding, fresh = oracle.open(f"reap-hold-{name}"), oracle.open(f"reap-fresh-{name}")
    try:
        for theirs in (holding, fresh):
            theirs.execute(schema)
            theirs.execute(f"SELECT crsql_as_crr('{name}')")
        a.execute(f"INSERT INTO {name} VALUES {row}")
        a.execute(f"DELETE FROM {name}")
        sync(a, b)
        for change in crdt.changes_since(a, 0):
            holding.execute("INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", change)
        assert holding.execute(f"SELECT count(*) FROM {name}") == [(0,)]
        version = crdt.db_version(a)
        reap(a)
        reap(b)
        local(a, f"INSERT INTO {name} VALUES {again}")
        new = crdt.changes_since(a, version)
        crdt.merge(b, new)
        for theirs in (holding, fresh):
            for change in new:
                theirs.execute(
                    "INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", change
                )

        def view(execute):
            rows = execute(f"SELECT * FROM {name} ORDER BY 1")
            changes = execute(
                'SELECT "table", pk, cid, val, col_version, cl FROM crsql_changes ORDER BY 1, 2, 3'
            )
            return [tuple(r) for r in rows], [tuple(c) for c in changes]

        ours = view(lambda sql: b.execute(sql).fetchall())
        assert ours[0] == table(a, name) and ours[0]
        assert view(holding.execute) == ours
        assert view(fresh.execute) == ours
    finally:
        holding.close()
        fresh.close()


def test_the_floor_lifts_every_new_key_so_a_concurrent_delete_of_an_unseen_key_loses():
    """The documented deviation (docs/agent.md, "Tombstone GC"): a node with a floor cannot tell a
    key it collected from one it never saw, so it lifts both. Without GC, an insert of a key the
    writer never saw (cl 1) loses to a concurrent delete of that key (cl 2); with a floor it wins.
    All nodes still agree."""
    w, b = db(), db()
    w.execute("INSERT INTO t VALUES (9, 'gone', 0)")
    w.execute("DELETE FROM t")
    reap(w)  # w's floor for t is now 2
    b.execute("INSERT INTO t VALUES (1, 'b', 0)")
    b.execute("DELETE FROM t WHERE a = 1")  # cl 2; w never saw key 1
    local(w, "INSERT INTO t VALUES (1, 'w', 0)")  # cl 3, concurrent with b's delete
    sync(w, b)
    sync(b, w)
    assert table(w) == table(b) == [(1, "w", 0)]  # without the floor: [] on both
