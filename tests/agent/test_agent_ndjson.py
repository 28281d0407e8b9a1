"""Query rows as NDJSON: the fast encoder (orjson where its bytes are the same) writes exactly
what the standard library's encoder writes, for every kind of SQLite value."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

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
