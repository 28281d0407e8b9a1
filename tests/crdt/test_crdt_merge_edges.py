"""Merge rules at their edges, where the mutation score found no test looking: tables of keys
only, the versions and sites that deletes and resurrections record, what a resurrection does to
the columns it does not carry, ties under ``merge-equal-values`` against local and remote
writes, the exact words of a refusal, and the versions ``merge_changesets`` hands out."""

from __future__ import annotations

import apsw
import pytest

import crdt
from crdt import Change

OWN = b"\x80" * 16
REMOTE = b"\x07" * 16
PK1 = crdt.pack_pk([1])


def db(site_id: bytes = OWN, merge_equal_values: bool = False):
    conn = crdt.connect(site_id=site_id, merge_equal_values=merge_equal_values)
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)")
    conn.execute("SELECT crsql_as_crr('t')")
    return conn


def rows(conn, table: str = "t"):
    return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()


def clocks(conn):
    """``(cid, col_version, db_version, site_id, cl)`` per clock of ``t``, as peers read them."""
    return conn.execute(
        "SELECT cid, col_version, db_version, site_id, cl FROM crsql_changes ORDER BY pk, cid"
    ).fetchall()


def test_a_table_of_keys_only_replicates_inserts_deletes_and_reinserts():
    def keys_db():
        conn = crdt.connect()
        conn.execute("CREATE TABLE k (id INTEGER PRIMARY KEY NOT NULL)")
        conn.execute("SELECT crsql_as_crr('k')")
        return conn

    def sync(src, dst):
        return crdt.merge(dst, crdt.changes_since(src, 0, exclude_site=crdt.site_id(dst)))

    src, dst = keys_db(), keys_db()
    src.execute("INSERT INTO k VALUES (1), (2)")
    assert sync(src, dst) == 2 and rows(dst, "k") == [(1,), (2,)]
    src.execute("DELETE FROM k WHERE id = 1")
    assert sync(src, dst) == 1 and rows(dst, "k") == [(2,)]
    src.execute("INSERT INTO k VALUES (1)")  # causal length 3: the key comes back
    assert sync(src, dst) == 1 and rows(dst, "k") == [(1,), (2,)]
    fresh = keys_db()
    assert sync(src, fresh) == 2 and rows(fresh, "k") == [(1,), (2,)]


def test_deletes_and_resurrections_record_the_senders_version_and_site():
    c = db()
    other = b"\x09" * 16
    crdt.merge(c, [Change("t", PK1, "b", 1, 1, 40, REMOTE, 1, 0)])
    crdt.merge(c, [Change("t", PK1, "-1", None, 2, 55, REMOTE, 2, 0)])  # deleted at REMOTE
    assert rows(c) == []
    assert clocks(c) == [("-1", 2, 55, REMOTE, 2)]
    crdt.merge(c, [Change("t", PK1, "-1", None, 3, 70, other, 3, 0)])  # brought back at other
    assert rows(c) == [(1, None, None)]
    assert clocks(c) == [("-1", 3, 70, other, 3)]
    assert crdt.db_version(c) == 70


def test_a_resurrection_without_columns_lets_any_later_column_write_win():
    c = db()
    c.execute("INSERT INTO t VALUES (1, 'z', 'z')")
    c.execute("UPDATE t SET b = 'y'")
    c.execute("UPDATE t SET b = 'x'")  # b at col_version 3
    # REMOTE deleted and re-inserted the row; only its sentinel has arrived so far
    crdt.merge(c, [Change("t", PK1, "-1", None, 3, 100, REMOTE, 3, 0)])
    assert rows(c) == [(1, "x", "z")]  # the values stay until their columns arrive
    assert clocks(c) == [
        ("-1", 3, 100, REMOTE, 3),
        ("b", 0, 100, OWN, 3),
        ("c", 0, 100, OWN, 3),
    ]
    # a smaller value at col_version 1 now wins: the local versions were reset
    assert crdt.merge(c, [Change("t", PK1, "b", "a", 1, 101, REMOTE, 3, 1)]) == 1
    assert rows(c) == [(1, "a", "z")]


def test_a_column_at_col_version_0_after_a_resurrection_in_the_same_merge_ties_on_its_value():
    # A resurrection zeroes the local column clocks; a column the resurrecting site never wrote
    # since arrives at col_version 0 (its own zeroed clock) and ties: the greater value wins.
    c = db()
    crdt.merge(
        c,
        [
            Change("t", PK1, "b", "m", 1, 5, REMOTE, 1, 0),
            Change("t", PK1, "c", "m", 1, 5, REMOTE, 1, 1),
        ],
    )
    batch = [
        Change("t", PK1, "-1", None, 3, 9, REMOTE, 3, 0),
        Change("t", PK1, "b", "a", 0, 9, REMOTE, 3, 1),  # below "m": the local value stays
        Change("t", PK1, "c", "z", 0, 9, REMOTE, 3, 2),  # above "m": it wins
    ]
    crdt.merge(c, batch)
    assert rows(c) == [(1, "m", "z")]
    assert [(r[0], r[1]) for r in clocks(c)] == [("-1", 3), ("b", 0), ("c", 0)]


def test_a_column_change_at_the_causal_length_of_a_delete_is_ignored():
    # an even cl is a delete whatever the cid; at the row's own (deleted) cl it changes nothing
    c = db()
    crdt.merge(c, [Change("t", PK1, "b", 1, 1, 5, REMOTE, 1, 0)])
    crdt.merge(c, [Change("t", PK1, "-1", None, 2, 6, REMOTE, 2, 0)])
    before = clocks(c)
    assert crdt.merge(c, [Change("t", PK1, "b", 7, 3, 7, REMOTE, 2, 0)]) == 0
    assert rows(c) == [] and clocks(c) == before


def test_equal_values_keep_the_local_write_without_merge_equal_values():
    c = db()
    c.execute("INSERT INTO t VALUES (1, 'same', 0)")
    before = clocks(c)
    assert crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, b"\xff" * 16, 1, 0)]) == 0
    assert clocks(c) == before


def test_merge_equal_values_breaks_a_tie_against_a_local_write_by_site_id():
    c = db(merge_equal_values=True)
    c.execute("INSERT INTO t VALUES (1, 'same', 0)")  # written by OWN (0x80...)
    lower, higher = b"\x40" * 16, b"\xc0" * 16
    assert crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, lower, 1, 0)]) == 0
    assert crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, higher, 1, 0)]) == 1
    assert {r[0]: r[3] for r in clocks(c)} == {"b": higher, "c": OWN}
    # the same change again is a full tie: nothing is written
    assert crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, higher, 1, 0)]) == 0


def test_merge_equal_values_breaks_a_tie_against_a_remote_write_by_its_site_id():
    c = db(merge_equal_values=True)  # OWN is 0x80...
    first = b"\xa0" * 16
    crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, first, 1, 0)])
    between = b"\x90" * 16  # above OWN, below the site that wrote the value
    assert crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, between, 1, 0)]) == 0
    above = b"\xb0" * 16
    assert crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, above, 1, 0)]) == 1
    assert {r[0]: r[3] for r in clocks(c)} == {"b": above}


def test_merge_equal_values_a_change_without_a_site_loses_a_tie():
    c = db(merge_equal_values=True)
    low = b"\x01" * 16  # a site id below any text: no site counts as the empty blob
    crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, low, 1, 0)])
    assert crdt.merge(c, [Change("t", PK1, "b", "same", 1, 9, None, 1, 0)]) == 0
    assert {r[0]: r[3] for r in clocks(c)} == {"b": low}


GOOD = ("t", PK1, "b", 1, 1, 1, REMOTE, 1, 0)


def _with(**fields) -> tuple:
    names = ("table", "pk", "cid", "val", "col_version", "db_version", "site_id", "cl", "seq")
    return tuple(fields.get(n, v) for n, v in zip(names, GOOD, strict=True))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_with(cid=5), "cid must be text, not int"),
        (_with(col_version=1.5), "col_version must be an integer, not float"),
        (_with(db_version="1"), "db_version must be an integer, not str"),
        (_with(cl=None), "cl must be an integer, not NoneType"),
        (_with(seq=b"0"), "seq must be an integer, not bytes"),
        (_with(site_id=5), "site_id must be a blob, not int"),
        (_with(site_id=bytearray(16)), "site_id must be a blob, not bytearray"),
        (_with(site_id=bytes(17)), "site_id is longer than 16 bytes"),
        (_with(cid="x" * 2049), "cid is longer than 2048 bytes"),
        (_with(cid="é" * 1025), "cid is longer than 2048 bytes"),
        (_with(cid="x" * 2048), "table t has no column '" + "x" * 2048 + "' to merge into"),
        (_with(pk="1"), "pk must be a blob, not str"),
        (GOOD[:3], "a change has exactly nine fields"),
        (_with(table="t" * 2049), "table name must be text of at most 2048 bytes"),
        (_with(table="t" * 2048), "could not find the schema information for table " + "t" * 2048),
    ],
)
def test_a_refusal_says_exactly_what_is_wrong(bad, message):
    c = db()
    with pytest.raises(crdt.MergeError) as excinfo:
        crdt.merge(c, [GOOD, bad])
    assert str(excinfo.value) == message
    assert rows(c) == []


@pytest.mark.parametrize(
    ("val", "size"),
    [(b"\x00" * 1001, 1001), ("x" * 1001, 1001), ("é" * 600, 1200)],  # é: 2 bytes in UTF-8
)
def test_a_value_over_the_length_limit_in_bytes_is_refused(val, size):
    c = db()
    c.limit(apsw.SQLITE_LIMIT_LENGTH, 1000)
    with pytest.raises(crdt.MergeError) as excinfo:
        crdt.merge(c, [GOOD, _with(pk=crdt.pack_pk([2]), val=val)])
    assert str(excinfo.value) == (
        f"value of {size} bytes is larger than this database's limit of 1000 bytes"
    )
    assert rows(c) == []


def test_a_value_that_fits_the_limit_in_a_row_that_does_not_is_refused_cleanly():
    c = db()
    c.limit(apsw.SQLITE_LIMIT_LENGTH, 1000)
    with pytest.raises(crdt.MergeError, match=r"^a change's row is larger than this database's"):
        crdt.merge(c, [GOOD, _with(pk=crdt.pack_pk([2]), val=b"x" * 1000)])
    assert rows(c) == [] and crdt.db_version(c) == 0
    assert crdt.merge(c, [_with(val=b"x" * 900)]) == 1  # the connection is still usable


def test_a_clock_without_its_row_is_a_clean_error():
    """A damaged database (a base row deleted behind the CRR's back) is refused, not guessed."""
    c = db()
    c.execute("INSERT INTO t VALUES (1, 'v', 'w')")
    c.execute("SELECT crsql_internal_sync_bit(1)")  # as a merge does: the triggers stand aside
    c.execute("DELETE FROM t")
    c.execute("SELECT crsql_internal_sync_bit(0)")
    tie = Change("t", PK1, "b", "v", 1, 5, REMOTE, 1, 0)  # equal versions: the values compare
    with pytest.raises(crdt.MergeError) as excinfo:
        crdt.merge(c, [tie])
    assert str(excinfo.value) == "could not find row to merge with for table t"


@pytest.mark.parametrize(
    ("bad", "starts"),
    [
        (_with(val=[1]), "change values must be NULL, integers, reals, text or blobs (SQLite"),
        (_with(pk=crdt.pack_pk(["text"])), "a primary-key value does not fit its column (an"),
    ],
)
def test_values_sqlite_refuses_are_merge_errors(bad, starts):
    c = db()
    with pytest.raises(crdt.MergeError) as excinfo:
        crdt.merge(c, [bad])
    assert str(excinfo.value).startswith(starts)


def test_a_programming_error_is_not_dressed_up_as_a_bad_change():
    c = db()
    with pytest.raises(TypeError) as excinfo:
        crdt.merge(c, 5)  # not an iterable of changes
    assert not isinstance(excinfo.value, crdt.MergeError)


def test_merge_changesets_hands_out_the_next_versions_and_follows_a_sender_ahead():
    src = db(site_id=REMOTE)
    src.execute("INSERT INTO t VALUES (10, 1, 1)")
    behind = crdt.changes_since(src, 0)  # db_version 1 at the sender
    ahead = [Change("t", crdt.pack_pk([20]), "b", 2, 1, 50, REMOTE, 1, 0)]
    again = [Change("t", crdt.pack_pk([21]), "b", 3, 1, 2, REMOTE, 1, 0)]
    more = [Change("t", crdt.pack_pk([22]), "b", 3, 1, 2, REMOTE, 1, 0)]
    dst = db()
    for i in range(3):
        dst.execute("INSERT INTO t VALUES (?, 0, 0)", (i,))  # db_version 3
    with dst:
        assert crdt.merge_changesets(dst, [behind, [], again, ahead]) == [4, None, 5, 50]
        assert crdt.merge_changesets(dst, [more]) == [51]
    with dst:
        dst.execute("INSERT INTO t VALUES (30, 0, 0)")  # pending 52
        assert crdt.merge_changesets(dst, [[behind[0]._replace(pk=crdt.pack_pk([31]))]]) == [53]
    assert crdt.db_version(dst) == 53


def test_rows_impacted_add_up_over_a_transaction():
    src = db(site_id=REMOTE)
    src.execute("INSERT INTO t VALUES (1, 1, 1), (2, 2, 2)")
    changes = crdt.changes_since(src, 0)
    dst = db()
    with dst:
        crdt.merge_changesets(dst, [changes[:2]])
        crdt.merge_changesets(dst, [changes[2:]])
        assert dst.execute("SELECT crsql_rows_impacted()").fetchone() == (4,)
    merged = db()
    with merged:
        crdt.merge(merged, changes[:3])
        crdt.merge(merged, changes[3:])
        assert merged.execute("SELECT crsql_rows_impacted()").fetchone() == (4,)
    other = db()
    with other:
        for change in changes[:2]:
            other.execute("INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", change)
        assert other.execute("SELECT crsql_rows_impacted()").fetchone() == (2,)


def test_a_changeset_of_deletes_gets_a_version_that_the_commit_keeps():
    c = db()
    c.execute("INSERT INTO t VALUES (1, 1, 1)")  # db_version 1
    delete = [Change("t", PK1, "-1", None, 2, 3, REMOTE, 2, 0)]
    resurrect = [Change("t", PK1, "-1", None, 3, 4, REMOTE, 3, 0)]
    with c:
        assert crdt.merge_changesets(c, [delete]) == [3]
    assert crdt.db_version(c) == 3 and rows(c) == []
    with c:
        assert crdt.merge_changesets(c, [resurrect]) == [4]
    assert crdt.db_version(c) == 4 and rows(c) == [(1, None, None)]
    c.execute("UPDATE t SET b = 2")
    assert crdt.db_version(c) == 5


def test_a_merge_that_changes_nothing_leaves_the_transaction_one_version():
    c = db()
    c.execute("INSERT INTO t VALUES (1, 1, 1)")  # db_version 1
    stale = Change("t", PK1, "b", 0, 1, 1, REMOTE, 1, 0)  # loses to the local value 1
    with c:
        c.execute("INSERT INTO t VALUES (2, 2, 2)")
        assert crdt.merge(c, [stale]) == 0
        c.execute("INSERT INTO t VALUES (3, 3, 3)")
    assert crdt.db_version(c) == 2
    got = c.execute("SELECT DISTINCT db_version FROM crsql_changes WHERE pk != ?", (PK1,))
    assert got.fetchall() == [(2,)]


def test_changes_that_lose_do_not_stop_the_rest_of_the_batch():
    c = db()
    c.execute("INSERT INTO t VALUES (1, 5, 5)")
    c.execute("UPDATE t SET b = 6")  # b at col_version 2
    c.execute("DELETE FROM t")
    c.execute("INSERT INTO t VALUES (1, 7, 7)")  # causal length 3
    c.execute("INSERT INTO t VALUES (2, 1, 1)")
    c.execute("DELETE FROM t WHERE a = 2")  # causal length 2
    pk2 = crdt.pack_pk([2])

    def new_row(n):
        return Change("t", crdt.pack_pk([10 + n]), "b", n, 1, 9, REMOTE, 1, 0)

    batch = [
        Change("t", PK1, "b", 9, 5, 9, REMOTE, 1, 0),  # an older causal length
        new_row(1),
        Change("t", pk2, "-1", None, 2, 9, REMOTE, 2, 0),  # the delete it already has
        new_row(2),
        Change("t", PK1, "c", 9, 0, 9, REMOTE, 3, 0),  # an older col_version
        new_row(3),
    ]
    assert crdt.merge(c, batch) == 3
    assert rows(c) == [(1, 7, 7), (11, 1, None), (12, 2, None), (13, 3, None)]


def test_a_column_change_of_a_later_life_brings_a_deleted_row_back():
    c = db()
    c.execute("INSERT INTO t VALUES (1, 1, 1)")
    c.execute("DELETE FROM t")  # causal length 2
    # the sender deleted and re-inserted it; only one cell has arrived, after another row's
    other = Change("t", crdt.pack_pk([2]), "b", 2, 1, 29, REMOTE, 1, 0)
    assert crdt.merge(c, [other, Change("t", PK1, "b", 8, 1, 30, REMOTE, 3, 4)]) == 3
    assert rows(c) == [(1, 8, None), (2, 2, None)]
    assert clocks(c)[:2] == [("-1", 3, 30, REMOTE, 3), ("b", 1, 30, REMOTE, 3)]


def test_a_new_row_first_seen_in_a_later_life_takes_that_causal_length():
    c = db()  # never saw row 1: the sender's delete did not reach it
    assert crdt.merge(c, [Change("t", PK1, "b", 8, 1, 30, REMOTE, 3, 4)]) == 2
    assert rows(c) == [(1, 8, None)]
    assert clocks(c) == [("-1", 3, 30, REMOTE, 3), ("b", 1, 30, REMOTE, 3)]
    # so the delete of its first life, arriving late, changes nothing
    assert crdt.merge(c, [Change("t", PK1, "-1", None, 2, 12, REMOTE, 2, 0)]) == 0
    assert rows(c) == [(1, 8, None)]


def test_a_merged_change_gets_a_version_above_every_local_one(tmp_path):
    path = str(tmp_path / "db.sqlite")
    c = crdt.connect(path, site_id=OWN)
    c.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c)")
    c.execute("SELECT crsql_as_crr('t')")
    for i in range(5):
        c.execute("INSERT INTO t VALUES (?, 0, 0)", (i,))
    c.close()
    c = crdt.connect(path)  # a fresh connection: its version state is read from the file
    old = Change("t", crdt.pack_pk([10]), "b", 1, 1, 1, REMOTE, 1, 0)  # the sender's version 1
    assert crdt.merge(c, [old]) == 1
    got = c.execute("SELECT db_version FROM crsql_changes WHERE pk = ?", (old.pk,))
    assert got.fetchall() == [(6,)]
    assert crdt.db_version(c) == 6
    c.close()


def test_a_change_without_a_site_id_is_recorded_as_this_sites():
    c = db()
    remote = Change("t", crdt.pack_pk([2]), "b", 1, 1, 1, REMOTE, 1, 0)
    assert crdt.merge(c, [remote, Change("t", PK1, "b", 1, 1, 2, None, 1, 0)]) == 2
    assert clocks(c) == [("b", 1, 2, OWN, 1), ("b", 1, 1, REMOTE, 1)]
    assert crdt.merge(c, [Change("t", PK1, "-1", None, 2, 3, None, 2, 0)]) == 1
    assert clocks(c) == [("-1", 2, 3, OWN, 2), ("b", 1, 1, REMOTE, 1)]


def test_a_tie_against_a_site_first_seen_in_the_same_merge_uses_that_site():
    c = db(merge_equal_values=True)  # OWN is 0x80...
    first, between = b"\xa0" * 16, b"\x90" * 16
    batch = [
        Change("t", PK1, "b", "same", 1, 9, first, 1, 0),
        Change("t", PK1, "b", "same", 1, 9, between, 1, 0),  # below first: loses
    ]
    assert crdt.merge(c, batch) == 1
    assert {r[0]: r[3] for r in clocks(c)} == {"b": first}


def test_a_merge_fits_a_low_limit_on_statement_variables():
    src = db(site_id=REMOTE)
    src.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, i, str(i)) for i in range(30)])
    dst = db()
    dst.limit(apsw.SQLITE_LIMIT_VARIABLE_NUMBER, 10)  # below two clock rows (6 values each)
    assert crdt.merge(dst, crdt.changes_since(src, 0)) == 60
    assert rows(dst) == rows(src)
    # every clock too (a row's two clocks with its key once take 11 values: a clock a row)
    changes = "SELECT pk, cid, val, col_version, site_id, cl, seq FROM crsql_changes ORDER BY 1, 2"
    assert dst.execute(changes).fetchall() == src.execute(changes).fetchall()


def test_a_changeset_merged_after_the_first_local_write_of_a_database_gets_its_own_version():
    src = db(site_id=REMOTE)
    src.execute("INSERT INTO t VALUES (10, 1, 1)")
    dst = db()  # nothing written yet: db_version 0
    with dst:
        dst.execute("INSERT INTO t VALUES (1, 1, 1)")  # pending version 1
        assert crdt.merge_changesets(dst, [crdt.changes_since(src, 0)]) == [2]
    assert crdt.db_version(dst) == 2
    assert {c.pk for c in crdt.changes_for_version(dst, 1)} == {PK1}


# every affinity rule of SQLite's (the first match wins: INT, then CHAR/CLOB/TEXT, then BLOB or
# no type, then REAL/FLOA/DOUB, else NUMERIC), and the types that test the order of the rules
DECLARED = [
    "INT", "INTEGER", "BIGINT", "FLOATING POINT", "VARCHAR(5)", "NCHAR", "CLOB", "TEXT", "BLOB",
    "", "REAL", "FLOAT", "DOUBLE", "NUMERIC", "DECIMAL(5,2)", "ANY", "BOOLEAN",
]  # fmt: skip
TIE_VALUES = [
    None, 5, 4, "5", "4.0", 5.5, "5.5", 9007199254740993, "9007199254740993", "abc", b"5",
]  # fmt: skip
# a STRICT table's ANY converts nothing, its REAL takes integers as reals
STRICT_VALUES = {"s_any": TIE_VALUES, "s_real": [None, 5, 4, 5.5, "5.5"]}


def _affinity_db(mev: bool):
    conn = crdt.connect(site_id=OWN, merge_equal_values=mev)
    cols = ", ".join(f"c{i} {decl}" for i, decl in enumerate(DECLARED))
    conn.execute(f"CREATE TABLE a (id INTEGER PRIMARY KEY NOT NULL, {cols})")
    conn.execute("CREATE TABLE s (id INTEGER PRIMARY KEY NOT NULL, s_any ANY, s_real REAL) STRICT")
    for table in ("a", "s"):
        conn.execute(f"SELECT crsql_as_crr('{table}')")
    return conn


@pytest.mark.parametrize("mev", [False, True])
def test_a_tie_with_a_value_the_batch_set_converts_it_by_the_columns_affinity(mev):
    """Two writes of one column at the same col_version: the second compares with the first as
    the column stores it. One batch (the first value only in memory) must end as two batches
    (the first value read back from SQLite) for every affinity and value pair: ``'5'`` in an
    INTEGER column is 5 and loses to 7, 5 in a REAL column is 5.0 and loses to the integer 4,
    a STRICT table's ANY keeps ``'5'`` as text."""
    first: list[Change] = []
    second: list[Change] = []

    def pairs(table: str, cid: str, values: list) -> None:
        for n, (v1, v2) in enumerate((v1, v2) for v1 in values for v2 in values):
            pk = crdt.pack_pk([n])
            first.append(Change(table, pk, cid, v1, 1, 1, REMOTE, 1, 0))
            second.append(Change(table, pk, cid, v2, 1, 2, b"\x08" * 16, 1, 0))

    for i in range(len(DECLARED)):
        pairs("a", f"c{i}", TIE_VALUES)
    for cid, values in STRICT_VALUES.items():
        pairs("s", cid, values)

    once, twice = _affinity_db(mev), _affinity_db(mev)
    crdt.merge(once, first + second)
    crdt.merge(twice, first)
    crdt.merge(twice, second)
    assert _typed_state(once) == _typed_state(twice)

    def value(table: str, col: str, v1, v2):
        n = TIE_VALUES.index(v1) * len(TIE_VALUES) + TIE_VALUES.index(v2)
        return once.execute(
            f"SELECT {col}, typeof({col}) FROM {table} WHERE id = ?", (n,)
        ).fetchone()

    integer, real, blob = (f"c{DECLARED.index(t)}" for t in ("INTEGER", "REAL", "BLOB"))
    assert value("a", integer, "5", 4) == (5, "integer")  # 4 < 5: the first write stays
    assert value("a", real, 5, 4) == (4.0, "real")  # an integer beats the real 5.0
    assert value("a", blob, "5", 4) == (4, "integer")  # a BLOB column keeps '5' as text
    assert value("s", "s_any", "5", 4) == (4, "integer")  # text '5' loses to any integer


def _typed_state(conn) -> list:
    """Every row and clock with each value's storage class (5 and 5.0 are equal in Python)."""
    out = []
    for table, cols in (("a", [f"c{i}" for i in range(len(DECLARED))]), ("s", list(STRICT_VALUES))):
        typed = ", ".join(f"{c}, typeof({c})" for c in cols)
        out += conn.execute(f"SELECT id, {typed} FROM {table} ORDER BY id").fetchall()
    out += conn.execute(
        'SELECT "table", pk, cid, val, typeof(val), col_version, db_version, site_id, cl, seq '
        'FROM crsql_changes ORDER BY "table", pk, cid'
    ).fetchall()
    return out


@pytest.mark.parametrize("others", [0, 2])
def test_merge_changesets_refuses_a_db_version_that_is_not_an_integer(others):
    """The changeset's top version is found in C for integers only; any other db_version is
    the same refusal as in ``merge``, and nothing is written (with or without valid changes
    beside it)."""
    conn = db()
    good = [Change("t", crdt.pack_pk([n]), "b", n, 1, 5 + n, REMOTE, 1, 0) for n in range(others)]
    bad = Change("t", PK1, "b", 1, 1, "7", REMOTE, 1, 0)
    refusal = r"^db_version must be an integer, not str$"
    with pytest.raises(crdt.MergeError, match=refusal), conn:
        crdt.merge_changesets(conn, [good + [bad]])
    assert rows(conn) == [] and crdt.db_version(conn) == 0
    assert crdt.merge_changesets(conn, [good]) == ([5 + others - 1] if others else [None])


def _versions_around_a_merge_that_changes_nothing(execute) -> list[int]:
    """A transaction leaves db_version above every clock (its clock row deleted by hand before
    the commit); a merge whose only change loses then commits nothing, but cr-sqlite's commit
    of its write to crsql_changes reloads db_version from the clocks."""
    execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b)")
    execute("SELECT crsql_as_crr('t')")
    execute("INSERT INTO t VALUES (1, 5)")  # version 1
    execute("BEGIN")
    execute("INSERT INTO t VALUES (2, 5)")  # version 2, whose clock goes
    execute("DELETE FROM t__crsql_clock WHERE db_version = 2")
    execute("COMMIT")
    out = [execute("SELECT crsql_db_version()")[0][0]]
    losing = ("t", PK1, "b", 0, 1, 9, REMOTE, 1, 0)  # 0 < 5 at the same col_version
    execute("INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", losing)
    out.append(execute("SELECT crsql_db_version()")[0][0])
    return out


def test_a_merge_that_changes_nothing_reloads_the_version_as_cr_sqlites_commit_does():
    conn = crdt.connect(site_id=OWN)

    def execute(sql, params=()):
        if sql.startswith("INSERT INTO crsql_changes"):
            crdt.merge(conn, [Change(*params)])  # the batch path, not the virtual table
            return []
        return conn.execute(sql, params).fetchall()

    assert _versions_around_a_merge_that_changes_nothing(execute) == [2, 1]


def test_a_merge_of_no_changes_does_not_reload_the_version():
    """No change offered is no write to crsql_changes, so no commit (and no reload)."""
    conn = crdt.connect(site_id=OWN)

    def execute(sql, params=()):
        if sql.startswith("INSERT INTO crsql_changes"):
            assert crdt.merge(conn, []) == 0
            return []
        return conn.execute(sql, params).fetchall()

    assert _versions_around_a_merge_that_changes_nothing(execute) == [2, 2]


def test_cr_sqlite_reloads_the_version_after_a_merge_that_changes_nothing(oracle):
    theirs = oracle.open("noop_merge_version")
    try:
        assert _versions_around_a_merge_that_changes_nothing(theirs.execute) == [2, 1]
    finally:
        theirs.close()


@pytest.mark.parametrize("new_keys_first", [False, True])
def test_a_key_without_clock_rows_is_reused_by_a_merge(new_keys_first):
    """The lookaside keeps a key whose clock rows are gone (here deleted by hand); a merge into
    that pk finds the key instead of inserting another, whether the previous row merged was new
    (the key INSERT is tried first) or known."""
    conn = db()
    conn.execute("INSERT INTO t VALUES (1, 1, 1)")
    conn.execute("DELETE FROM t__crsql_clock")
    batch = [Change("t", PK1, "b", 9, 5, 7, REMOTE, 1, 0)]
    if new_keys_first:
        batch.insert(0, Change("t", crdt.pack_pk([2]), "b", 2, 1, 7, REMOTE, 1, 0))
    assert crdt.merge(conn, batch) == len(batch)
    assert conn.execute("SELECT * FROM t__crsql_pks ORDER BY 1").fetchall() == [
        (1, 1),
        *([(2, 2)] if new_keys_first else []),
    ]
    assert rows(conn)[0] == (1, 9, 1)
    assert ("b", 5, 7, REMOTE, 1) in clocks(conn)  # the local clocks are gone: version 7


def test_a_column_change_of_the_deleted_life_after_the_delete_in_one_batch_is_ignored():
    """The changes of one row share their pk object (the hot loop reuses the row for them):
    after a delete, a later change of the life it ended loses, as with a pk of its own."""
    for pk in (PK1, None):
        c = db()
        c.execute("INSERT INTO t VALUES (1, 1, 1)")  # causal length 1
        batch = [
            Change("t", PK1, "-1", None, 2, 5, REMOTE, 2, 0),
            Change("t", pk or crdt.pack_pk([1]), "b", 7, 9, 6, REMOTE, 1, 1),
        ]
        assert crdt.merge(c, batch) == 1
        assert rows(c) == []
        assert clocks(c) == [("-1", 2, 5, REMOTE, 2)]


def test_a_resurrecting_column_change_with_an_old_version_stamps_one_local_version():
    """A column change of a later life resurrects the row and wins in one merge: the sentinel
    and the column take the same next local version, whatever version the sender gave."""
    c = db()
    c.executemany("INSERT INTO t VALUES (?, 0, 0)", [(n,) for n in range(1, 5)])  # versions 1-4
    c.execute("DELETE FROM t WHERE a = 1")  # version 5, causal length 2
    assert crdt.merge(c, [Change("t", PK1, "b", 8, 1, 2, REMOTE, 3, 0)]) == 2
    assert [r for r in clocks(c) if r[4] == 3] == [("-1", 3, 6, REMOTE, 3), ("b", 1, 6, REMOTE, 3)]
    assert crdt.db_version(c) == 6
