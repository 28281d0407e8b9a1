"""A chunked version whose changes share a seq survives the buffer (found by the simulator's
chunked workload, ``simulations.agent_load``, seed 3).

A node that merges a change resurrecting a deleted row stamps the row's sentinel with that
change's seq; when it serves the version, the sentinel and the column change come with one seq.
The buffer of partial versions keyed changes by seq alone and dropped the second one, so the
receiver applied the version without it and diverged for good."""

from __future__ import annotations

import apsw
from agent_helpers import apply_now, commit_now

from corrosion.core.changeset import Changeset
from corrosion.core.ranges import RangeSet
from corrosion.core.store import Store

SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY NOT NULL, v TEXT, n INTEGER DEFAULT 0);"
UPSERT = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"


def _store(tmp_path, name: str) -> Store:
    s = Store(tmp_path / f"{name}.db")
    s.apply_schema(SCHEMA)
    return s


def _served(store: Store, actor: bytes, version: int) -> list:
    return list(store.serve(actor, RangeSet([(version, version)])))


def test_a_served_version_whose_changes_share_a_seq_applies_whole(tmp_path):
    origin, server, receiver = (_store(tmp_path, n) for n in ("o", "s", "r"))
    try:
        commit_now(origin, [(UPSERT, ("x", "first"))], 1)
        commit_now(origin, [("DELETE FROM kv WHERE k = 'x'", ())], 2)
        commit_now(origin, [(UPSERT, ("x", "again"))], 3)  # the row lives again (cl 3)
        big = [(UPSERT, (f"b{i}", "y" * 400)) for i in range(60)]
        commit_now(origin, [*big[:30], (UPSERT, ("x", "last")), *big[30:]], 4)
        for v in (1, 2, 4):  # the server never sees version 3: version 4 resurrects the row
            apply_now(server, _served(origin, origin.actor_id, v))
        served = _served(server, origin.actor_id, 4)
        assert len(served) > 1  # chunked: the receiver buffers it
        seqs = [c.seq for cs in served if isinstance(cs, Changeset) for c in cs.changes]
        assert len(seqs) > len(set(seqs)), "the served version should hold two changes on a seq"
        for v in (1, 2):
            apply_now(receiver, _served(origin, origin.actor_id, v))
        for chunk in reversed(served):
            apply_now(receiver, [chunk])
        table = "SELECT k, v, n FROM kv ORDER BY k"
        assert receiver.conn.execute(table).fetchall() == server.conn.execute(table).fetchall()
        assert receiver.conn.execute("SELECT v FROM kv WHERE k = 'x'").fetchall() == [("last",)]
    finally:
        for s in (origin, server, receiver):
            s.close()


def test_a_buffer_keyed_by_seq_alone_is_rebuilt(tmp_path):
    """A database made before the fix: its buffered changes are kept, under the new key."""
    path = tmp_path / "old.db"
    conn = apsw.Connection(str(path))
    conn.execute(
        'CREATE TABLE __corro_buffered_changes ("table" TEXT NOT NULL, pk BLOB NOT NULL, '
        "cid TEXT NOT NULL, val, col_version INTEGER NOT NULL, db_version INTEGER NOT NULL, "
        "site_id BLOB, cl INTEGER NOT NULL, seq INTEGER NOT NULL, actor_id BLOB NOT NULL, "
        "version INTEGER NOT NULL, PRIMARY KEY (actor_id, version, seq)) WITHOUT ROWID"
    )
    conn.execute(
        "INSERT INTO __corro_buffered_changes VALUES ('kv', x'01', 'v', 'text', 1, 1, NULL, 1, "
        "0, x'00', 1)"
    )
    conn.close()
    s = Store(path)
    try:
        keyed = s.conn.execute(
            "SELECT name FROM pragma_table_info('__corro_buffered_changes') WHERE pk > 0 "
            "ORDER BY pk"
        ).fetchall()
        assert [k for (k,) in keyed] == ["actor_id", "version", "seq", "table", "pk", "cid"]
        assert s.conn.execute("SELECT cid, val FROM __corro_buffered_changes").fetchall() == [
            ("v", "text")
        ]
    finally:
        s.close()
