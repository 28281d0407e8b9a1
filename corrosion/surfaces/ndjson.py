"""Rows as the JSON of corrosion's NDJSON answers (``/v1/queries``, subscriptions).

A row is a JSON array of its cells, written compactly: text ASCII-only (``\\uXXXX`` escapes, as
Python's ``json`` writes it), blobs as arrays of byte values (as corrosion), reals as Python's
``repr`` writes them, and non-finite reals, which JSON cannot hold, as the strings ``"inf"``,
``"-inf"``, ``"nan"``.

``row_json`` is that encoding, by the standard library's C encoder. ``row_lines`` writes whole
batches of ``{"row": [rowid, cells]}`` lines about twice as fast, with orjson where orjson writes
exactly the same bytes (integers, ASCII text other than DEL, NULLs and blobs: most rows), and
with ``row_json`` for the rest (reals, whose formatting differs, and any other text). A batch
without reals is one ``orjson.dumps`` call cut into lines, not one call per row (a quarter less
CPU per row).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import chain
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

import orjson

from crdt.gcpause import gc_paused


def json_cell(v: Any) -> Any:
    """A cell as JSON can hold it: blobs as byte arrays, non-finite reals as strings."""
    if isinstance(v, bytes):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _blob_as_array(v: Any) -> Any:
    if isinstance(v, bytes):
        return list(v)
    raise TypeError(f"cannot encode {type(v).__name__}")


# The C encoder behind json.dumps, built once: per row it skips json.dumps' Python set-up.
_encode_row = c_make_encoder(
    None, _blob_as_array, encode_basestring_ascii, None, ":", ",", False, False, True
)


def row_json(row: Sequence[Any]) -> str:
    """One row's cells as a compact JSON array."""
    text = "".join(_encode_row(row, 0))
    if "Infinity" in text or "NaN" in text:  # not JSON: send non-finite reals as strings
        text = json.dumps([json_cell(v) for v in row], separators=(",", ":"))
    return text


_PAIR_END = b"]],["  # where one ``[rowid, cells]`` pair ends and the next begins
_LINE_BREAK = b']]}\n{"row":['
_GROWTH = len(_LINE_BREAK) - len(_PAIR_END)


def _batch_lines(rows: Sequence[Sequence[Any]], after: int) -> bytes | None:
    """The lines of ``rows`` from one ``orjson.dumps`` of ``[[rowid, cells], ...]``, cut where
    one pair ends and the next begins (``]],[``: structurally only there, as a blob is the only
    array in a row); None when some text holds that sequence too (then it cannot tell: the
    replacement's growth says how many it replaced, without a pass to count them)."""
    with gc_paused():  # thousands of pairs, no cycles: no collection passes over the rows
        body = orjson.dumps(list(enumerate(rows, after + 1)), default=_blob_as_array)
    lines = body.replace(_PAIR_END, _LINE_BREAK)
    if len(lines) - len(body) != _GROWTH * (len(rows) - 1):
        return None
    return b"".join((b'{"row":', memoryview(lines)[1:-1], b"}\n"))  # one copy, not two


def row_lines(rows: Sequence[Sequence[Any]], after: int) -> bytes:
    """``{"row":[rowid,cells]}`` lines for ``rows``, numbered from ``after + 1``."""
    dumps, blobs = orjson.dumps, _blob_as_array
    has_reals = float in set(map(type, chain.from_iterable(rows)))
    if not has_reals and rows:  # the common case: the whole batch with orjson, checked once
        try:
            body = _batch_lines(rows, after)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate...
            body = None
        if body is not None and body.isascii() and 0x7F not in body:
            return body  # (json escapes DEL, orjson not)
    lines = []
    for rowid, row in enumerate(rows, after + 1):
        cells = None
        if not (has_reals and float in map(type, row)):
            try:
                cells = dumps(row, default=blobs)
            except orjson.JSONEncodeError:
                pass
            else:
                if not cells.isascii() or 0x7F in cells:
                    cells = None
        if cells is None:
            cells = row_json(row).encode()
        lines.append(b'{"row":[%d,%b]}\n' % (rowid, cells))
    return b"".join(lines)
