"""Merge rules (precedence, resurrection, idempotence) and bad input that must change nothing."""

from __future__ import annotations

import importlib

import apsw
import pytest

import crdt
from crdt import Change


def db(merge_equal_values: bool = False):
    conn = crdt.connect(merge_equal_values=merge_equal_values)
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)")
    conn.execute("SELECT crsql_as_crr('t')")
    return conn


def sync(src, dst):
    return crdt.merge(dst, crdt.changes_since(src, 0, exclude_site=crdt.site_id(dst)))


def rows(conn):
    return conn.execute("SELECT * FROM t ORDER BY a").fetchall()


def test_larger_causal_length_wins_everything():
    c1, c2 = db(), db()
    c1.execute("INSERT INTO t VALUES (1, 1, 1)")
    c1.execute("DELETE FROM t")
    c1.execute("INSERT INTO t VALUES (1, 1, 1)")  # cl 3, b col_version 1
    c2.execute("INSERT INTO t VALUES (1, 2, 2)")
    c2.execute("UPDATE t SET b = 3")
    c2.execute("UPDATE t SET b = 4")  # cl 1, b col_version 3
    sync(c1, c2)
    assert rows(c2) == [(1, 1, 1)]
    assert c2.execute("SELECT col_version, cl FROM crsql_changes WHERE cid = 'b'").fetchone() == (
        1,
        3,
    )


def test_col_version_then_value_then_keep_local():
    c1, c2 = db(), db()
    c1.execute("INSERT INTO t VALUES (1, 'a', 5)")
    c2.execute("INSERT INTO t VALUES (1, 'b', 5)")
    sync(c1, c2)
    sync(c2, c1)
    # equal col_version: the larger value wins on both; equal values keep local
    assert rows(c1) == rows(c2) == [(1, "b", 5)]


def test_merge_equal_values_breaks_ties_by_site_id():
    c1, c2 = db(True), db(True)
    c1.execute("INSERT INTO t VALUES (1, 'same', 0)")
    c2.execute("INSERT INTO t VALUES (1, 'same', 0)")
    impacted = sync(c1, c2) + sync(c2, c1)
    hi = max(crdt.site_id(c1), crdt.site_id(c2))
    sites = {r[0] for r in c1.execute("SELECT site_id FROM crsql_changes")}
    assert sites == {hi} == {r[0] for r in c2.execute("SELECT site_id FROM crsql_changes")}
    assert impacted == 2  # the lower site took the higher site's two columns


def test_delete_wins_over_older_update_and_loses_to_resurrection():
    c1, c2 = db(), db()
    c1.execute("INSERT INTO t VALUES (1, 1, 1)")
    sync(c1, c2)
    c2.execute("UPDATE t SET b = 9")
    c1.execute("DELETE FROM t")
    sync(c1, c2)
    sync(c2, c1)
    assert rows(c1) == rows(c2) == []
    c2.execute("INSERT INTO t VALUES (1, 7, 7)")  # cl 3
    sync(c2, c1)
    assert rows(c1) == [(1, 7, 7)]


def test_idempotent_and_out_of_order():
    c1, c2 = db(), db()
    for i in range(3):
        c1.execute("INSERT INTO t VALUES (?, ?, ?)", (i, i, i))
        c1.execute("UPDATE t SET b = b + 10 WHERE a = ?", (i,))
    changes = crdt.changes_since(c1, 0)
    assert crdt.merge(c2, list(reversed(changes))) == len(changes)
    version = crdt.db_version(c2)
    assert crdt.merge(c2, changes) == 0  # duplicates: no-op
    assert crdt.db_version(c2) == version
    assert rows(c2) == rows(c1)


def test_merged_versions_are_a_running_maximum():
    c = db()
    site = b"\x01" * 16
    from crdt import pack_pk

    changes = [
        Change("t", pack_pk([i]), "b", i, 1, v, site, 1, 0) for i, v in enumerate([50, 20, 70])
    ]
    crdt.merge(c, changes)
    got = [r[0] for r in c.execute("SELECT db_version FROM crsql_changes ORDER BY pk")]
    assert got == [50, 50, 70]
    c.execute("INSERT INTO t VALUES (9, 9, 9)")
    assert crdt.db_version(c) == 71


def test_tombstone_for_unseen_row_blocks_older_columns():
    c = db()
    site = b"\x02" * 16
    pk = crdt.pack_pk([1])
    crdt.merge(c, [Change("t", pk, "-1", None, 2, 1, site, 2, 0)])
    crdt.merge(c, [Change("t", pk, "b", 5, 1, 1, site, 1, 0)])
    assert rows(c) == []
    assert c.execute("SELECT cid, cl FROM crsql_changes").fetchall() == [("-1", 2)]


def test_vtab_insert_merges():
    c1, c2 = db(), db()
    c1.execute("INSERT INTO t VALUES (1, 'x', 2)")
    for ch in crdt.changes_since(c1, 0):
        c2.execute("INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", ch)
    assert rows(c2) == [(1, "x", 2)]
    c2.execute("BEGIN")
    c2.execute(
        "INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("t", crdt.pack_pk([2]), "b", 1, 1, 1, b"\x03" * 16, 1, 0),
    )
    assert c2.execute("SELECT crsql_rows_impacted()").fetchone() == (1,)
    c2.execute("COMMIT")
    assert c2.execute("SELECT crsql_rows_impacted()").fetchone() == (0,)


GOOD = ("t", crdt.pack_pk([1]), "b", 1, 1, 1, b"\x01" * 16, 1, 0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (("nope",) + GOOD[1:], "could not find the schema information for table nope"),
        (GOOD[:1] + (b"\x05",) + GOOD[2:], "malformed pk"),
        (GOOD[:1] + (crdt.pack_pk([1, 2]),) + GOOD[2:], "has 2 columns, expected 1"),
        (GOOD[:2] + ("zz",) + GOOD[3:], "has no column 'zz'"),
        (GOOD[:4] + ("1",) + GOOD[5:], "col_version must be an integer"),
        (GOOD[:5] + (1.5,) + GOOD[6:], "db_version must be an integer"),
        (GOOD[:6] + (b"\x01" * 17,) + GOOD[7:], "longer than 16 bytes"),
        (GOOD[:6] + ("site",) + GOOD[7:], "site_id must be a blob"),
        (GOOD[:8] + (None,), "seq must be an integer"),
        (GOOD[:3], "exactly nine fields"),
        (("t" * 3000,) + GOOD[1:], "at most 2048 bytes"),
        (GOOD[:3] + ([1, 2],) + GOOD[4:], "must be NULL, integers, reals, text or blobs"),
        (GOOD[:3] + ({"a": 1},) + GOOD[4:], "must be NULL, integers, reals, text or blobs"),
        (GOOD[:4] + (2**70,) + GOOD[5:], "does not fit in 64 bits"),
        (GOOD[:3] + (2**64,) + GOOD[4:], "does not fit in 64 bits"),
        (GOOD[:1] + (crdt.pack_pk(["text"]),) + GOOD[2:], "INTEGER PRIMARY KEY takes integers"),
    ],
)
def test_bad_change_rolls_back_the_whole_batch(bad, message):
    c = db()
    c.execute("INSERT INTO t VALUES (7, 7, 7)")
    before = (c.execute("SELECT * FROM crsql_changes").fetchall(), crdt.db_version(c), rows(c))
    good_first = Change("t", crdt.pack_pk([2]), "b", 5, 1, 40, b"\x09" * 16, 1, 0)
    with pytest.raises(crdt.MergeError, match=message):
        crdt.merge(c, [good_first, bad])
    after = (c.execute("SELECT * FROM crsql_changes").fetchall(), crdt.db_version(c), rows(c))
    assert after == before
    c.execute("INSERT INTO t VALUES (8, 8, 8)")
    assert crdt.db_version(c) == 2  # in-memory version state was restored too


def test_bad_change_through_sql_is_an_sql_error():
    c = db()
    with pytest.raises(apsw.SQLError, match="malformed pk"):
        c.execute("INSERT INTO crsql_changes VALUES ('t', x'05', 'b', 1, 1, 1, NULL, 1, 0)")
    assert rows(c) == []


def test_oversize_value_is_refused_cleanly():
    c = db()
    c.limit(apsw.SQLITE_LIMIT_LENGTH, 1000)
    big = Change("t", crdt.pack_pk([1]), "b", "x" * 5000, 1, 1, b"\x01" * 16, 1, 0)
    with pytest.raises(crdt.MergeError, match="larger than this database's limit"):
        crdt.merge(c, [GOOD, big])
    assert rows(c) == []
    assert c.execute("SELECT count(*) FROM t__crsql_clock").fetchone() == (0,)


def test_merge_into_a_database_without_crrs_is_a_clean_error():
    c = crdt.connect()
    with pytest.raises(crdt.MergeError, match="could not find the schema information"):
        crdt.merge(c, [GOOD])
    assert crdt.db_version(c) == 0


def test_batched_merge_writes_what_change_by_change_merges_write(monkeypatch):
    """A large batch (several flushes, multi-row statements with a partial last one; rows whose
    every clock is rewritten, rows with one column changed, deletes, new rows) leaves the same
    tables, clocks and version as merging each change on its own through crsql_changes."""
    merge_module = importlib.import_module("crdt.merge")
    monkeypatch.setattr(merge_module, "FLUSH_ROWS", 37)
    monkeypatch.setattr(merge_module, "ROWS_PER_STATEMENT", 7)
    src = db()
    with src:
        src.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, i, f"v{i}") for i in range(250)])
    first = crdt.changes_since(src, 0)
    with src:
        src.execute("UPDATE t SET b = b + 1, c = c || '!' WHERE a < 100")
        src.execute("UPDATE t SET c = 'one' WHERE a >= 100 AND a < 200")
        src.execute("DELETE FROM t WHERE a >= 200 AND a < 220")
        src.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, -i, None) for i in range(250, 300)])
    second = crdt.changes_since(src, 0)

    batched, one_by_one = db(), db()
    for dst in (batched, one_by_one):
        crdt.merge(dst, first)
    crdt.merge(batched, second)
    with one_by_one:
        for change in second:
            one_by_one.execute(
                "INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", change
            )

    def state(conn):
        clocks = conn.execute(
            "SELECT key, col_name, col_version, db_version, site_id, seq FROM t__crsql_clock "
            "ORDER BY key, col_name"
        ).fetchall()
        changes = conn.execute("SELECT * FROM crsql_changes ORDER BY pk, cid").fetchall()
        return rows(conn), clocks, changes, crdt.db_version(conn)

    assert state(batched) == state(one_by_one)
    assert rows(batched) == rows(src)


def test_each_merge_changesets_call_in_a_transaction_takes_versions_of_its_own():
    """A node serves "version v of actor a" by reading back the clock rows at the db_version it
    recorded for it, so a version must never share its db_version with a local write or with a
    changeset merged by an earlier call in the same transaction."""
    src = [db() for _ in range(3)]
    for i, s in enumerate(src):
        s.execute("INSERT INTO t VALUES (?, ?, ?)", (i + 10, i, i))
    changesets = [crdt.changes_since(s, 0) for s in src]
    dst = db()
    dst.execute("INSERT INTO t VALUES (1, 'x', 'y')")  # committed: db_version 1
    with dst:
        dst.execute("INSERT INTO t VALUES (2, 'local', 'write')")  # pending db_version 2
        first = crdt.merge_changesets(dst, [changesets[0]])
        second = crdt.merge_changesets(dst, [changesets[1], changesets[2]])
        again = crdt.merge_changesets(dst, [changesets[0]])  # nothing wins: no version
    versions = [2, *first, *second]
    assert len(set(versions)) == 4 and versions == sorted(versions), versions
    assert again == [None]
    assert [c.pk for c in crdt.changes_for_version(dst, 2)] == [crdt.pack_pk((2,))] * 2
    for version, changes in zip(versions[1:], changesets, strict=True):
        assert crdt.changes_for_version(dst, version) == [
            c._replace(db_version=version) for c in changes
        ]
    assert crdt.db_version(dst) == versions[-1]


def test_merge_returns_how_many_changes_won():
    """The count ``merge`` returns (the agent's ``changes_applied``): one per cell written, one
    per row deleted, the sentinel and cells of a row brought back; nothing for a repeat."""
    c1, c2 = db(), db()
    c1.execute("INSERT INTO t VALUES (1, 1, 1), (2, 2, 2)")
    assert (sync(c1, c2), sync(c1, c2)) == (4, 0)
    c1.execute("DELETE FROM t WHERE a = 1")
    assert sync(c1, c2) == 1 and rows(c2) == [(2, 2, 2)]
    c1.execute("INSERT INTO t VALUES (1, 5, 5)")
    assert sync(c1, c2) == 3 and rows(c2) == [(1, 5, 5), (2, 2, 2)]
    assert sync(c1, db()) == 5  # a new replica: row 1 (sentinel at cl 3, b, c), row 2 (b, c)
    c1.execute("DELETE FROM t WHERE a = 2")
    fresh = db()
    assert sync(c1, fresh) == 4 and rows(fresh) == [(1, 5, 5)]  # row 2 arrives deleted
