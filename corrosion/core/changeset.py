"""Changesets and their wire encoding (versioned msgpack).

A *version* is one committed transaction of one actor (its site id), numbered 1, 2, 3, ... by
that actor. On the wire a version travels as one or more *chunks*: each carries the changes whose
seqs fall in its ``seqs`` range, and the chunks of a version cover ``0..last_seq`` without holes
(changes superseded since the commit leave holes in the seqs themselves, not in the coverage), so
a receiver knows when it holds the whole version. A version whose changes were all superseded is
sent as *empty*.

Frames are msgpack arrays whose first element is the frame kind; ``decode_frame`` validates every
field and raises ``FrameError`` on anything malformed (the caller drops and counts it).

How the changeset frame grows: optional fields are appended after its ten, and a decoder reads
the ones it knows and ignores any beyond (``TRAILING_FIELDS``). The first is the *trace
context* (index 10): opaque bytes, at most ``MAX_TRACE_CONTEXT``, that the runtime writes and
reads (corrosion/runtime/tracing.py: the W3C trace-context binary form, its own version byte
first); a frame without it is the frame of before. Decoders older than this rule refuse any
frame longer than ten fields, so a node sends the longer frame only to peers whose membership
metadata say they accept it (``replication.encode_meta``), and ``without_trailing`` for the
others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import msgpack
import msgspec

from crdt import ChangeRow, CompactChanges

from ..errors import CorrosionError

WIRE_VERSION = 1
# changeset frames with optional fields after the ten are understood (see the module docstring)
TRAILING_FIELDS = 1
MAX_TRACE_CONTEXT = 64  # bytes; a longer trace context is ignored (the change is still applied)
MAX_CHUNK_BYTES = 8 * 1024  # as corrosion: changes per chunk are cut at about 8 KiB

K_CHANGESET, K_EMPTY, K_SYNC_REQUEST, K_SYNC_DONE, K_HELLO, K_REJECT, K_DIGEST = range(1, 8)
K_IHAVE, K_GRAFT, K_PRUNE = range(8, 11)  # Plumtree's control frames (``plumtree``)


class FrameError(CorrosionError, ValueError):
    """A frame could not be decoded or failed validation."""


@dataclass(frozen=True, slots=True)
class Changeset:
    """One chunk of one version of ``actor``."""

    actor: bytes
    version: int
    # decoded ones are crdt.CompactChanges (the rows as received), built ones plain tuples
    changes: Sequence[ChangeRow]
    seqs: tuple[int, int]  # inclusive range of seqs this chunk covers
    last_seq: int  # the version's last seq
    ts: int  # origin's hybrid-logical-clock timestamp
    db_version: int = 0  # the sender's local db_version of these changes (a Lamport hint)
    trace: bytes | None = None  # the origin's trace context (opaque here), when it was traced

    @property
    def complete(self) -> bool:
        return self.seqs == (0, self.last_seq)


@dataclass(frozen=True, slots=True)
class EmptyVersions:
    """Versions of ``actor`` that hold no changes any more (all superseded): mark them held."""

    actor: bytes
    versions: tuple[tuple[int, int], ...]
    ts: int = 0


def _change_row(c: ChangeRow, actor: bytes) -> list:
    table, pk, cid, val, col_version, _db_version, site, cl, seq = c
    return [table, pk, cid, val, col_version, None if site == actor else site, cl, seq]


def encode_changeset(cs: Changeset) -> bytes:
    fields = [
        K_CHANGESET,
        WIRE_VERSION,
        cs.actor,
        cs.version,
        cs.seqs[0],
        cs.seqs[1],
        cs.last_seq,
        cs.ts,
        cs.db_version,
        [_change_row(c, cs.actor) for c in cs.changes],
    ]
    if cs.trace is not None:
        fields.append(cs.trace)
    return msgpack.packb(fields, use_bin_type=True)


def without_trailing(frame: bytes) -> bytes:
    """A changeset frame cut to its ten fields, for a peer that refuses more (any other frame,
    or one of ten fields, is returned as it is)."""
    if not frame or not 0x9B <= frame[0] <= 0x9F or frame[1:2] != b"\x01":
        return frame  # not a changeset (kind 1) of 11 to 15 fields
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame) + 16)
    unpacker.feed(frame)
    try:
        if unpacker.read_array_header() <= 10:
            return frame
        for _ in range(10):
            unpacker.skip()
    except MSGPACK_ERRORS:
        return frame
    return b"\x9a" + frame[1 : unpacker.tell()]


def trace_of(frame: bytes) -> bytes | None:
    """The trace context a changeset frame carries, read without building its changes."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame) + 16)
    unpacker.feed(frame)
    try:
        if unpacker.read_array_header() <= 10 or unpacker.unpack() != K_CHANGESET:
            return None
        for _ in range(9):
            unpacker.skip()
        trace = unpacker.unpack()
    except MSGPACK_ERRORS:
        return None
    return _trace(trace)


def _trace(v: Any) -> bytes | None:
    return v if type(v) is bytes and len(v) <= MAX_TRACE_CONTEXT else None


def encode_empty(e: EmptyVersions) -> bytes:
    return msgpack.packb(
        [K_EMPTY, WIRE_VERSION, e.actor, [list(r) for r in e.versions], e.ts], use_bin_type=True
    )


def encode(obj: Changeset | EmptyVersions) -> bytes:
    return encode_changeset(obj) if isinstance(obj, Changeset) else encode_empty(obj)


def encode_control(kind: int, *fields: Any) -> bytes:
    return msgpack.packb([kind, WIRE_VERSION, *fields], use_bin_type=True)


def _int(v: Any, what: str, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise FrameError(f"{what} must be an integer >= {lo}")
    return v


def _actor(v: Any) -> bytes:
    if type(v) is not bytes or len(v) != 16:
        raise FrameError("actor id must be 16 bytes")
    return v


_VALUE_TYPES = (type(None), int, float, str, bytes)
_VALUE_TYPE_SET = frozenset(_VALUE_TYPES)
_ARRAY_TYPES = (list, tuple)

# what msgpack raises on malformed input: ValueError (bad format, extra data, bad UTF-8, too
# deep), TypeError (an unhashable map key), UnpackException (truncated input, buffer full)
MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


# How ``encode_changeset`` starts a frame: an array of 10 (or 11, with a trace context), kind 1
_CHANGESET_STARTS = (b"\x9a\x01", b"\x9b\x01")


class _WireChangeset(msgspec.Struct, array_like=True, frozen=True):
    """A changeset frame as ``encode_changeset`` writes it, decoded by msgspec, which checks
    every field's type in the same pass of C (what ``_changes`` does in Python for the rows
    msgpack decodes: 40% of decoding a frame of 20 rows). Fields after the trace context are
    ignored, as the rule for trailing fields says."""

    kind: int
    wire: int
    actor: bytes
    version: int
    start: int
    end: int
    last: int
    ts: int
    db_version: int
    # a value's five types cannot be one msgspec union (str and bytes both): checked after
    rows: tuple[tuple[str, bytes, str, Any, int, bytes | None, int, int], ...]
    trace: Any = None


_WIRE_CHANGESET = msgspec.msgpack.Decoder(_WireChangeset)


def decode_frame(data: bytes) -> tuple[int, Any]:
    """Decode one frame into ``(kind, payload)``; payload is a Changeset, EmptyVersions, or the
    list of fields of a control frame."""
    return frame_of(unpack_frame(data))


def unpack_frame(data: bytes) -> Any:
    """A frame's msgpack, unchecked (``frame_of`` checks it); raises FrameError if it is not
    msgpack. A changeset (most of the traffic) of the usual types is a ``_WireChangeset``;
    others' arrays unpack as tuples: half the cost of lists."""
    as_tuples = data[:2] in _CHANGESET_STARTS
    if as_tuples:
        try:
            return _WIRE_CHANGESET.decode(data)
        except msgspec.DecodeError:  # not one of its types: msgpack's pass below says which
            pass
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=not as_tuples)
    except MSGPACK_ERRORS as exc:
        raise FrameError(f"not msgpack: {exc}") from None


def changeset_header(obj: Any) -> tuple[bytes, int, int, int] | None:
    """``peek_changeset`` of an unpacked frame: its changes are unpacked but not built, so a
    duplicate is dropped at the cost of the unpacking alone."""
    if type(obj) is _WireChangeset:
        return (obj.actor, obj.version, obj.start, obj.end) if obj.wire == WIRE_VERSION else None
    if (
        type(obj) in _ARRAY_TYPES
        and len(obj) >= 10
        and obj[0] == K_CHANGESET
        and obj[1] == WIRE_VERSION
        and type(obj[2]) is bytes
        and type(obj[3]) is int
        and type(obj[4]) is int
        and type(obj[5]) is int
    ):
        return obj[2], obj[3], obj[4], obj[5]
    return None


def frame_of(obj: Any) -> tuple[int, Any]:
    """``decode_frame`` of an unpacked frame (``unpack_frame``)."""
    if type(obj) is _WireChangeset:
        cs = _wire_changeset(obj)
        if cs is not None:
            return K_CHANGESET, cs
        obj = msgspec.structs.astuple(obj)  # checked field by field below, for the message
    if not isinstance(obj, list | tuple) or len(obj) < 2:
        raise FrameError("frame must be an array with a kind and a wire version")
    kind, wire = obj[0], obj[1]
    if wire != WIRE_VERSION:
        raise FrameError(f"unsupported wire version {wire!r}")
    if kind == K_CHANGESET:
        return kind, _decode_changeset(obj)
    if kind == K_EMPTY:
        if len(obj) != 5 or not isinstance(obj[3], list):
            raise FrameError("malformed empty-versions frame")
        ranges = []
        for r in obj[3]:
            if not isinstance(r, list) or len(r) != 2:
                raise FrameError("version range must be [start, end]")
            s, e = _int(r[0], "range start", 1), _int(r[1], "range end", 1)
            if e < s:
                raise FrameError("version range end before start")
            ranges.append((s, e))
        return kind, EmptyVersions(_actor(obj[2]), tuple(ranges), _int(obj[4], "ts"))
    if kind in (
        K_SYNC_REQUEST,
        K_SYNC_DONE,
        K_HELLO,
        K_REJECT,
        K_DIGEST,
        K_IHAVE,
        K_GRAFT,
        K_PRUNE,
    ):
        return kind, obj[2:]
    raise FrameError(f"unknown frame kind {kind!r}")


def peek_changeset(data: bytes) -> tuple[bytes, int, int, int] | None:
    """``(actor, version, seq_start, seq_end)`` of a changeset frame, read without decoding its
    changes (a duplicate is dropped at that cost); None if ``data`` is not a changeset frame."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 16)
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() < 10:
            return None
        kind, wire, actor, version, start, end = (unpacker.unpack() for _ in range(6))
    except MSGPACK_ERRORS:
        return None
    if kind != K_CHANGESET or wire != WIRE_VERSION or type(actor) is not bytes:
        return None
    if type(version) is not int or type(start) is not int or type(end) is not int:
        return None
    return actor, version, start, end


def _decode_changeset(obj: list | tuple) -> Changeset:
    """A changeset frame's fields, checked. The usual well-formed frame is checked in one pass
    that builds its changes as it goes; anything that pass does not accept is checked again field
    by field, for the message that says what is wrong."""
    if len(obj) >= 10:
        actor, version, start, end, last, ts, dbv, rows = obj[2:10]
        if (
            type(actor) is bytes
            and len(actor) == 16
            and type(version) is int
            and type(start) is int
            and type(end) is int
            and type(last) is int
            and type(ts) is int
            and type(dbv) is int
            and version >= 1
            and 0 <= start <= end <= last
            and ts >= 0
            and dbv >= 0
            and type(rows) in _ARRAY_TYPES
        ):
            changes = _changes(rows, actor, start, end, dbv)
            if changes is not None:
                # optional fields after the ten: the trace context; any later ones are a newer
                # peer's
                trace = _trace(obj[10]) if len(obj) > 10 else None
                return Changeset(actor, version, changes, (start, end), last, ts, dbv, trace)
    return _checked_changeset(obj)


def _wire_changeset(f: _WireChangeset) -> Changeset | None:
    """The changeset of a frame whose types msgspec checked, after the checks types cannot
    express; None if one fails."""
    actor, start, end = f.actor, f.start, f.end
    if not (
        f.wire == WIRE_VERSION
        and len(actor) == 16
        and f.version >= 1
        and 0 <= start <= end <= f.last
        and f.ts >= 0
        and f.db_version >= 0
    ):
        return None
    value_types = _VALUE_TYPE_SET
    for _table, _pk, _cid, val, _cv, site, _cl, seq in f.rows:
        if (
            type(val) not in value_types
            or not start <= seq <= end
            or (site is not None and len(site) > 16)
        ):
            return None
    changes = CompactChanges(f.rows, actor, f.db_version, checked=True)
    return Changeset(
        actor, f.version, changes, (start, end), f.last, f.ts, f.db_version, _trace(f.trace)
    )


def _changes(
    rows: Sequence[Any], actor: bytes, start: int, end: int, dbv: int
) -> CompactChanges | None:
    """The changes of well-formed wire rows, kept as they are (``crdt.CompactChanges``: merged
    without building a nine-field tuple per change); None if any row is not."""
    for row in rows:
        if type(row) is not tuple and type(row) is not list:
            return None
        try:
            table, pk, cid, val, cv, site, cl, seq = row
        except ValueError:  # not eight fields
            return None
        if (
            type(table) is not str
            or type(pk) is not bytes
            or type(cid) is not str
            or type(val) not in _VALUE_TYPE_SET
            or type(cv) is not int
            or type(cl) is not int
            or type(seq) is not int
            or not start <= seq <= end
        ):
            return None
        if site is not None and (type(site) is not bytes or len(site) > 16):
            return None
    return CompactChanges(rows, actor, dbv, checked=True)


def _checked_changeset(obj: list | tuple) -> Changeset:
    """``_decode_changeset`` field by field: raises FrameError saying what is wrong first."""
    if len(obj) < 10 or not isinstance(obj[9], list | tuple):
        raise FrameError("malformed changeset frame")
    trace = _trace(obj[10]) if len(obj) > 10 else None
    actor = _actor(obj[2])
    version = _int(obj[3], "version", 1)
    start, end, last = _int(obj[4], "seq start"), _int(obj[5], "seq end"), _int(obj[6], "last seq")
    if not start <= end <= last:
        raise FrameError("seq range must satisfy start <= end <= last_seq")
    ts, dbv = _int(obj[7], "ts"), _int(obj[8], "db_version")
    changes: list[ChangeRow] = []
    for row in obj[9]:
        if type(row) not in _ARRAY_TYPES or len(row) != 8:
            raise FrameError("a change has eight fields on the wire")
        table, pk, cid, val, cv, site, cl, seq = row
        if type(table) is not str or type(pk) is not bytes or type(cid) is not str:
            raise FrameError("change table/pk/cid have wrong types")
        if type(val) not in _VALUE_TYPES:
            raise FrameError("change value must be null, integer, real, text or blob")
        if type(cv) is not int or type(cl) is not int or type(seq) is not int:
            raise FrameError("change col_version/cl/seq must be integers")
        if not start <= seq <= end:
            raise FrameError("change seq outside the chunk's seq range")
        if site is None:
            site = actor
        elif type(site) is not bytes or len(site) > 16:
            raise FrameError("change site id must be at most 16 bytes")
        changes.append((table, pk, cid, val, cv, dbv, site, cl, seq))
    return Changeset(actor, version, tuple(changes), (start, end), last, ts, dbv, trace)


_SEQ_OF = itemgetter(8)  # a change's seq


def chunk_version(
    actor: bytes,
    version: int,
    changes: Sequence[ChangeRow],
    last_seq: int,
    ts: int,
    db_version: int,
    max_bytes: int = MAX_CHUNK_BYTES,
    trace: bytes | None = None,
) -> list[Changeset]:
    """Cut a version's changes (sorted by seq) into chunks of about ``max_bytes`` whose seq
    ranges tile ``0..last_seq``; each chunk carries ``trace`` (whichever arrives first, or
    alone, continues the trace)."""
    changes = sorted(changes, key=_SEQ_OF)
    if changes and _SEQ_OF(changes[-1]) > last_seq:
        last_seq = _SEQ_OF(changes[-1])
    out: list[Changeset] = []
    start = 0
    batch: list[ChangeRow] = []
    size = 0
    for c in changes:
        row_size = len(msgpack.packb(_change_row(c, actor), use_bin_type=True))
        if batch and size + row_size > max_bytes:
            end = _SEQ_OF(c) - 1
            out.append(
                Changeset(
                    actor, version, tuple(batch), (start, end), last_seq, ts, db_version, trace
                )
            )
            start = end + 1
            batch, size = [], 0
        batch.append(c)
        size += row_size
    out.append(
        Changeset(actor, version, tuple(batch), (start, last_seq), last_seq, ts, db_version, trace)
    )
    return out


def versions_to_ranges(versions: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in sorted(versions):
        if out and out[-1][1] == v - 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out
