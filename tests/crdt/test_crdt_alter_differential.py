"""Differential tests of the alter path and of turning populated tables into CRRs, against the
real cr-sqlite: ``crsql_as_crr`` on a table that already has rows, ``crsql_begin_alter`` /
``crsql_commit_alter`` around column additions (with and without defaults, written inside the
alter or not), and ``crsql_as_table``. Every statement's result, the changes and the version
must match."""

from __future__ import annotations

import pytest
from crdt_replicas import OursDb

pytestmark = pytest.mark.oracle

READ = (
    "SELECT [table], pk, cid, val, col_version, db_version, cl, seq FROM crsql_changes "
    "ORDER BY db_version, seq, pk, cid"
)

SCRIPTS = {
    "nullable column added, some rows written inside the alter": [
        "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b)",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (1, 1)",
        "INSERT INTO t VALUES (2, 2)",
        "SELECT crsql_begin_alter('t')",
        "ALTER TABLE t ADD COLUMN c",
        "ALTER TABLE t ADD COLUMN d INTEGER DEFAULT 0",
        "UPDATE t SET c = 5, d = 7 WHERE a = 1",
        "SELECT crsql_commit_alter('t')",
        "INSERT INTO t (a, b) VALUES (3, 3)",
        "UPDATE t SET c = 'later' WHERE a = 2",
    ],
    "column with a default, untouched": [
        "CREATE TABLE t (a TEXT PRIMARY KEY NOT NULL, b)",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES ('x', 1), ('y', 2)",
        "SELECT crsql_begin_alter('t')",
        "ALTER TABLE t ADD COLUMN c TEXT NOT NULL DEFAULT 'z'",
        "SELECT crsql_commit_alter('t')",
        "UPDATE t SET c = 'w' WHERE a = 'y'",
    ],
    "as_crr on a populated table, then as_table": [
        "CREATE TABLE t (a INTEGER NOT NULL, b TEXT NOT NULL, c, d DEFAULT 4, PRIMARY KEY (b, a))",
        "INSERT INTO t VALUES (1, 'p', NULL, 4), (2, 'q', 'c2', 9), (3, 'r', 0, NULL)",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (4, 's', 1, 1)",
        "DELETE FROM t WHERE a = 2",
        "SELECT crsql_as_table('t')",
        "SELECT count(*) FROM sqlite_master WHERE name LIKE 't__crsql%'",
    ],
    "pk-only table made a CRR with rows": [
        "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL)",
        "INSERT INTO t VALUES (1), (2)",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (3)",
    ],
}


def run(db, script: list[str]) -> list:
    out = []
    for sql in script:
        out.append(db.execute(sql))
        if "crsql_as_table" not in sql and "count(*)" not in sql:
            out.append(db.execute(READ))
        out.append(db.execute("SELECT crsql_db_version()"))
    return out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_alter_and_as_crr_match_cr_sqlite(oracle, name):
    script = SCRIPTS[name]
    ours = run(OursDb(False), script)
    theirs_db = oracle.open(f"alter-{sorted(SCRIPTS).index(name)}")
    theirs = run(theirs_db, script)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"step {i} of {name!r}: ours {a} != cr-sqlite {b}"
