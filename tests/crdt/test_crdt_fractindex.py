"""Ordered lists on our engine alone: bad arguments are refused and change nothing, what we do where
upstream fails (composite primary keys in the conflict fix, WITHOUT ROWID tables), and replicas
that insert into the same list concurrently converge to the same order once they have merged.
Agreement with cr-sqlite itself is test_crdt_fract_differential.py's job."""

from __future__ import annotations

import contextlib
import itertools

import apsw
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stdlib_readers import check_parses_in_stdlib, read_everything, stored_schema

import crdt

TODO = "CREATE TABLE todo (id INTEGER PRIMARY KEY NOT NULL, list_id INTEGER, body TEXT, pos)"


def ordered(grouping: tuple[str, ...] = ("list_id",), site: bytes | None = None) -> crdt.Connection:
    conn = crdt.connect(site_id=site)
    conn.execute(TODO)
    conn.execute("SELECT crsql_as_crr('todo')")
    args = ", ".join(f"'{c}'" for c in ("todo", "pos", *grouping))
    conn.execute(f"SELECT crsql_fract_as_ordered({args})")
    return conn


def order_of(conn: apsw.Connection, list_id: int = 1) -> list[int]:
    rows = conn.execute("SELECT id FROM todo WHERE list_id = ? ORDER BY pos, id", (list_id,))
    return [r[0] for r in rows]


def schema_of(conn: apsw.Connection) -> list[tuple[str, str]]:
    return list(conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name"))


def test_front_end_after_and_moves():
    conn = ordered()
    conn.execute("INSERT INTO todo (id, list_id, body, pos) VALUES (1, 1, 'one', 1)")
    conn.execute("INSERT INTO todo (id, list_id, body, pos) VALUES (3, 1, 'three', 1)")
    conn.execute("INSERT INTO todo (id, list_id, body, pos) VALUES (0, 1, 'zero', -1)")
    conn.execute(
        "INSERT INTO todo_fractindex (id, list_id, body, after_id) VALUES (2, 1, 'two', 1)"
    )
    conn.execute("INSERT INTO todo (id, list_id, body, pos) VALUES (9, 2, 'other list', 1)")
    assert order_of(conn) == [0, 1, 2, 3]
    conn.execute("UPDATE todo_fractindex SET after_id = 3 WHERE id = 0")  # move after a row
    assert order_of(conn) == [1, 2, 3, 0]
    conn.execute("UPDATE todo SET pos = -1 WHERE id = 3")  # move to the front
    assert order_of(conn) == [3, 1, 2, 0]
    conn.execute("UPDATE todo SET pos = 1 WHERE id = 1")  # and to the end
    assert order_of(conn) == [3, 2, 0, 1]
    # no such row to insert after: the front of the list
    conn.execute("INSERT INTO todo_fractindex (id, list_id, body) VALUES (4, 1, 'first')")
    assert order_of(conn) == [4, 3, 2, 0, 1]
    assert order_of(conn, 2) == [9]
    keys = [r[0] for r in conn.execute("SELECT pos FROM todo WHERE list_id = 1 ORDER BY pos")]
    assert all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys)


def test_whole_table_is_one_list_without_grouping_columns():
    conn = ordered(grouping=())
    for i, list_id in enumerate([1, 2, 1]):
        conn.execute("INSERT INTO todo (id, list_id, pos) VALUES (?, ?, 1)", (i, list_id))
    keys = [r[0] for r in conn.execute("SELECT pos FROM todo ORDER BY id")]
    assert keys == ["a ", "a!", 'a"']


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("crsql_fract_as_ordered('nope', 'pos')", "table 'nope' does not exist"),
        ("crsql_fract_as_ordered('plain', 'pos')", "table 'plain' is not a CRR"),
        ("crsql_fract_as_ordered('todo', 'nope')", "table 'todo' has no column 'nope'"),
        ("crsql_fract_as_ordered('todo', 'pos', 'nope')", "table 'todo' has no column 'nope'"),
        ("crsql_fract_as_ordered('todo', 'id')", "order column 'id' is part of the primary key"),
        ("crsql_fract_as_ordered('todo', 'pos', 'pos')", "each column may appear once"),
        ("crsql_fract_as_ordered('todo', 'pos', 'body', 'body')", "each column may appear once"),
        ("crsql_fract_as_ordered('todo')", "Must provide at least 2 arguments"),
        ("crsql_fract_as_ordered('todo', 1)", "the order column name must be text"),
        ("crsql_fract_as_ordered('todo', 'pos', 2)", "grouping column names must be text"),
    ],
)
def test_bad_arguments_are_refused_and_change_nothing(call, message):
    conn = ordered()  # a previous, good as_ordered must survive the failed call untouched
    conn.execute("CREATE TABLE plain (id INTEGER PRIMARY KEY NOT NULL, pos)")
    before = schema_of(conn)
    with pytest.raises(crdt.FractIndexError, match=message):
        conn.execute(f"SELECT {call}")
    assert schema_of(conn) == before
    conn.execute("INSERT INTO todo (id, list_id, pos) VALUES (1, 1, 1)")
    assert conn.execute("SELECT pos FROM todo").fetchall() == [("a ",)]


def test_python_api_and_key_errors():
    conn = crdt.connect()
    conn.execute(TODO)
    with pytest.raises(crdt.FractIndexError, match="not a CRR"):
        crdt.as_ordered(conn, "todo", "pos")
    crdt.as_crr(conn, "todo")
    crdt.as_ordered(conn, "todo", "pos", "list_id")
    crdt.as_ordered(conn, "todo", "pos", "list_id")  # idempotent
    assert crdt.key_between(None, None) == "a "
    assert crdt.key_between("a ", "a!") == "a P"
    for a, b, message in [
        ("a!", "a ", "a must be before b"),
        ("a ", "a ", "a must be before b"),
        ("", None, "order key is empty"),
        ("a é", None, "not a printable ASCII character"),
        ("5", None, "head is out of range"),
        ("c1", None, "integer part of key is too long"),
        ("a1 ", None, "should not end with ' '"),
    ]:
        with pytest.raises(crdt.FractIndexError, match=message):
            crdt.key_between(a, b)
    with pytest.raises(crdt.FractIndexError, match="must be text, not int"):
        conn.execute("SELECT crsql_fract_key_between(1, NULL)")


def test_as_ordered_is_refused_inside_views_and_triggers():
    conn = ordered()
    conn.execute("CREATE VIEW sneaky AS SELECT crsql_fract_as_ordered('todo', 'pos') AS r")
    with pytest.raises(apsw.SQLError, match="unsafe use"):
        conn.execute("SELECT * FROM sneaky")


def test_rerun_with_other_grouping_replaces_every_trigger():
    conn = ordered(grouping=("list_id",))
    conn.execute("SELECT crsql_fract_as_ordered('todo', 'pos')")  # one list now
    conn.execute("INSERT INTO todo (id, list_id, pos) VALUES (1, 1, 1)")
    conn.execute("INSERT INTO todo (id, list_id, pos) VALUES (2, 2, 1)")
    conn.execute("INSERT INTO todo (id, list_id, pos) VALUES (3, 3, 'a ')")
    conn.execute("UPDATE todo SET pos = 1 WHERE id = 3")  # the move trigger too: after 2
    keys = dict(conn.execute("SELECT id, pos FROM todo").fetchall())
    assert keys == {1: "a ", 2: "a!", 3: 'a"'}


def test_conflict_fix_with_a_composite_primary_key():
    """Upstream's conflict fix builds invalid SQL for a composite key and the insert fails."""
    conn = crdt.connect()
    conn.execute("CREATE TABLE c (a INTEGER NOT NULL, b TEXT NOT NULL, pos, PRIMARY KEY (a, b))")
    conn.execute("SELECT crsql_as_crr('c')")
    conn.execute("SELECT crsql_fract_as_ordered('c', 'pos')")
    conn.execute("INSERT INTO c VALUES (1, 'x', 1), (2, 'x', 1)")
    conn.execute("UPDATE c SET pos = 'a!' WHERE a = 1")  # 1 and 2 share a key now
    conn.execute("INSERT INTO c_fractindex (a, b, after_a, after_b) VALUES (3, 'x', 1, 'x')")
    rows = conn.execute("SELECT a, pos FROM c ORDER BY pos, a").fetchall()
    assert rows == [(1, "a "), (3, "a P"), (2, "a!")]


def test_without_rowid_table():
    """Upstream's triggers address the row by _rowid_, which a WITHOUT ROWID table lacks."""
    conn = crdt.connect()
    conn.execute("CREATE TABLE w (id INTEGER PRIMARY KEY NOT NULL, pos) WITHOUT ROWID")
    conn.execute("SELECT crsql_as_crr('w')")
    conn.execute("SELECT crsql_fract_as_ordered('w', 'pos')")
    conn.execute("INSERT INTO w VALUES (2, 1), (1, -1)")
    conn.execute("INSERT INTO w_fractindex (id, after_id) VALUES (3, 1)")
    assert [r[0] for r in conn.execute("SELECT id FROM w ORDER BY pos")] == [1, 3, 2]


def test_ordered_list_database_opens_in_stdlib_sqlite(tmp_path):
    """The view and triggers parse in the stdlib's SQLite, and the file reads there (against
    SQLite 3.37: ``scripts/check-sqlite-3.37 tests/crdt/test_crdt_fractindex.py -k stdlib``)."""
    path = tmp_path / "list.db"
    conn = crdt.connect(str(path))
    conn.execute(TODO)
    conn.execute("SELECT crsql_as_crr('todo')")
    conn.execute("SELECT crsql_fract_as_ordered('todo', 'pos', 'list_id')")
    conn.execute("INSERT INTO todo (id, list_id, pos) VALUES (1, 1, 1), (2, 1, -1)")
    conn.execute("INSERT INTO todo_fractindex (id, list_id, after_id) VALUES (3, 1, 2)")
    schema = stored_schema(conn)
    conn.close()
    assert {kind for kind, _name, _sql in schema} == {"table", "index", "trigger", "view"}
    check_parses_in_stdlib(schema)
    assert read_everything(path)["todo"] == [
        (1, 1, None, "a "),
        (2, 1, None, "Z~"),
        (3, 1, None, "Z~P"),
    ]


# -- replication -------------------------------------------------------------------------------


def sync(src: apsw.Connection, dst: apsw.Connection) -> None:
    crdt.merge(dst, crdt.changes_since(src, 0))


def items(conn: apsw.Connection) -> list[tuple]:
    return conn.execute("SELECT * FROM todo ORDER BY list_id, pos, id").fetchall()


def test_concurrent_inserts_into_one_list_converge():
    a, b = ordered(site=b"\x01" * 16), ordered(site=b"\x02" * 16)
    for i in (1, 2, 3):
        a.execute("INSERT INTO todo (id, list_id, body, pos) VALUES (?, 1, 'a', 1)", (i,))
    sync(a, b)
    # both insert after 1 and append, unaware of each other: the same keys on both sides
    a.execute("INSERT INTO todo_fractindex (id, list_id, body, after_id) VALUES (10, 1, 'a', 1)")
    b.execute("INSERT INTO todo_fractindex (id, list_id, body, after_id) VALUES (20, 1, 'b', 1)")
    a.execute("INSERT INTO todo (id, list_id, body, pos) VALUES (11, 1, 'a', 1)")
    b.execute("INSERT INTO todo (id, list_id, body, pos) VALUES (21, 1, 'b', 1)")
    b.execute("UPDATE todo SET pos = -1 WHERE id = 3")
    sync(a, b)
    sync(b, a)
    assert items(a) == items(b)
    assert order_of(a) == [3, 1, 10, 20, 2, 11, 21]  # equal keys tie; the pk decides
    # inserting after a row whose key collides moves that row down first, on one replica
    a.execute("INSERT INTO todo_fractindex (id, list_id, body, after_id) VALUES (12, 1, 'a', 20)")
    assert order_of(a) == [3, 1, 20, 12, 10, 2, 11, 21]
    keys = dict(a.execute("SELECT id, pos FROM todo").fetchall())
    assert (keys[1], keys[20], keys[12], keys[10]) == ("a ", "a 8", "a D", "a P")
    sync(a, b)
    sync(b, a)
    assert items(a) == items(b)


ID = st.integers(0, 8)


@st.composite
def operation(draw):
    kind = draw(st.sampled_from(["front", "end", "after", "move", "to_end", "delete", "list"]))
    new_id, target, list_id = draw(ID), draw(ID), draw(st.integers(1, 2))
    if kind in ("front", "end"):
        return (
            "INSERT OR IGNORE INTO todo (id, list_id, pos) VALUES (?, ?, ?)",
            [new_id, list_id, -1 if kind == "front" else 1],
        )
    if kind == "after":
        return (
            "INSERT INTO todo_fractindex (id, list_id, after_id) VALUES (?, ?, ?)",
            [new_id, list_id, target],
        )
    if kind == "move":
        return "UPDATE todo_fractindex SET after_id = ? WHERE id = ?", [target, new_id]
    if kind == "to_end":
        return "UPDATE todo SET pos = ? WHERE id = ?", [draw(st.sampled_from([-1, 1])), new_id]
    if kind == "list":
        return (
            "UPDATE todo_fractindex SET list_id = ?, after_id = ? WHERE id = ?",
            [list_id, target, new_id],
        )
    return "DELETE FROM todo WHERE id = ?", [new_id]


@settings(max_examples=100)
@given(
    rounds=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 2), operation()), max_size=6),
            st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=3),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_replicas_converge_to_one_order(rounds):
    """Three replicas write concurrently (the same ids, the same lists) and merge some of the
    time; once every replica has merged every other's changes, tables and orders are equal."""
    nodes = [ordered(site=bytes([i + 1]) * 16) for i in range(3)]
    try:
        for writes, syncs in rounds:
            for node, (sql, params) in writes:
                with contextlib.suppress(apsw.ConstraintError):  # an id taken on that replica
                    nodes[node].execute(sql, params)
            for src, dst in syncs:
                if src != dst:
                    sync(nodes[src], nodes[dst])
        for _ in range(2):
            for src, dst in itertools.permutations(nodes, 2):
                sync(src, dst)
        assert items(nodes[0]) == items(nodes[1]) == items(nodes[2])
    finally:
        for n in nodes:
            n.close()
