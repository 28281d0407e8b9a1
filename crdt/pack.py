"""The packed primary-key format of cr-sqlite (``crsql_pack_columns``), byte for byte.

Layout::

    packed  := u8 column_count (1..255), value*
    value   := u8 header, payload          header = (nbytes << 3) | type
    type    := 1 INTEGER | 2 REAL | 3 TEXT | 4 BLOB | 5 NULL

INTEGER payloads are the low ``nbytes`` of the two's-complement value, big-endian: 0 bytes for 0,
8 for any negative value, else the minimal byte count. Decoding zero-extends, which round-trips
because negatives always use all 8 bytes (a sign-extending decoder would read ``x'0980'`` as -128).
REAL is always header ``0x02`` and 8 bytes IEEE-754 big-endian. TEXT and BLOB carry their byte
length in ``nbytes`` big-endian bytes, then the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .errors import PackError

Value = int | float | str | bytes | None

_INTEGER, _REAL, _TEXT, _BLOB, _NULL = 1, 2, 3, 4, 5
_U64 = (1 << 64) - 1
_MAX_COLUMNS = 255
_double = struct.Struct(">d")
# The column count and header of a one-integer pk whose value takes n bytes, by n: a packed
# non-negative integer v is ONE_INTEGER[n] + v.to_bytes(n, "big"), n = (v.bit_length() + 7) >> 3
# (readers packing many pks inline this rather than call pack_pk).
ONE_INTEGER = tuple(bytes((1, (n << 3) | _INTEGER)) for n in range(9))


def _int_width(v: int) -> int:
    if v == 0:
        return 0
    if v < 0:
        return 8
    return (v.bit_length() + 7) >> 3


def _pack_value(out: bytearray, v: Value) -> None:
    if v is None:
        out.append(_NULL)
    elif isinstance(v, bool) or not isinstance(
        v, int | float | str | bytes | bytearray | memoryview
    ):
        raise PackError(f"cannot pack a value of type {type(v).__name__}")
    elif isinstance(v, int):
        if not -(1 << 63) <= v < (1 << 63):
            raise PackError(f"integer {v} does not fit in 64 bits")
        n = _int_width(v)
        out.append((n << 3) | _INTEGER)
        if n:
            out += (v & _U64).to_bytes(8, "big")[8 - n :]
    elif isinstance(v, float):
        out.append(_REAL)
        out += _double.pack(v)
    else:
        if isinstance(v, str):
            kind, data = _TEXT, v.encode("utf-8")
        else:
            kind, data = _BLOB, bytes(v)
        n = _int_width(len(data))
        if n > 4:
            raise PackError("text or blob longer than 2**32-1 bytes cannot be packed")
        out.append((n << 3) | kind)
        if n:
            out += len(data).to_bytes(n, "big")
        out += data


def pack_pk(values: Sequence[Value]) -> bytes:
    """Pack primary-key values (in primary-key order) the way ``crsql_pack_columns`` does."""
    if len(values) == 1:
        v = values[0]
        if type(v) is int and 0 <= v < 1 << 63:  # the common pk, without the general walk
            n = (v.bit_length() + 7) >> 3
            return ONE_INTEGER[n] + v.to_bytes(n, "big")
    if not 1 <= len(values) <= _MAX_COLUMNS:
        raise PackError(f"can pack 1 to {_MAX_COLUMNS} columns, got {len(values)}")
    out = bytearray((len(values),))
    for v in values:
        _pack_value(out, v)
    return bytes(out)


def pack_columns(*values: Value) -> bytes:
    """``crsql_pack_columns(...)``: the SQL function's argument form of :func:`pack_pk`."""
    return pack_pk(values)


def unpack_pk(blob: bytes) -> tuple[Value, ...]:
    """Decode a packed blob; raises :class:`PackError` on any malformation (never reads past it)."""
    if type(blob) is bytes and len(blob) >= 2 and blob[0] == 1 and blob[1] & 0x07 == _INTEGER:
        n = blob[1] >> 3  # one integer, the common pk, without the general walk
        if n <= 8 and len(blob) == 2 + n:
            v = int.from_bytes(blob[2:], "big")
            return (v - (1 << 64) if v >= 1 << 63 else v,)
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise PackError(f"packed primary key must be a blob, not {type(blob).__name__}")
    data = bytes(blob)
    size = len(data)
    if size == 0:
        raise PackError("packed primary key is empty")
    count = data[0]
    if count == 0:
        raise PackError("packed primary key declares zero columns")
    pos = 1
    values: list[Value] = []
    for _ in range(count):
        if pos >= size:
            raise PackError("packed primary key ends before all its columns")
        header = data[pos]
        pos += 1
        kind = header & 0x07
        n = header >> 3
        if kind == _INTEGER:
            if n > 8 or pos + n > size:
                raise PackError("malformed integer in packed primary key")
            v = int.from_bytes(data[pos : pos + n], "big") if n else 0
            if v >= 1 << 63:
                v -= 1 << 64
            values.append(v)
            pos += n
        elif kind == _REAL:
            if pos + 8 > size:
                raise PackError("malformed real in packed primary key")
            values.append(_double.unpack_from(data, pos)[0])
            pos += 8
        elif kind in (_TEXT, _BLOB):
            if n > 4 or pos + n > size:
                raise PackError("malformed length in packed primary key")
            length = int.from_bytes(data[pos : pos + n], "big") if n else 0
            pos += n
            if pos + length > size:
                raise PackError("text or blob runs past the end of the packed primary key")
            chunk = data[pos : pos + length]
            pos += length
            if kind == _TEXT:
                try:
                    values.append(chunk.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise PackError("text in packed primary key is not UTF-8") from exc
            else:
                values.append(chunk)
        elif kind == _NULL:
            values.append(None)
        else:
            raise PackError(f"unknown value type {kind} in packed primary key")
    if pos != size:
        raise PackError("trailing bytes after the packed primary key")
    return tuple(values)
