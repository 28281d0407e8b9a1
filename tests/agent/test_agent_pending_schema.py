"""Kept versions and CRDT merge rules: a node that lacks a table keeps the versions that need it
and applies them when its schema arrives; whatever arrived before and after, in whatever order,
it ends with the same rows and clocks as a node that had the table all along."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from agent_helpers import apply_now, commit_now
from hypothesis import given, settings
from hypothesis import strategies as st

from corrosion.core.ranges import RangeSet
from corrosion.core.store import Store

T1 = "CREATE TABLE t1 (id INTEGER NOT NULL PRIMARY KEY, a TEXT);"
T2 = "CREATE TABLE t2 (id INTEGER NOT NULL PRIMARY KEY, b TEXT, n INTEGER DEFAULT 0);"

# one statement of a transaction: (table, kind, row id, value)
op = st.tuples(
    st.sampled_from(["t1", "t2"]),
    st.sampled_from(["upsert", "upsert", "delete"]),
    st.integers(1, 4),
    st.sampled_from(["x", "y", "123", "z"]),
)


def sql(table: str, kind: str, row: int, value: str) -> tuple[str, tuple]:
    col = "a" if table == "t1" else "b"
    if kind == "delete":
        return f"DELETE FROM {table} WHERE id = ?", (row,)
    return (
        f"INSERT INTO {table} (id, {col}) VALUES (?, ?) "
        f"ON CONFLICT (id) DO UPDATE SET {col} = excluded.{col}",
        (row, value),
    )


def state(store: Store) -> tuple:
    conn = store.conn
    rows = tuple(
        conn.execute(f"SELECT *, typeof({c}) FROM {t} ORDER BY id").fetchall()
        for t, c in (("t1", "a"), ("t2", "b"))
    )
    # No site_id: on an exact tie (two deletes of one row at the same causal length, or equal
    # values at the same col_version) cr-sqlite keeps the clock row it has, so which writer's
    # site it names depends on arrival order, on any two nodes; rows and versions do not.
    clocks = conn.execute(
        'SELECT "table", pk, cid, val, col_version, cl FROM crsql_changes ORDER BY "table", pk, cid'
    ).fetchall()
    return rows, clocks


@settings(max_examples=40, deadline=None)
@given(
    writers=st.lists(
        st.lists(st.lists(op, min_size=1, max_size=3), max_size=6), min_size=2, max_size=2
    ),
    seed=st.integers(0, 2**32),
    cut=st.floats(0, 1),
)
def test_kept_versions_converge_with_a_node_that_had_the_table(writers, seed, cut):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        origins = [Store(base / f"w{i}.db") for i in range(2)]
        full, late = Store(base / "full.db"), Store(base / "late.db")
        try:
            for s in (*origins, full):
                s.apply_schema(T1 + T2)
            late.apply_schema(T1)
            # two writers, each committing its transactions; some touch both tables
            for writer, txs in zip(origins, writers, strict=True):
                for ts, tx in enumerate(txs, 1):
                    commit_now(writer, [sql(*o) for o in tx], ts)
            items = []
            for writer in origins:
                head = writer.bookie.get(writer.actor_id).max()
                if head:
                    items += writer.serve(writer.actor_id, RangeSet([(1, head)]))
            apply_now(full, items)
            # the late node gets them in a random order, some before its schema arrives
            random.Random(seed).shuffle(items)
            split = int(len(items) * cut)
            for item in items[:split]:
                apply_now(late, [item])
            before = late.pending_summary()
            reload = late.reload_schema(T1 + T2)
            assert reload.applied.rejected == [] and reload.pending.versions == 0
            assert len(reload.applied.applied) + reload.applied.emptied == before.versions
            for item in items[split:]:
                apply_now(late, [item])
            assert late.pending_summary().versions == 0
            assert state(late) == state(full)
            assert late.bookie.gap_count() == 0
        finally:
            for s in (*origins, full, late):
                s.close()


def test_kept_versions_are_served_as_received_and_count_as_held(tmp_path):
    a, b, c = (Store(tmp_path / f"{n}.db") for n in "abc")
    try:
        a.apply_schema(T1 + T2)
        b.apply_schema(T1)
        c.apply_schema(T1 + T2)
        commit_now(a, [sql("t1", "upsert", 1, "x")], 1)
        commit_now(a, [sql("t2", "upsert", 1, "123"), sql("t1", "upsert", 2, "y")], 2)
        result = apply_now(b, list(a.serve(a.actor_id, RangeSet([(1, 2)]))))
        assert result.applied == [(a.actor_id, 1)] and result.kept == [(a.actor_id, 2)]
        assert b.bookie.get(a.actor_id).held == RangeSet([(1, 2)]) and b.bookie.gap_count() == 0
        assert b.conn.execute("SELECT id, a FROM t1").fetchall() == [(1, "x")]  # v2 is whole
        # b serves version 2 to c exactly as it received it
        apply_now(c, list(b.serve(a.actor_id, RangeSet([(1, 2)]))))
        assert state(c) == state(a)
        # again after a restart: the kept version is still held and still served
        b.close()
        b = Store(tmp_path / "b.db")
        assert b.pending_summary().to_json() == {"versions": 1, "missing": {"t2": 2}}
        again = apply_now(b, list(a.serve(a.actor_id, RangeSet([(1, 2)]))))
        assert again.duplicates == 2 and again.kept == []
        reload = b.reload_schema(T1 + T2)
        assert reload.outcome.changes == ["created table t2"]
        assert reload.applied.applied == [(a.actor_id, 2)]
        assert state(b) == state(a)
        # and once applied, served from its clocks like any version
        d = Store(tmp_path / "d.db")
        d.apply_schema(T1 + T2)
        apply_now(d, list(b.serve(a.actor_id, RangeSet([(1, 2)]))))
        assert state(d) == state(a)
        d.close()
    finally:
        for s in (a, b, c):
            s.close()


def test_a_version_needing_a_column_this_node_lacks_is_kept_from_a_one_table_batch(tmp_path):
    # every change of the batch names t2, which b has without column n: the batch's quick check
    # (one table) must still find the version that writes n and keep it whole
    a, b = (Store(tmp_path / f"{n}.db") for n in "ab")
    try:
        a.apply_schema(T1 + T2)
        b.apply_schema(T1 + "CREATE TABLE t2 (id INTEGER NOT NULL PRIMARY KEY, b TEXT);")
        commit_now(a, [("INSERT INTO t2 (id, b) VALUES (1, 'x')", ())], 1)  # names b and n
        commit_now(a, [("UPDATE t2 SET b = 'y' WHERE id = 1", ())], 2)  # names b only
        versions = list(a.serve(a.actor_id, RangeSet([(1, 2)])))
        assert {c[0] for cs in versions for c in cs.changes} == {"t2"}
        result = apply_now(b, versions)
        assert result.kept == [(a.actor_id, 1)] and result.applied == [(a.actor_id, 2)]
        assert result.kept_missing.to_json() == {"versions": 1, "missing": {"t2.n": 1}}
        assert b.conn.execute("SELECT id, b FROM t2").fetchall() == [(1, "y")]
        b.reload_schema(T1 + T2)
        assert state(b) == state(a)
    finally:
        a.close()
        b.close()
