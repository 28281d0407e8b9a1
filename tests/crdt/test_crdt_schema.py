"""Schema management: diffs applied in one transaction, CRR constraints, destructive changes."""

from __future__ import annotations

import pytest

import crdt
from crdt import SchemaError
from crdt.schema import (
    apply_schema,
    load_schema_paths,
    parse_schema,
    reconcile_schema,
    source_of,
)

BASE = """
CREATE TABLE IF NOT EXISTS machines (
    id TEXT NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    state TEXT
);
CREATE INDEX IF NOT EXISTS machines_app ON machines (app);
"""


def dump(conn):
    return (
        conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall(),
        conn.execute("SELECT * FROM crsql_changes").fetchall(),
    )


def test_create_then_idempotent():
    conn = crdt.connect()
    assert apply_schema(conn, BASE) == ["created table machines", "created index machines_app"]
    conn.execute("INSERT INTO machines (id, app) VALUES ('m1', 'web')")
    before = dump(conn)
    assert apply_schema(conn, BASE) == []
    assert apply_schema(conn, " ".join(BASE.split())) == []  # reformatting is no change
    assert dump(conn) == before
    assert conn.execute("SELECT count(*) FROM crsql_changes").fetchone() == (2,)


def test_add_column_writes_no_clocks():
    conn = crdt.connect()
    apply_schema(conn, BASE)
    with conn:
        conn.executemany(
            "INSERT INTO machines (id, app) VALUES (?, 'a')", [(f"m{i}",) for i in range(5000)]
        )
    clocks_before = conn.execute(
        "SELECT count(*), max(db_version) FROM machines__crsql_clock"
    ).fetchone()
    version = crdt.db_version(conn)
    changed = apply_schema(conn, BASE.replace("state TEXT", "state TEXT, region TEXT DEFAULT 'x'"))
    assert changed == ["added column machines.region"]
    assert (
        conn.execute("SELECT count(*), max(db_version) FROM machines__crsql_clock").fetchone()
        == clocks_before
    )
    assert crdt.db_version(conn) == version
    conn.execute("UPDATE machines SET region = 'y' WHERE id = 'm1'")
    assert conn.execute(
        "SELECT col_version, db_version FROM crsql_changes WHERE cid = 'region'"
    ).fetchall() == [(1, version + 1)]


def test_parsed_schemas_are_shared_but_each_caller_gets_its_own_copy():
    first = parse_schema(BASE)
    first["machines"].columns.clear()
    first["machines"].indexes.clear()
    first["machines"].ordered = ("app",)
    second = parse_schema(BASE)
    assert list(second["machines"].columns) == ["id", "app", "state"]
    assert list(second["machines"].indexes) == ["machines_app"]
    assert second["machines"].ordered == ()
    # many distinct texts (the cache is bounded) still parse to what they say
    for i in range(40):
        assert list(parse_schema(f"CREATE TABLE t{i} (id INTEGER PRIMARY KEY)")) == [f"t{i}"]
    assert list(parse_schema(BASE)["machines"].columns) == ["id", "app", "state"]


def test_added_columns_keep_type_not_null_and_default():
    conn = crdt.connect()
    apply_schema(conn, BASE)
    conn.execute("INSERT INTO machines (id) VALUES ('m1')")
    wider = BASE.replace(
        "state TEXT", "state TEXT, \"odd name\" VARCHAR(10) NOT NULL DEFAULT 'it''s', n INT"
    )
    assert apply_schema(conn, wider) == [
        "added column machines.odd name",
        "added column machines.n",
    ]
    assert conn.execute(
        "SELECT name, type, \"notnull\", dflt_value FROM pragma_table_info('machines')"
    ).fetchall()[3:] == [("odd name", "VARCHAR(10)", 1, "'it''s'"), ("n", "INT", 0, None)]
    assert conn.execute('SELECT "odd name", n FROM machines').fetchall() == [("it's", None)]
    assert apply_schema(conn, wider) == []


@pytest.mark.parametrize("default", ["(1 + 2)", "CURRENT_TIMESTAMP", "(abs(-1))"])
def test_a_column_added_with_an_expression_default_is_refused_and_changes_nothing(default):
    """SQLite's ADD COLUMN takes only a constant literal default: the refusal says so (not a
    syntax error), and the other columns of the same change are not added either."""
    conn = crdt.connect()
    apply_schema(conn, BASE)
    wider = BASE.replace(
        "state TEXT", f"state TEXT, ok TEXT DEFAULT 'x', bad INT DEFAULT {default}"
    )
    with pytest.raises(SchemaError, match=r"column 'bad' of table 'machines' cannot be added "
                       r"with the default .*constant literal default.*DEFAULT 3"):  # fmt: skip
        apply_schema(conn, wider)
    columns = [r[0] for r in conn.execute("SELECT name FROM pragma_table_info('machines')")]
    assert "ok" not in columns and "bad" not in columns
    literals = BASE.replace(
        "state TEXT", "state TEXT, a DEFAULT -1.5, b DEFAULT 0x10, c DEFAULT TRUE, d DEFAULT NULL"
    )
    assert len(apply_schema(conn, literals)) == 4 and apply_schema(conn, literals) == []


def test_added_column_replicates_between_nodes():
    a, b = crdt.connect(), crdt.connect()
    new = BASE.replace("state TEXT", "state TEXT, region TEXT")
    for conn in (a, b):
        apply_schema(conn, BASE)
    a.execute("INSERT INTO machines (id, app, state) VALUES ('m1', 'web', 'started')")
    crdt.merge(b, crdt.changes_since(a, 0))
    for conn in (a, b):
        apply_schema(conn, new)
    a.execute("UPDATE machines SET region = 'ams'")
    crdt.merge(b, crdt.changes_since(a, 0))
    assert b.execute("SELECT * FROM machines").fetchall() == [("m1", "web", "started", "ams")]


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("CREATE TABLE t (a INTEGER PRIMARY KEY, b)", "primary key is nullable"),
        ("CREATE TABLE t (a, b)", "no primary key"),
        ("CREATE TABLE t (a TEXT NOT NULL PRIMARY KEY, b NOT NULL)", "needs a default"),
        (
            "CREATE TABLE t (a TEXT NOT NULL PRIMARY KEY, b); CREATE UNIQUE INDEX u ON t (b)",
            "unique index",
        ),
        (
            "CREATE TABLE p (a TEXT NOT NULL PRIMARY KEY);"
            "CREATE TABLE t (a TEXT NOT NULL PRIMARY KEY, b REFERENCES p (a))",
            "foreign key",
        ),
        (
            "CREATE TABLE t (a TEXT NOT NULL PRIMARY KEY); INSERT INTO t VALUES ('x')",
            "may only contain",
        ),
        ("CREATE TEMP TABLE t (a TEXT NOT NULL PRIMARY KEY)", "temporary"),
        ("CREATE TABLE t AS SELECT 1 AS a", "AS SELECT"),
        ("CREATE TABLE t (a TEXT NOT NULL PRIMARY KEY", "invalid schema statement"),
    ],
)
def test_invalid_schemas_are_refused_and_change_nothing(schema, message):
    conn = crdt.connect()
    apply_schema(conn, BASE)
    before = dump(conn)
    with pytest.raises(SchemaError, match=message):
        apply_schema(conn, BASE + ";" + schema)
    assert dump(conn) == before


@pytest.mark.parametrize(
    ("new_schema", "message"),
    [
        ("", "missing from the schema and would be dropped"),
        (
            BASE.replace(",\n    state TEXT", ""),
            "column 'state' of table 'machines' would be dropped",
        ),
        (BASE.replace("state TEXT", "state INTEGER"), "would change definition"),
        (
            BASE.replace("id TEXT NOT NULL PRIMARY KEY", "id TEXT NOT NULL").replace(
                "state TEXT", "state TEXT, PRIMARY KEY (id, app)"
            ),
            "primary key",
        ),
    ],
)
def test_destructive_changes_need_the_flag(new_schema, message):
    conn = crdt.connect()
    apply_schema(conn, BASE)
    conn.execute("INSERT INTO machines VALUES ('m1', 'web', 'started')")
    before = dump(conn)
    with pytest.raises(SchemaError, match=message):
        apply_schema(conn, new_schema or "CREATE TABLE other (k TEXT NOT NULL PRIMARY KEY)")
    assert dump(conn) == before
    apply_schema(
        conn,
        new_schema or "CREATE TABLE other (k TEXT NOT NULL PRIMARY KEY)",
        allow_destructive=True,
    )
    assert (
        apply_schema(conn, new_schema or "CREATE TABLE other (k TEXT NOT NULL PRIMARY KEY)") == []
    )


def test_destructive_drop_column_keeps_rows_and_compacts_clocks():
    conn = crdt.connect()
    apply_schema(conn, BASE)
    conn.execute("INSERT INTO machines VALUES ('m1', 'web', 'started')")
    apply_schema(conn, BASE.replace(",\n    state TEXT", ""), allow_destructive=True)
    assert conn.execute("SELECT * FROM machines").fetchall() == [("m1", "web")]
    assert [r[0] for r in conn.execute("SELECT cid FROM crsql_changes")] == ["app"]
    conn.execute("UPDATE machines SET app = 'api'")  # triggers work after the rebuild
    assert conn.execute("SELECT count(*) FROM crsql_changes WHERE val = 'api'").fetchone() == (1,)


def test_pk_change_recreates_clocks():
    conn = crdt.connect()
    apply_schema(conn, BASE)
    conn.execute("INSERT INTO machines VALUES ('m1', 'web', 'started')")
    new = BASE.replace("id TEXT NOT NULL PRIMARY KEY", "id TEXT NOT NULL").replace(
        "state TEXT", "state TEXT, PRIMARY KEY (app, id)"
    )
    apply_schema(conn, new, allow_destructive=True)
    pks = {crdt.unpack_pk(r[0]) for r in conn.execute("SELECT pk FROM crsql_changes")}
    assert pks == {("web", "m1")}


def test_indexes_added_changed_dropped():
    conn = crdt.connect()
    apply_schema(conn, BASE)
    changed = BASE.replace("ON machines (app)", "ON machines (app, state)")
    assert apply_schema(conn, changed) == ["recreated index machines_app"]
    extra = changed + "CREATE INDEX machines_state ON machines (state);"
    assert apply_schema(conn, extra) == ["created index machines_state"]
    assert apply_schema(conn, changed) == ["dropped index machines_state"]


def test_plain_tables_mode_and_adoption(tmp_path):
    conn = crdt.connect()
    steps = "CREATE TABLE steps (run INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (run, n))"
    apply_schema(conn, steps, as_crr=False)
    assert not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name = 'steps__crsql_clock'"
    ).fetchone()
    conn.execute("INSERT INTO steps VALUES (1, 1)")
    assert apply_schema(conn, steps) == ["made table steps a CRR"]  # adopted, row backfilled
    assert conn.execute("SELECT count(*) FROM crsql_changes").fetchone() == (1,)


def test_schema_paths(tmp_path):
    (tmp_path / "b.sql").write_text("CREATE TABLE b (k TEXT NOT NULL PRIMARY KEY);")
    (tmp_path / "a.sql").write_text("CREATE TABLE a (k TEXT NOT NULL PRIMARY KEY);")
    (tmp_path / "notes.txt").write_text("ignored")
    conn = crdt.connect()
    apply_schema(conn, load_schema_paths([tmp_path]))
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('a', 'b')"
        )
    ]
    assert sorted(names) == ["a", "b"]
    with pytest.raises(SchemaError, match="does not exist"):
        load_schema_paths([tmp_path / "missing"])


def test_a_statement_error_can_name_its_file(tmp_path):
    (tmp_path / "a.sql").write_text("CREATE TABLE a (id INTEGER NOT NULL PRIMARY KEY);")
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.sql").write_text(
        "-- b's table\nCREATE TABLE b (id INTEGER NOT NULL PRIMARY KEY, /* note */ v TEXT;"
    )
    paths = [tmp_path / "a.sql", other]
    with pytest.raises(SchemaError) as caught:
        apply_schema(crdt.connect(), load_schema_paths(paths))
    assert "invalid schema statement" in str(caught.value)
    assert source_of(caught.value.statement, paths) == other / "b.sql"
    assert source_of("CREATE TABLE c (x)", paths) is None


# The same table as BASE, written differently: quoting, case, spacing, IF NOT EXISTS.
BASE_RESTATED = """
create table "machines"(
  id text not null primary key,   app TEXT NOT NULL DEFAULT '',
  state TEXT);
CREATE INDEX "machines_app" ON Machines ( app );
"""


def test_a_definition_repeated_identically_is_a_no_op():
    conn = crdt.connect()
    assert apply_schema(conn, BASE + ";" + BASE_RESTATED) == [
        "created table machines",
        "created index machines_app",
    ]
    conn.execute("INSERT INTO machines (id, app) VALUES ('m1', 'web')")
    before = dump(conn)
    assert apply_schema(conn, BASE + ";" + BASE_RESTATED) == []
    assert apply_schema(conn, BASE) == []  # the first definition is the one kept
    assert dump(conn) == before
    assert apply_schema(conn, BASE_RESTATED.split("CREATE INDEX")[0]) == [
        "dropped index machines_app"
    ]
    assert apply_schema(conn, BASE_RESTATED + ";" + BASE) == ["created index machines_app"]
    assert apply_schema(conn, BASE_RESTATED + ";" + BASE) == []
    assert conn.execute("SELECT * FROM machines").fetchall() == [("m1", "web", None)]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            "CREATE TABLE machines (id TEXT NOT NULL PRIMARY KEY, app TEXT, state TEXT)",
            "table 'machines' is defined twice in the schema, differently",
        ),
        (
            "CREATE TABLE IF NOT EXISTS machines (id TEXT NOT NULL PRIMARY KEY, app TEXT)",
            "table 'machines' is defined twice in the schema, differently",
        ),
        (
            "CREATE INDEX machines_app ON machines (state)",
            "index 'machines_app' is defined twice in the schema, differently",
        ),
    ],
)
def test_a_definition_repeated_differently_is_refused(second, message):
    conn = crdt.connect()
    apply_schema(conn, BASE)
    before = dump(conn)
    with pytest.raises(SchemaError, match=message):
        apply_schema(conn, BASE + ";" + second)
    assert dump(conn) == before


def test_reconcile_keeps_tables_the_schema_does_not_list():
    conn = crdt.connect()
    apply_schema(conn, BASE)
    conn.execute("CREATE TABLE local_only (k TEXT PRIMARY KEY, v TEXT)")
    conn.execute("INSERT INTO local_only VALUES ('a', 'b')")
    other = "CREATE TABLE other (k TEXT NOT NULL PRIMARY KEY)"
    outcome = reconcile_schema(conn, other)
    assert outcome.changes == ["created table other"]
    assert outcome.unlisted == ["machines", "local_only"]
    assert conn.execute("SELECT * FROM local_only").fetchall() == [("a", "b")]
    assert reconcile_schema(conn, BASE + ";" + other).unlisted == ["local_only"]
    # other destructive changes are still refused
    with pytest.raises(SchemaError, match="would be dropped"):
        reconcile_schema(conn, BASE.replace(",\n    state TEXT", "") + ";" + other)
    outcome = reconcile_schema(conn, BASE + ";" + other, allow_destructive=True)
    assert outcome.changes == ["dropped table local_only"] and outcome.unlisted == []


ORDERED = (
    BASE.replace("state TEXT", "state")
    + "SELECT crsql_fract_as_ordered('machines', 'state', 'app');\n"
)


def order_of(conn, app):
    return [
        r[0] for r in conn.execute("SELECT id FROM machines WHERE app = ? ORDER BY state", (app,))
    ]


def test_an_ordered_list_in_the_schema_is_made_once_remade_and_removed():
    conn = crdt.connect()
    changes = apply_schema(conn, ORDERED)
    assert changes[-1] == "made table machines an ordered list by state per app"
    assert apply_schema(conn, ORDERED) == []
    conn.execute("INSERT INTO machines (id, app, state) VALUES ('m1', 'web', 1), ('m2', 'web', -1)")
    assert order_of(conn, "web") == ["m2", "m1"]
    # a new column: the view's triggers name the columns, so the list is made again
    grown = ORDERED.replace("state\n", "state,\n    region TEXT\n")
    assert apply_schema(conn, grown) == [
        "added column machines.region",
        "made table machines an ordered list by state per app",
    ]
    conn.execute(
        "INSERT INTO machines_fractindex (id, app, region, after_id) "
        "VALUES ('m3', 'web', 'ams', 'm2')"
    )
    assert order_of(conn, "web") == ["m2", "m3", "m1"]
    # no longer asked for: the triggers and view go, the rows and their keys stay
    assert apply_schema(conn, grown.split("SELECT crsql_fract")[0]) == [
        "table machines is no longer an ordered list (its order keys stay)"
    ]
    assert order_of(conn, "web") == ["m2", "m3", "m1"]
    assert conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name LIKE '%fractindex%'"
    ).fetchone() == (0,)


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("SELECT crsql_fract_as_ordered(machines, 'state')", "string literals"),
        ("SELECT crsql_fract_as_ordered('machines')", "the column to order by"),
        ("SELECT crsql_fract_as_ordered('nope', 'state')", "not defined in the schema"),
        ("SELECT crsql_fract_as_ordered('machines', 'nope')", "has no column 'nope'"),
        ("SELECT crsql_fract_as_ordered('machines', 'id')", "part of the primary key"),
        ("SELECT crsql_fract_as_ordered('machines', 'state', 'state')", "appear once"),
        (
            "SELECT crsql_fract_as_ordered('machines', 'state', 'app');\n"
            "SELECT crsql_fract_as_ordered('machines', 'state')",
            "twice in the schema",
        ),
        ("SELECT crsql_as_crr('machines')", "may only contain"),
    ],
)
def test_bad_ordered_lists_are_refused_and_change_nothing(statement, message):
    conn = crdt.connect()
    apply_schema(conn, BASE)
    before = dump(conn)
    with pytest.raises(SchemaError, match=message):
        apply_schema(conn, BASE + statement)
    assert dump(conn) == before
