"""``crdt.CompactChanges``: a changeset's changes in the shape they travel in (eight fields, the
db_version the changeset's, a site id of None meaning its origin's) merge as the same changes in
nine fields do, and read as them."""

from __future__ import annotations

import random
import re

import pytest

import crdt
from crdt import Change, CompactChanges

ORIGIN = b"\x07" * 16
OTHER = b"\x09" * 16
VALUES = [None, 0, 1, 2.5, "", "a", "b", b"a", 10**12]


def db():
    conn = crdt.connect(site_id=b"\x80" * 16, merge_equal_values=True)
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY NOT NULL, b, c TEXT DEFAULT 'd')")
    conn.execute("SELECT crsql_as_crr('t')")
    conn.execute("INSERT INTO t VALUES (0, 'local', 'row')")
    return conn


def state(conn) -> tuple:
    return (
        crdt.db_version(conn),
        conn.execute("SELECT * FROM t ORDER BY a").fetchall(),
        conn.execute("SELECT * FROM crsql_changes ORDER BY pk, cid").fetchall(),
    )


def random_changesets(rng: random.Random) -> list[tuple[int, list[list]]]:
    """``(db_version, eight-field rows)`` per changeset: deletes, resurrections, ties, sites
    left out (None) and given."""
    out = []
    for _ in range(rng.randint(1, 6)):
        rows = []
        for seq in range(rng.randint(0, 12)):
            cl = rng.choice([1, 1, 1, 2, 3])
            if rng.random() < 0.2:
                cid, val, cv = "-1", None, cl
            else:
                cid, val, cv = rng.choice("bc"), rng.choice(VALUES), rng.randint(1, 3)
            site = rng.choice([None, None, ORIGIN, OTHER])
            pk = crdt.pack_pk([rng.randrange(6)])
            rows.append(["t", pk, cid, val, cv, site, cl, seq])
        out.append((rng.randint(1, 30), rows))
    return out


@pytest.mark.parametrize("checked", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_compact_changesets_merge_as_their_nine_field_changes(seed, checked):
    # (checked: rows a decoder checked, whose types the merge does not test again)
    changesets = random_changesets(random.Random(seed))
    compact, full = db(), db()
    with compact:
        got = crdt.merge_changesets(
            compact,
            [CompactChanges(rows, ORIGIN, dbv, checked=checked) for dbv, rows in changesets],
        )
    nine = [[(*r[:5], dbv, r[5] or ORIGIN, *r[6:]) for r in rows] for dbv, rows in changesets]
    with full:
        want = crdt.merge_changesets(full, nine)
    assert got == want
    assert state(compact) == state(full)


def test_a_compact_changeset_takes_its_db_version_and_its_origins_site():
    conn = db()
    rows = [("t", crdt.pack_pk([1]), "b", "x", 1, None, 1, 0)]
    rows.append(("t", crdt.pack_pk([1]), "c", "y", 1, OTHER, 1, 1))
    with conn:
        assert crdt.merge_changesets(conn, [CompactChanges(rows, ORIGIN, 40)]) == [40]
    assert conn.execute(
        "SELECT cid, db_version, site_id FROM crsql_changes WHERE pk = ? ORDER BY cid",
        (crdt.pack_pk([1]),),
    ).fetchall() == [("b", 40, ORIGIN), ("c", 40, OTHER)]


@pytest.mark.parametrize(
    ("row", "db_version", "message"),
    [
        (
            ("t", crdt.pack_pk([1]), "b", 1, 1, None, 1),
            1,
            "a compact change has exactly eight fields",
        ),
        (
            ("t", crdt.pack_pk([1]), "b", 1, "1", None, 1, 0),
            1,
            "col_version must be an integer, not str",
        ),
        (("t", crdt.pack_pk([1]), "b", 1, 1, "site", 1, 0), 1, "site_id must be a blob, not str"),
        (
            ("t", crdt.pack_pk([1]), "zz", 1, 1, None, 1, 0),
            1,
            "table t has no column 'zz' to merge into",
        ),
        (
            ("t", crdt.pack_pk([1]), "b", 1, 1, None, 1, 0),
            "1",
            "db_version must be an integer, not str",
        ),
        (
            ("t", crdt.pack_pk([1]), "b", 1, 1, None, 1, 0),
            True,
            "db_version must be an integer, not bool",
        ),
    ],
)
def test_a_bad_compact_change_is_refused_and_nothing_is_merged(row, db_version, message):
    conn = db()
    before = state(conn)
    good = CompactChanges([("t", crdt.pack_pk([2]), "b", 1, 1, None, 1, 0)], ORIGIN, 1)
    with pytest.raises(crdt.MergeError, match=f"^{re.escape(message)}$"), conn:
        crdt.merge_changesets(conn, [good, CompactChanges([row], ORIGIN, db_version)])
    assert state(conn) == before


@pytest.mark.parametrize("site", [None, "origin", b"\x07" * 17])
def test_a_compact_changeset_without_an_origin_site_id_is_refused(site):
    conn = db()
    before = state(conn)
    rows = [("t", crdt.pack_pk([1]), "b", 1, 1, None, 1, 0)]
    with (
        pytest.raises(
            crdt.MergeError,
            match=r"^a compact changeset.s site id must be a blob of 16 bytes or less$",
        ),
        conn,
    ):
        crdt.merge_changesets(conn, [CompactChanges(rows, site, 1)])
    assert state(conn) == before


def test_a_row_equal_to_the_previous_ones_merges_into_the_same_row():
    # decoded rows name their row with equal objects, not the same ones (as rows read from a
    # database do): each change still lands in its own row, and a row's changes in one
    conn = db()
    rows = [
        ("t", crdt.pack_pk([k]), cid, f"{k}{cid}", 1, None, 1, seq)
        for seq, (k, cid) in enumerate([(1, "b"), (1, "c"), (2, "b"), (1, "b"), (2, "c")])
    ]
    rows[3] = ("t", crdt.pack_pk([1]), "b", "1b2", 2, None, 1, 3)  # a later version of (1, b)
    assert rows[0][1] is not rows[1][1] and rows[0][1] == rows[1][1]
    with conn:
        assert crdt.merge_changesets(conn, [CompactChanges(rows, ORIGIN, 9, checked=True)]) == [9]
    assert conn.execute("SELECT * FROM t ORDER BY a").fetchall() == [
        (0, "local", "row"),
        (1, "1b2", "1c"),
        (2, "2b", "2c"),
    ]


def test_compact_changes_read_as_nine_field_changes():
    rows = (("t", b"\x01", "b", 1, 2, None, 1, 0), ("t", b"\x02", "c", "x", 3, OTHER, 1, 1))
    changes = CompactChanges(rows, ORIGIN, 5)
    nine = (("t", b"\x01", "b", 1, 2, 5, ORIGIN, 1, 0), ("t", b"\x02", "c", "x", 3, 5, OTHER, 1, 1))
    assert len(changes) == 2 and list(changes) == list(nine)
    assert changes[0] == nine[0] and changes[-1] == nine[1] and changes[1:] == nine[1:]
    assert type(changes[0]) is tuple and Change(*changes[1]).site_id == OTHER
    assert changes == nine and nine == changes and changes == list(nine)
    assert changes == CompactChanges(list(rows), ORIGIN, 5)
    assert changes != CompactChanges(rows, OTHER, 5) and changes != CompactChanges(rows, ORIGIN, 6)
    assert changes != "not changes" and changes != nine[:1]
    assert hash(changes) == hash(nine)
    assert repr(changes) == f"CompactChanges({nine!r})"
    assert not CompactChanges((), ORIGIN, 1)
