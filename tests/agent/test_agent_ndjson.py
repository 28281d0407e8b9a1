"""Query rows as NDJSON: the fast encoder (orjson where its bytes are the same) writes exactly
what the standard library's encoder writes, for every kind of SQLite value."""

from __future__ import annotations

import contextlib
import json
import threading
from unittest import mock

import apsw
import pytest
from agent_helpers import agent_config
from hypothesis import given, settings
from hypothesis import strategies as st
from support import wait_for

import crdt
from corrosion import Agent
from corrosion.runtime import reads
from corrosion.runtime.reads import ENCODE_CHUNK, ENCODED_BYTES, ENCODED_FIRST, READ_AHEAD
from corrosion.surfaces.ndjson import json_cell, row_json, row_lines

# every value a SQLite read can return (NaN cannot be stored, but the encoder takes it)
CELLS = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.text(alphabet=st.characters(max_codepoint=0x7F)),  # control characters, DEL
    st.binary(),
)


def stdlib_line(rowid: int, row: tuple) -> bytes:
    """The line as json.dumps writes it (compact, ASCII, blobs as arrays, inf as text)."""
    cells = json.dumps([json_cell(v) for v in row], separators=(",", ":"))
    return b'{"row":[%d,%b]}\n' % (rowid, cells.encode())


@settings(max_examples=500)
@given(st.lists(st.tuples(CELLS, CELLS, CELLS), max_size=8), st.integers(0, 10**6))
def test_row_lines_are_the_stdlib_encoding(rows, after):
    expected = b"".join(stdlib_line(i, row) for i, row in enumerate(rows, after + 1))
    assert row_lines(rows, after) == expected
    for row in rows:
        assert row_json(row) == json.dumps([json_cell(v) for v in row], separators=(",", ":"))


# what a SQLite column can hold and give back as it was (no NaN: SQLite stores it as NULL; no
# lone surrogates: not UTF-8)
STORED = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=True),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",))),
    st.sampled_from(["]],[", '"]]}\n{"row":[', "a\nb", "\x7f", "[[1,2],[3]]"]),
    st.binary(),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(STORED, STORED, STORED), max_size=40),
    st.integers(1, 50),
    st.integers(1, 7),
    st.integers(0, 10**6),
)
def test_a_trip_read_in_chunks_is_the_per_row_encoding(rows, n, chunk, before):
    """A trip reads and encodes ``ENCODE_CHUNK`` rows at a time, numbering on across chunks:
    its bytes are the rows' per-row encoding, whatever the values and wherever the chunks
    end, and it stops early only at the end of the result."""
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE t (a, b, c)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    stored = conn.execute("SELECT a, b, c FROM t ORDER BY rowid").fetchall()
    cursor = conn.execute("SELECT a, b, c FROM t ORDER BY rowid")
    with mock.patch.object(reads, "ENCODE_CHUNK", chunk):
        got, encoded = reads._fetch(cursor, n, row_lines, before)
    assert got == min(n, len(rows))
    expected = stored[:got]
    assert encoded == b"".join(stdlib_line(i, row) for i, row in enumerate(expected, before + 1))
    conn.close()


def test_each_kind_of_value_encodes_as_before():
    row = (
        1.5,
        1e16,
        1e-05,
        0.1,
        2**63 - 1,
        -(2**63),
        "é ☃ 𝄞",
        '\x7fa"b\\\t\x1f',
        b"\x00\xff",
        None,
        float("inf"),
        float("-inf"),
        "",
        b"",
    )
    assert row_lines([row, ("NaN", 7)], 41) == (
        b'{"row":[42,[1.5,1e+16,1e-05,0.1,9223372036854775807,-9223372036854775808,'
        b'"\\u00e9 \\u2603 \\ud834\\udd1e","\\u007fa\\"b\\\\\\t\\u001f",[0,255],null,'
        b'"inf","-inf","",[]]]}\n'
        b'{"row":[43,["NaN",7]]}\n'
    )


@pytest.mark.anyio
async def test_an_encoded_stream_reads_fewer_rows_per_trip_when_they_are_wide(tmp_path):
    """Small rows go ``batch`` a trip after the first; wide ones about a MiB of output a trip, so
    a result of wide rows is never held whole in memory. Within a trip rows are encoded
    ``ENCODE_CHUNK`` at a time, numbered on across chunks and trips: the stream is exactly the
    per-row encoding of every row, in order."""
    async with Agent(agent_config(tmp_path, "wide")) as agent:
        wide = 4000
        await agent.execute(
            [
                ["INSERT INTO kv (k, v) VALUES (?, ?)", [f"w{i:05d}", "w" * wide]]
                for i in range(1200)
            ]
        )
        await agent.execute(
            [["INSERT INTO kv (k, v) VALUES (?, ?)", [f"s{i:05d}", "s"]] for i in range(5000)]
        )
        for prefix, count in (("w", 1200), ("s", 5000)):
            chunks: list[int] = []

            def encode(rows: list[tuple], before: int) -> bytes:
                chunks.append(len(rows))  # noqa: B023 (called before the loop moves on)
                return row_lines(rows, before)

            trips: list[int] = []
            body = b""
            sql = f"SELECT k, v FROM kv WHERE k >= '{prefix}' AND k < '{prefix}~' ORDER BY k"
            async for kind, payload in agent.query_stream(sql, batch=4096, encode=encode):
                if kind == "rows":
                    trips.append(payload.count(b"\n"))
                    body += payload
            rows = [row async for row in agent.query(sql)]
            assert len(rows) == count
            assert body == b"".join(stdlib_line(i, row) for i, row in enumerate(rows, 1))
            assert sum(trips) == count and max(chunks) <= ENCODE_CHUNK
            assert trips[0] == ENCODED_FIRST
            if prefix == "w":
                assert max(trips[1:]) <= ENCODED_BYTES // wide < ENCODED_FIRST
            else:
                assert trips[1] == 4096


@pytest.mark.anyio
async def test_an_encoded_stream_closed_early_stops_reading_ahead(tmp_path):
    """Past its first trip a stream reads on ahead in a thread of its own, at most READ_AHEAD
    batches past what was taken; closing the stream ends that thread, and the read connection
    it used answers the next query."""
    async with Agent(agent_config(tmp_path, "early")) as agent:
        for start in range(0, 30_000, 5_000):
            await agent.execute(
                [
                    ["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i:05d}", i]]
                    for i in range(start, start + 5_000)
                ]
            )
        encoded: list[int] = []

        def encode(rows: list[tuple], before: int) -> bytes:
            encoded.append(len(rows))
            return row_lines(rows, before)

        stream = agent.query_stream("SELECT k, v FROM kv", batch=1024, encode=encode)
        async with contextlib.aclosing(stream):
            async for kind, _payload in stream:
                if kind == "rows":  # the first trip's; the feed has started
                    break
            await wait_for(
                lambda: sum(encoded) >= ENCODED_FIRST + READ_AHEAD * 1024,
                what="the stream to read ahead",
            )
        # taken: the first trip; then READ_AHEAD batches waiting and at most one being put
        assert sum(encoded) <= ENCODED_FIRST + (READ_AHEAD + 1) * 1024
        await wait_for(
            lambda: not any(t.name == "corrosion-feed" for t in threading.enumerate()),
            what="the read-ahead thread to end",
        )
        assert len([row async for row in agent.query("SELECT k FROM kv")]) == 30_000


@pytest.mark.parametrize(
    "rows",
    [
        [("a]],[2,[b", 1), ("c", 2)],  # text holding the cut between two lines
        [("]],[", b"\x01"), (b"", "]]"), (None, ",[")],
        [(b"\x01\x02", b"\x03"), (b"", b"")],  # blobs (arrays) last and side by side
        [()],
    ],
)
def test_row_lines_cut_at_lines_only(rows):
    expected = b"".join(stdlib_line(i, row) for i, row in enumerate(rows, 8))
    assert row_lines(rows, 7) == expected


def test_a_read_connection_given_back_has_its_cursors_closed(tmp_path):
    """Read connections skip SQLite's mutex (NOMUTEX): a cursor left open by whoever borrowed
    one must not be finalized later, from another thread, while the next borrower reads, so
    ``release`` closes it; the connection itself reads on."""
    db = tmp_path / "r.db"
    conn = crdt.connect(str(db))
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1, 101)])
    conn.close()
    pool = reads.Reads(db)
    borrowed = pool.connection()
    left_open = borrowed.execute("SELECT x FROM t ORDER BY x")
    assert next(left_open) == (1,)
    pool.release(borrowed)
    with pytest.raises(apsw.CursorClosedError):
        next(left_open)
    again = pool.connection()
    assert again is borrowed
    assert again.execute("SELECT count(*) FROM t").fetchone() == (100,)
    pool.release(again)
    pool.close()
