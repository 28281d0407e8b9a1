"""cr-sqlite's value order, used to break col_version ties in merges and to detect UPDATE changes.

Values of different storage classes compare by class alone, NULL < BLOB < TEXT < REAL < INTEGER
(not SQLite's own order), so ``REAL 99999.5`` loses to ``INTEGER 1000`` and ``1 -> 1.0`` counts as a
change. Within a class: numbers numerically, TEXT bytewise on UTF-8, BLOB bytewise (a shorter
prefix sorts first), NULL equals NULL.
"""

from __future__ import annotations

from typing import Any

# Rank of each Python type SQLite hands us. bool never comes out of SQLite, but is an int.
_RANK = {type(None): 0, bytes: 1, str: 2, float: 3, int: 4, bool: 4}


def value_rank(v: Any) -> int:
    try:
        return _RANK[type(v)]
    except KeyError:
        if isinstance(v, bytearray | memoryview):
            return 1
        raise TypeError(f"not an SQLite value: {type(v).__name__}") from None


def compare_values(a: Any, b: Any) -> int:
    """Return -1, 0 or 1 as ``a`` sorts before, equal to, or after ``b`` in cr-sqlite's order."""
    ta, tb = type(a), type(b)
    if ta is tb:
        # str compares by code point, which is the same order as UTF-8 bytes.
        if a == b:
            return 0
        if a is None:
            return 0
        return -1 if a < b else 1
    ra, rb = value_rank(a), value_rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    # Same class through different Python types (bytes vs memoryview, int vs bool).
    if ra == 1:
        ba, bb = bytes(a), bytes(b)
        return 0 if ba == bb else (-1 if ba < bb else 1)
    return 0 if a == b else (-1 if a < b else 1)
