"""cr-sqlite's cross-type value order: NULL < BLOB < TEXT < REAL < INTEGER."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crdt import compare_values


def test_class_order_not_sqlite_order():
    ordered = [None, b"\xff", "z", 99999.5, 1000]
    for i, a in enumerate(ordered):
        for j, b in enumerate(ordered):
            assert compare_values(a, b) == (i > j) - (i < j)


def test_within_class():
    assert compare_values(1, 2) == -1
    assert compare_values(2.5, 2.25) == 1
    assert compare_values("ab", "abc") == -1
    assert compare_values("é", "z") == 1  # UTF-8 bytes, not locale
    assert compare_values(b"\x01", b"\x01\x00") == -1
    assert compare_values(None, None) == 0
    assert compare_values(1, 1.0) == 1  # INTEGER ranks above REAL


values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(), st.binary())


@given(values, values)
def test_antisymmetric(a, b):
    assert compare_values(a, b) == -compare_values(b, a)


@given(values, values, values)
def test_transitive(a, b, c):
    if compare_values(a, b) <= 0 and compare_values(b, c) <= 0:
        assert compare_values(a, c) <= 0
