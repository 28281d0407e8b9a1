"""The packed primary-key format, byte for byte (vectors verified against cr-sqlite)."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt import PackError, pack_pk, unpack_pk

VECTORS = [
    ((1,), "010901"),
    (("a",), "010B0161"),
    ((0,), "0101"),
    ((128,), "010980"),
    ((65536,), "0119010000"),
    ((4294967295,), "0121FFFFFFFF"),
    ((-1,), "0141FFFFFFFFFFFFFFFF"),
    ((-2500000,), "0141FFFFFFFFFFD9DA60"),
    ((1, "x"), "0209010B0178"),
    ((12, "str", b"\x01\x02\x03"), "03090C0B037374720C03010203"),
    ((b"\x01\x02",), "010C020102"),
    ((256, 1.5, None, "", b""), "05110100023FF8000000000000050304"),
]


@pytest.mark.parametrize(("values", "hexed"), VECTORS)
def test_vectors(values, hexed):
    assert pack_pk(values).hex().upper() == hexed
    assert unpack_pk(bytes.fromhex(hexed)) == values


def test_decode_zero_extends():
    # a sign-extending decoder would read one 0x80 byte as -128
    assert unpack_pk(bytes.fromhex("010980")) == (128,)
    assert unpack_pk(bytes.fromhex("0111FF80")) == (0xFF80,)


def test_pack_columns_sql_function_matches(tmp_path):
    import crdt

    conn = crdt.connect()
    got = conn.execute("SELECT crsql_pack_columns(256, 1.5, NULL, '', x'')").fetchone()[0]
    assert got.hex().upper() == "05110100023FF8000000000000050304"


sqlite_values = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
)


@given(st.lists(sqlite_values, min_size=1, max_size=8))
def test_roundtrip(values):
    out = unpack_pk(pack_pk(values))
    assert len(out) == len(values)
    for a, b in zip(out, values, strict=True):
        assert type(a) is type(b)
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@given(st.binary(max_size=40))
def test_malformed_input_raises_pack_error_only(blob):
    with contextlib.suppress(PackError):
        unpack_pk(blob)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00",
        b"\x02\x09\x01",
        b"\x01\x49" + b"\x00" * 9,
        b"\x01\x0b\x05ab",
        b"\x01\x07",
        b"\x01\x0b\x01\xff",
        b"\x01\x09\x01\x00",
    ],
)
def test_malformed_vectors(blob):
    with pytest.raises(PackError):
        unpack_pk(blob)


def test_unpackable_values():
    with pytest.raises(PackError):
        pack_pk([])
    with pytest.raises(PackError):
        pack_pk([2**64])
    with pytest.raises(PackError):
        pack_pk([object()])
    with pytest.raises(PackError):
        pack_pk([0] * 256)
