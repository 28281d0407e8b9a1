"""Targeted differential tests of the local-write triggers against the real cr-sqlite: the paths
the random scripts of test_crdt_differential.py reach rarely or never, each found as a blind spot
by the mutation score (bench/mutation_score.py --module crdt-triggers). After every statement
the changes, the db_version and the table must match.

Primary-key changes move column clocks, which we re-stamp and upstream does not
(docs/crdt-compatibility.md), so for scripts that change a pk only what that deviation leaves
alone is compared: every clock's value, col_version and causal length, and the sentinels'
db_versions."""

from __future__ import annotations

import itertools

import pytest
from crdt_replicas import OursDb

pytestmark = pytest.mark.oracle

_names = itertools.count()

CHANGES = (
    "SELECT [table], pk, cid, val, col_version, db_version, cl, seq FROM crsql_changes "
    "ORDER BY [table], pk, cid"
)
# what a pk change leaves as upstream has it: moved clocks keep value, col_version and cl;
# sentinels (cid '-1') keep their db_version too
PK_CHANGE = (
    "SELECT [table], pk, cid, val, col_version, cl, "
    "CASE WHEN cid = '-1' THEN db_version END FROM crsql_changes ORDER BY [table], pk, cid"
)

SCRIPTS = {
    # An UPDATE that names a pk column fires the pk trigger; an unchanged pk must write no
    # delete or create record, whether or not the row has a sentinel.
    "pk assigned its own value": [
        "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (1, 'x', 1), (2, 'y', 2)",
        "UPDATE t SET a = a, b = 'z' WHERE a = 1",
        "UPDATE t SET a = 2 WHERE a = 2",
        "DELETE FROM t WHERE a = 1",
        "INSERT INTO t VALUES (1, 'again', 3)",
        "UPDATE t SET a = a WHERE a = 1",
        "UPDATE t SET c = 4, a = 1 WHERE a = 1",
    ],
    "composite pk assigned its own value": [
        "CREATE TABLE t (k1 TEXT NOT NULL, v, k2 INTEGER NOT NULL, PRIMARY KEY (k2, k1))",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES ('a', 1, 1), ('b', 2, 1)",
        "UPDATE t SET k1 = k1, k2 = k2, v = 10 WHERE k1 = 'a'",
        "DELETE FROM t WHERE k1 = 'b'",
        "INSERT INTO t VALUES ('b', 3, 1)",
        "UPDATE t SET k2 = 1 WHERE k1 = 'b'",
    ],
    "pk-only table assigned its own pk": [
        "CREATE TABLE p (a INTEGER NOT NULL, b TEXT NOT NULL, PRIMARY KEY (b, a))",
        "SELECT crsql_as_crr('p')",
        "INSERT INTO p VALUES (1, 'x')",
        "UPDATE p SET a = a",
        "DELETE FROM p",
        "INSERT INTO p VALUES (1, 'x')",
        "UPDATE p SET b = 'x', a = 1",
    ],
    # cl 1 -> 2 -> 3 -> 4 -> 5: the sentinel exists from the first delete on, so every later
    # record bumps it rather than creating it
    "deleted and re-inserted twice": [
        "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (1, 'x', 1)",
        "DELETE FROM t",
        "INSERT INTO t VALUES (1, 'y', 2)",
        "DELETE FROM t",
        "INSERT INTO t (a, b) VALUES (1, 'z')",
        "UPDATE t SET c = 3",
    ],
    # Seqs live outside the database: a savepoint rolled back does not give back the seqs its
    # writes took, in cr-sqlite as here, so the writes after it continue from the later seq.
    "savepoint rolled back inside a transaction": [
        "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)",
        "CREATE TABLE p (a TEXT PRIMARY KEY NOT NULL)",
        "SELECT crsql_as_crr('t')",
        "SELECT crsql_as_crr('p')",
        "INSERT INTO t VALUES (1, 'x', 1)",
        "BEGIN",
        "INSERT INTO t VALUES (2, 'y', 2)",
        "SAVEPOINT s",
        "INSERT INTO t VALUES (3, 'z', 3)",
        "INSERT INTO p VALUES ('k')",
        "UPDATE t SET b = 'w' WHERE a = 1",
        "DELETE FROM t WHERE a = 2",
        "ROLLBACK TO s",
        "INSERT INTO t VALUES (4, 'v', 4)",
        "DELETE FROM t WHERE a = 2",
        "INSERT INTO t VALUES (2, 'again', 5)",
        "INSERT INTO p VALUES ('k')",
        "RELEASE s",
        "COMMIT",
        "INSERT INTO t VALUES (3, 'after', 6)",
    ],
    # a pk-only re-insert takes one seq: the writes after it in the transaction show how many
    "pk-only table re-inserted inside a transaction": [
        "CREATE TABLE p (a TEXT PRIMARY KEY NOT NULL)",
        "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b)",
        "SELECT crsql_as_crr('p')",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO p VALUES ('x')",
        "BEGIN",
        "DELETE FROM p",
        "INSERT INTO p VALUES ('x')",
        "INSERT INTO t VALUES (1, 'after')",
        "INSERT OR REPLACE INTO p VALUES ('x')",
        "INSERT INTO t VALUES (2, 'later')",
        "COMMIT",
    ],
    "pk-only table deleted and re-inserted twice": [
        "CREATE TABLE p (a TEXT PRIMARY KEY NOT NULL)",
        "SELECT crsql_as_crr('p')",
        "INSERT INTO p VALUES ('x'), ('y')",
        "DELETE FROM p WHERE a = 'x'",
        "INSERT INTO p VALUES ('x')",
        "DELETE FROM p WHERE a = 'x'",
        "INSERT INTO p VALUES ('x')",
        "INSERT OR REPLACE INTO p VALUES ('y')",
        "INSERT OR IGNORE INTO p VALUES ('y')",
    ],
    # Names the trigger bodies use for their own tables and aliases (the clock's key and
    # col_name, the lookaside alias k, a VALUES list's column1 and column2) as the table's.
    "columns named like the triggers' internals": [
        "CREATE TABLE w (column1 INTEGER NOT NULL, key TEXT NOT NULL, col_name, column2, "
        "seq, k, PRIMARY KEY (column1, key))",
        "SELECT crsql_as_crr('w')",
        "INSERT INTO w VALUES (1, 'a', 'n', 2, 3, 4), (1, 'b', NULL, NULL, NULL, NULL)",
        "UPDATE w SET col_name = 'm', seq = 9 WHERE key = 'a'",
        "DELETE FROM w WHERE key = 'a'",
        "INSERT INTO w VALUES (1, 'a', 'again', 0, 0, 0)",
        "INSERT OR REPLACE INTO w VALUES (1, 'b', 1, 2, 3, 4)",
        "UPDATE w SET k = 'kk', column2 = 'c2'",
    ],
    # A column added by ALTER has no clock until written; the first write starts one for that
    # row only, though the rows share the first pk column.
    "added column first written on one of two rows sharing a pk prefix": [
        "CREATE TABLE t (a INTEGER NOT NULL, b TEXT NOT NULL, c, PRIMARY KEY (a, b))",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (1, 'x', 0), (1, 'y', 0), (2, 'x', 0)",
        "SELECT crsql_begin_alter('t')",
        "ALTER TABLE t ADD COLUMN d",
        "SELECT crsql_commit_alter('t')",
        "UPDATE t SET d = 5 WHERE a = 1 AND b = 'y'",
        "UPDATE t SET d = 6 WHERE b = 'x'",
        "UPDATE t SET d = 6 WHERE b = 'x'",
    ],
}

# Scripts with pk changes, compared with PK_CHANGE.
PK_CHANGE_SCRIPTS = {
    # the old key has a sentinel (its row was re-inserted): the delete record bumps it
    "pk of a re-inserted row changed": [
        "CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (1, 'x', 1)",
        "DELETE FROM t",
        "INSERT INTO t VALUES (1, 'y', 2)",
        "UPDATE t SET a = 7",
        "UPDATE t SET a = 1",
    ],
    # the new key was deleted before: the create record bumps its sentinel to the next odd cl
    "pk moved onto a deleted key": [
        "CREATE TABLE t (a INTEGER NOT NULL, b TEXT NOT NULL, c, PRIMARY KEY (a, b))",
        "SELECT crsql_as_crr('t')",
        "INSERT INTO t VALUES (1, 'x', 1), (2, 'x', 2)",
        "DELETE FROM t WHERE a = 2",
        "UPDATE t SET a = 2 WHERE a = 1",
        "UPDATE t SET b = 'y', c = 3",
    ],
    "pk-only row moved back and forth": [
        "CREATE TABLE p (a INTEGER PRIMARY KEY NOT NULL)",
        "SELECT crsql_as_crr('p')",
        "INSERT INTO p VALUES (1)",
        "UPDATE p SET a = 2",
        "UPDATE p SET a = 1",
        "UPDATE p SET a = 2",
    ],
}


def run(db, script: list[str], read: str) -> list:
    """What each statement returns, then the changes, the db_version and the tables."""
    out = []
    for sql in script:
        out.append(typed(db.execute(sql)))
        out.append(typed(db.execute(read)))
        out.append(db.execute("SELECT crsql_db_version()"))
        names = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '%crsql%' "
            "ORDER BY name"
        )
        out.append([(n, sorted(typed(db.execute(f"SELECT * FROM {n}")))) for (n,) in names])
    return out


def typed(rows: list[tuple]) -> list[tuple]:
    """Each value with its storage class, so that 1 and 1.0 differ (and rows sort)."""
    return [tuple((type(v).__name__, v if v is not None else 0) for v in row) for row in rows]


def compare(oracle, name: str, script: list[str], read: str) -> None:
    ours = run(OursDb(False), script, read)
    theirs = run(oracle.open(f"trig-{next(_names)}"), script, read)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"{name!r}, statement {i // 4} ({script[i // 4]}): ours {a} != cr-sqlite {b}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_local_writes_match_cr_sqlite(oracle, name):
    compare(oracle, name, SCRIPTS[name], CHANGES)


@pytest.mark.parametrize("name", sorted(PK_CHANGE_SCRIPTS))
def test_pk_changes_match_cr_sqlite_but_for_the_re_stamp(oracle, name):
    compare(oracle, name, PK_CHANGE_SCRIPTS[name], PK_CHANGE)
