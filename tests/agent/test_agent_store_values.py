"""Values keep their type through every path of the store: a version cut into chunks is buffered
on disk until complete, and the buffer must not convert a text '123' into the integer 123."""

from __future__ import annotations

from agent_helpers import apply_now, commit_now

from corrosion.core.ranges import RangeSet
from corrosion.core.store import Store

SCHEMA = "CREATE TABLE t (id INTEGER NOT NULL PRIMARY KEY, v);"  # v: no affinity


def test_a_chunked_version_keeps_text_that_looks_like_a_number(tmp_path):
    a, b = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    try:
        a.apply_schema(SCHEMA)
        b.apply_schema(SCHEMA)
        values = ["123", "1.5", "0x10", 7, 2.5, b"9"]
        commit_now(
            a, [("INSERT INTO t (id, v) VALUES (?, ?)", (i, values[i % 6])) for i in range(600)], 1
        )
        chunks = list(a.serve(a.actor_id, RangeSet([(1, 1)])))
        assert len(chunks) > 1  # the buffered path
        for chunk in chunks:
            apply_now(b, [chunk])
        table = "SELECT id, v, typeof(v) FROM t ORDER BY id"
        assert b.conn.execute(table).fetchall() == a.conn.execute(table).fetchall()
    finally:
        a.close()
        b.close()
