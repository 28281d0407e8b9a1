"""The changeset wire format (``corrosion.core.changeset``): what one node encodes another decodes
to the same value, a malformed frame is refused with ``FrameError`` (the receiver drops and
counts it), frames of newer peers (trailing fields) still decode, and ``chunk_version`` cuts a
version into chunks that tile its seqs. Fast: the targeted tests of
``bench/mutation_score.py --module core-changeset``.
"""

from __future__ import annotations

import gc
import itertools

import msgpack
import msgspec
import pytest

from corrosion.core import changeset as changeset_module
from corrosion.core.changeset import (
    K_CHANGESET,
    K_DIGEST,
    K_EMPTY,
    K_GRAFT,
    K_HELLO,
    K_IHAVE,
    K_PRUNE,
    K_REJECT,
    K_SYNC_DONE,
    K_SYNC_REQUEST,
    MAX_CHUNK_BYTES,
    MAX_TRACE_CONTEXT,
    WIRE_VERSION,
    Changeset,
    EmptyVersions,
    FrameError,
    _checked_changeset,
    _decode_changeset,
    changeset_header,
    chunk_version,
    decode_frame,
    encode,
    encode_changeset,
    encode_control,
    encode_empty,
    frame_of,
    peek_changeset,
    trace_of,
    unpack_frame,
    versions_to_ranges,
    without_trailing,
)
from crdt import Change, CompactChanges

ACTOR = bytes(range(16))
OTHER = bytes(range(16, 32))
TRACE = b"\x00" + bytes(range(1, 26))  # the W3C binary form's length; opaque here


def change(seq: int, val=1, site: bytes | None = ACTOR, db_version: int = 7, **kw) -> Change:
    fields = dict(table="t", pk=b"\x01\x09\x01", cid="v", val=val, col_version=2, cl=1)
    fields.update(kw)
    return Change(
        fields["table"],
        fields["pk"],
        fields["cid"],
        fields["val"],
        fields["col_version"],
        db_version,
        site,
        fields["cl"],
        seq,
    )


def changeset(**kw) -> Changeset:
    fields = dict(
        actor=ACTOR,
        version=3,
        changes=(change(0), change(1, val="text", site=OTHER), change(2, val=None, cid="w")),
        seqs=(0, 2),
        last_seq=2,
        ts=123456789,
        db_version=7,
    )
    fields.update(kw)
    return Changeset(**fields)


def frame(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def row(seq=0, **kw) -> list:
    fields = dict(table="t", pk=b"\x01", cid="v", val=1, cv=1, site=None, cl=1, seq=seq)
    fields.update(kw)
    return list(fields.values())


def changeset_frame(*rows, start=0, end=0, last=0, version=1, actor=ACTOR, extra=()) -> bytes:
    return frame(
        K_CHANGESET, WIRE_VERSION, actor, version, start, end, last, 5, 6, list(rows), *extra
    )


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("trace", [None, TRACE, b"", bytes(MAX_TRACE_CONTEXT)])
def test_a_changeset_decodes_to_what_was_encoded(trace):
    cs = changeset(trace=trace)
    kind, back = decode_frame(encode(cs))
    assert kind == K_CHANGESET
    assert back == cs
    # every change carries the frame's db_version and its own site (the actor's when it was
    # left out on the wire)
    assert [Change(*c).site_id for c in back.changes] == [ACTOR, OTHER, ACTOR]


def test_decoded_changes_are_plain_tuples_the_collector_stops_tracking():
    # a receiver holds thousands of them until they are applied: a Change (a tuple subclass)
    # would stay tracked, and every full collection would walk each one. What it holds are the
    # rows as they came off the wire (crdt.CompactChanges); reading a change builds a ChangeRow
    back = decode_frame(encode(changeset()))[1]
    assert all(type(c) is tuple and len(c) == 9 for c in back.changes)
    assert isinstance(back.changes, CompactChanges)
    held = back.changes.rows
    gc.collect()
    assert not any(gc.is_tracked(r) for r in held)


def test_decoded_changes_are_marked_as_checked_for_the_merge():
    # the decoders check every row's types (crdt.CompactChanges.checked): the merge then does
    # not check them again change by change; the typed pass and msgpack's lists alike
    typed = decode_frame(encode(changeset()))[1].changes
    data = changeset_frame(row(0), row(1, site=OTHER), end=1, last=1)
    lists = _decode_changeset(msgpack.unpackb(data, raw=False, use_list=True)).changes
    assert type(typed) is CompactChanges and typed.checked is True
    assert type(lists) is CompactChanges and lists.checked is True


def test_the_wire_layout_is_the_one_older_nodes_read():
    cs = changeset(changes=(change(0), change(1, site=OTHER)), seqs=(0, 1), last_seq=4)
    assert msgpack.unpackb(encode_changeset(cs)) == [
        K_CHANGESET,
        WIRE_VERSION,
        ACTOR,
        3,
        0,
        1,
        4,
        123456789,
        7,
        # the actor's own site id is left out (None): 16 bytes saved per change
        [
            ["t", b"\x01\x09\x01", "v", 1, 2, None, 1, 0],
            ["t", b"\x01\x09\x01", "v", 1, 2, OTHER, 1, 1],
        ],
    ]
    # the trace context is an eleventh field, only when there is one
    assert msgpack.unpackb(encode_changeset(changeset(trace=TRACE)))[10:] == [TRACE]


def test_a_hand_built_frame_decodes_as_lists_or_tuples():
    # older encoders and other languages: arrays of any length header, rows as lists
    data = changeset_frame(row(0), row(1, site=OTHER, val=2.5), end=1, last=1)
    kind, cs = decode_frame(data)
    assert kind == K_CHANGESET
    assert cs.changes == (
        Change("t", b"\x01", "v", 1, 1, 6, ACTOR, 1, 0),
        Change("t", b"\x01", "v", 2.5, 1, 6, OTHER, 1, 1),
    )
    assert (cs.actor, cs.version, cs.seqs, cs.last_seq, cs.ts, cs.db_version, cs.trace) == (
        ACTOR,
        1,
        (0, 1),
        1,
        5,
        6,
        None,
    )


@pytest.mark.parametrize("val", [None, -(2**63), 2**63 - 1, 1.5, "", "ünïcode", b"\x00\xff"])
def test_every_sqlite_value_type_survives_the_wire(val):
    cs = changeset(changes=(change(0, val=val),), seqs=(0, 0), last_seq=0)
    back = Change(*decode_frame(encode(cs))[1].changes[0])
    assert back.val == val
    assert type(back.val) is type(val)


@pytest.mark.parametrize("ts", [0, 1, 2**63])
def test_empty_versions_decode_to_what_was_encoded(ts):
    e = EmptyVersions(OTHER, ((1, 1), (3, 9)), ts)
    assert decode_frame(encode(e)) == (K_EMPTY, e)
    assert msgpack.unpackb(encode_empty(e)) == [K_EMPTY, WIRE_VERSION, OTHER, [[1, 1], [3, 9]], ts]
    assert decode_frame(encode(EmptyVersions(ACTOR, ()))) == (K_EMPTY, EmptyVersions(ACTOR, (), 0))


CONTROL_KINDS = [
    K_SYNC_REQUEST,
    K_SYNC_DONE,
    K_HELLO,
    K_REJECT,
    K_DIGEST,
    K_IHAVE,
    K_GRAFT,
    K_PRUNE,
]


@pytest.mark.parametrize("kind", CONTROL_KINDS)
def test_a_control_frame_decodes_to_its_fields(kind):
    fields = ["cluster", ACTOR, [[1, 2], [4, 4]], {ACTOR: 3}]
    assert decode_frame(encode_control(kind, *fields)) == (kind, fields)
    assert decode_frame(encode_control(kind)) == (kind, [])  # kind and wire version only


def test_a_sync_state_keyed_by_integers_decodes():
    # msgpack maps with non-string keys (sync states, digests) must not be refused
    assert decode_frame(encode_control(K_SYNC_REQUEST, {1: [2, 3]})) == (
        K_SYNC_REQUEST,
        [{1: [2, 3]}],
    )


# ---- malformed frames -----------------------------------------------------------------------

FRAME_SHAPE = "frame must be an array with a kind and a wire version"


def refused(data: bytes) -> str:
    """The whole message decode_frame refuses ``data`` with (what the receiver logs)."""
    with pytest.raises(FrameError) as excinfo:
        decode_frame(data)
    return str(excinfo.value)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"", "not msgpack"),
        (b"\xc1", "not msgpack"),  # never-used byte
        (b"\x92\x01", "not msgpack"),  # truncated
        (frame(K_HELLO, WIRE_VERSION) + b"\x00", "not msgpack"),  # extra data
        (msgpack.packb(7), FRAME_SHAPE),
        (msgpack.packb({"kind": 1}), FRAME_SHAPE),
        (frame(K_HELLO), FRAME_SHAPE),
        (frame(K_HELLO, WIRE_VERSION + 1, "x"), "unsupported wire version 2"),
        (frame(K_HELLO, 0), "unsupported wire version 0"),
        (frame(0, WIRE_VERSION), "unknown frame kind 0"),
        (frame(99, WIRE_VERSION, 1, 2), "unknown frame kind 99"),
        (frame("1", WIRE_VERSION), "unknown frame kind '1'"),
    ],
)
def test_a_frame_that_is_not_one_is_refused(data, said):
    message = refused(data)
    assert message.startswith("not msgpack: ") if said == "not msgpack" else message == said


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (frame(K_EMPTY, 1, ACTOR, [[1, 2]]), "malformed empty-versions frame"),
        (frame(K_EMPTY, 1, ACTOR, [[1, 2]], 0, 0), "malformed empty-versions frame"),
        (frame(K_EMPTY, 1, ACTOR, {"1": 2}, 0), "malformed empty-versions frame"),
        (frame(K_EMPTY, 1, ACTOR, [3], 0), "version range must be [start, end]"),
        (frame(K_EMPTY, 1, ACTOR, [[3]], 0), "version range must be [start, end]"),
        (frame(K_EMPTY, 1, ACTOR, [[3, 4, 5]], 0), "version range must be [start, end]"),
        (frame(K_EMPTY, 1, ACTOR, [[0, 4]], 0), "range start must be an integer >= 1"),
        (frame(K_EMPTY, 1, ACTOR, [["1", 4]], 0), "range start must be an integer >= 1"),
        (frame(K_EMPTY, 1, ACTOR, [[1, 0]], 0), "range end must be an integer >= 1"),
        (frame(K_EMPTY, 1, ACTOR, [[1, 1.0]], 0), "range end must be an integer >= 1"),
        (frame(K_EMPTY, 1, ACTOR, [[5, 4]], 0), "version range end before start"),
        (frame(K_EMPTY, 1, ACTOR[:15], [[1, 4]], 0), "actor id must be 16 bytes"),
        (frame(K_EMPTY, 1, ACTOR + b"\x00", [[1, 4]], 0), "actor id must be 16 bytes"),
        (frame(K_EMPTY, 1, "a" * 16, [[1, 4]], 0), "actor id must be 16 bytes"),
        (frame(K_EMPTY, 1, ACTOR, [[1, 4]], -1), "ts must be an integer >= 0"),
        (frame(K_EMPTY, 1, ACTOR, [[1, 4]], True), "ts must be an integer >= 0"),
    ],
)
def test_a_malformed_empty_versions_frame_is_refused(data, said):
    assert refused(data) == said


def test_boundary_values_of_an_empty_versions_frame_are_accepted():
    data = frame(K_EMPTY, 1, ACTOR, [[1, 1], [2, 2]], 0)
    assert decode_frame(data)[1] == EmptyVersions(ACTOR, ((1, 1), (2, 2)), 0)


def _cs(*fields_after_actor, actor=ACTOR, rows=None) -> bytes:
    return frame(K_CHANGESET, 1, actor, *fields_after_actor, rows if rows is not None else [])


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (frame(K_CHANGESET, 1, ACTOR, 1, 0, 0, 0, 5, 6), "malformed changeset frame"),
        (frame(K_CHANGESET, 1, ACTOR, 1, 0, 0, 0, 5, 6, {}), "malformed changeset frame"),
        (frame(K_CHANGESET, 1, ACTOR, 1, 0, 0, 0, 5, 6, 7), "malformed changeset frame"),
        (_cs(1, 0, 0, 0, 5, 6, actor=ACTOR[:8]), "actor id must be 16 bytes"),
        (_cs(0, 0, 0, 0, 5, 6), "version must be an integer >= 1"),
        (_cs(True, 0, 0, 0, 5, 6), "version must be an integer >= 1"),
        (_cs(1, -1, 0, 0, 5, 6), "seq start must be an integer >= 0"),
        (_cs(1, 0, "0", 0, 5, 6), "seq end must be an integer >= 0"),
        (_cs(1, 0, 0, None, 5, 6), "last seq must be an integer >= 0"),
        (_cs(1, 1, 0, 1, 5, 6), "seq range must satisfy start <= end <= last_seq"),
        (_cs(1, 0, 2, 1, 5, 6), "seq range must satisfy start <= end <= last_seq"),
        (_cs(1, 0, 0, 0, -5, 6), "ts must be an integer >= 0"),
        (_cs(1, 0, 0, 0, 5, 6.0), "db_version must be an integer >= 0"),
    ],
)
def test_a_malformed_changeset_header_is_refused(data, said):
    assert refused(data) == said


@pytest.mark.parametrize(
    ("bad_row", "said"),
    [
        (row()[:7], "a change has eight fields on the wire"),
        (row() + [0], "a change has eight fields on the wire"),
        ("eight fields", "a change has eight fields on the wire"),
        ({"table": "t"}, "a change has eight fields on the wire"),
        (row(table=b"t"), "change table/pk/cid have wrong types"),
        (row(pk="pk"), "change table/pk/cid have wrong types"),
        (row(cid=1), "change table/pk/cid have wrong types"),
        (row(val=True), "change value must be null, integer, real, text or blob"),
        (row(val=[1]), "change value must be null, integer, real, text or blob"),
        (row(val={"a": 1}), "change value must be null, integer, real, text or blob"),
        (row(cv="1"), "change col_version/cl/seq must be integers"),
        (row(cl=1.0), "change col_version/cl/seq must be integers"),
        (row(seq=None), "change col_version/cl/seq must be integers"),
        (row(seq=3), "change seq outside the chunk's seq range"),
        (row(seq=0), "change seq outside the chunk's seq range"),
        (row(seq=1, site="site"), "change site id must be at most 16 bytes"),
        (row(seq=1, site=bytes(17)), "change site id must be at most 16 bytes"),
    ],
)
def test_a_malformed_change_is_refused_with_the_whole_frame(bad_row, said):
    good = row(seq=1)
    data = changeset_frame(good, bad_row, start=1, end=2, last=5)
    assert refused(data) == said


def test_boundary_values_of_a_change_are_accepted():
    # seqs at both ends of the chunk's range; an empty or 16-byte site id; seq range equal to
    # last_seq; negative col_version/cl are the CRDT's business, not the wire's
    data = changeset_frame(
        row(1, site=b""), row(2, site=bytes(16), cv=-1, cl=-3), start=1, end=2, last=2
    )
    cs = decode_frame(data)[1]
    assert [(c.seq, c.site_id, c.col_version, c.cl) for c in map(Change._make, cs.changes)] == [
        (1, b"", 1, 1),
        (2, bytes(16), -1, -3),
    ]
    assert cs.complete is False  # seqs (1, 2) do not start at 0


# The decoder checks a frame in one pass, and again field by field only when that pass refuses it
# (for the message): both must accept and refuse the same frames. Every field of a frame, in turn,
# takes each of these values (valid ones among them).
ODD = [None, True, 0, -1, 3, 2**64 - 1, 1.5, "", "t", b"\x01", bytes(16), bytes(17), [1], {"a": 1}]


def frames_with_one_odd_field():
    good_rows = [["t", b"\x01", "v", "x", 1, None, 1, 1], ["t", b"\x02", "v", 2.5, 2, OTHER, 3, 2]]
    header = [ACTOR, 3, 1, 2, 4, 5, 6]

    def make(header=header, rows=good_rows, extra=()) -> bytes:
        return frame(K_CHANGESET, WIRE_VERSION, *header, rows, *extra)

    yield make()
    for odd in ODD:
        for i in range(len(header)):
            yield make(header=[*header[:i], odd, *header[i + 1 :]])
        for k in range(8):
            row = [*good_rows[1][:k], odd, *good_rows[1][k + 1 :]]
            yield make(rows=[good_rows[0], row])
        yield make(rows=odd)
        yield make(rows=[good_rows[0], odd])
        yield make(extra=(odd,))
    for shape in (good_rows[1][:7], [*good_rows[1], 0], "eightchr", {str(i): i for i in range(8)}):
        yield make(rows=[good_rows[0], shape])


def outcome(decode, obj):
    try:
        return decode(obj)
    except FrameError as exc:
        return str(exc)


def test_the_one_pass_check_accepts_and_refuses_what_the_field_by_field_check_does():
    seen = set()
    for data in frames_with_one_odd_field():
        for use_list in (False, True):  # tuples, as decode_frame unpacks most frames; lists
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=use_list)
            said = outcome(_checked_changeset, obj)
            assert outcome(_decode_changeset, obj) == said, obj
        assert outcome(lambda d: decode_frame(d)[1], data) == said
        seen.add(said if isinstance(said, str) else "accepted")
    assert len(seen) == 16  # accepted, and every message the checks give


def frames_at_each_checks_edge():
    """Changeset frames on either side of each check on values (not types): version 1 and 0;
    start 0; start = end = last and past them; ts and db_version 0 and -1; a seq at each end of
    its chunk's range and past it; a site of 16 bytes and of 17; a lone row's value of each
    refused kind; another wire version."""

    def make(version=1, start=0, end=2, last=2, ts=0, dbv=0, rows=None, wire=WIRE_VERSION):
        rows = [row(start), row(end, site=bytes(16))] if rows is None else rows
        return frame(K_CHANGESET, wire, ACTOR, version, start, end, last, ts, dbv, rows)

    yield from (make(), make(version=0), make(start=1, end=1, last=1, rows=[row(1)]))
    yield from (make(start=2, end=1), make(end=3, last=2), make(ts=-1), make(dbv=-1))
    yield from (make(rows=[row(3)]), make(start=1, rows=[row(0)]), make(rows=[]))
    yield from (make(rows=[row(site=bytes(17))]), make(wire=WIRE_VERSION + 1))
    yield from (make(rows=[row(val=v)]) for v in (True, [1], {"a": 1}, 2.5, b"", None))


def test_the_typed_decoders_pass_alone_accepts_and_refuses_what_the_field_by_field_check_does():
    # decode_frame falls back to msgpack and the other checks for what the msgspec pass refuses:
    # asked alone, it must refuse every frame they refuse, and accept the others as they do
    for data in itertools.chain(frames_at_each_checks_edge(), frames_with_one_odd_field()):
        obj = msgpack.unpackb(data, raw=False, use_list=False)
        said = outcome(lambda o: frame_of(o)[1], obj)  # the wire version checked as well
        assert said == outcome(_checked_changeset, obj) or obj[1] != WIRE_VERSION
        try:
            typed = changeset_module._WIRE_CHANGESET.decode(data)
        except msgspec.DecodeError:
            assert isinstance(said, str), data  # a type msgspec refuses, the check refuses too
            continue
        assert changeset_header(typed) == changeset_header(msgpack.unpackb(data)), data
        fast = changeset_module._wire_changeset(typed)
        assert (fast is None) == isinstance(said, str), data
        assert fast is None or fast == said


@pytest.mark.parametrize(
    "fields",
    [
        # every bound at its edge: version 1, seqs 0..0, ts and db_version 0, a 16-byte site
        (ACTOR, 1, 0, 0, 0, 0, 0, [row(0, site=bytes(16)), row(0, val=None)]),
        # a seq at each end of its chunk's range, which ends at last_seq; a trace context
        (ACTOR, 2, 1, 2, 2, 5, 6, [row(1, val=1.5, site=b""), row(2, val=b"\x00")], TRACE),
        (ACTOR, 3, 0, 4, 9, 5, 6, [row(4, val="text"), row(0, val=-(2**63))]),
        (ACTOR, 2**63, 0, 0, 0, 2**64 - 1, 2**63, []),
    ],
)
def test_a_well_formed_frame_is_decoded_in_one_pass(fields, monkeypatch):
    # the field-by-field checks run only to say what is wrong with a frame (they cost twice as
    # much): a well-formed one, at every bound, never reaches them
    def refused(obj):
        raise AssertionError(f"checked field by field: {obj!r}")

    data = frame(K_CHANGESET, WIRE_VERSION, *fields)
    expected = decode_frame(data)[1]
    monkeypatch.setattr(changeset_module, "_checked_changeset", refused)
    assert decode_frame(data)[1] == expected
    lists = msgpack.unpackb(data, raw=False, use_list=True)  # as a longer header unpacks
    assert _decode_changeset(lists) == expected


# ---- frames of newer peers: trailing fields ---------------------------------------------------


def test_fields_after_the_trace_context_are_ignored():
    data = changeset_frame(row(0), extra=(TRACE, "a field of the future", {"x": 1}))
    cs = decode_frame(data)[1]
    assert cs.trace == TRACE
    assert Change(*cs.changes[0]).val == 1


@pytest.mark.parametrize("bad_trace", [bytes(MAX_TRACE_CONTEXT + 1), "00-abc", 7, None, [b"\x00"]])
def test_an_unusable_trace_context_is_ignored_and_the_change_still_applies(bad_trace):
    data = changeset_frame(row(0), extra=(bad_trace,))
    cs = decode_frame(data)[1]
    assert cs.trace is None
    assert len(cs.changes) == 1
    assert trace_of(data) is None


@pytest.mark.parametrize("trace", [TRACE, b"", bytes(MAX_TRACE_CONTEXT)])
def test_trace_of_reads_the_trace_context_without_decoding_the_changes(trace):
    data = encode_changeset(changeset(trace=trace))
    assert trace_of(data) == trace
    assert trace_of(changeset_frame(row(0), extra=(trace, "later"))) == trace


@pytest.mark.parametrize(
    "data",
    [
        encode_changeset(changeset()),  # ten fields: no trace context
        encode_control(K_HELLO, 1, 2, 3, 4, 5, 6, 7, 8, TRACE),  # eleven fields, not a changeset
        encode_control(K_CHANGESET, 1, 2, 3, 4, 5, 6, 7, 8)[:-3],  # truncated
        frame(K_CHANGESET, 1, 2, 3, 4, 5, 6, 7, 8, 9),  # ten fields: no trace context
        b"",
        b"\xc1\xc1",
        msgpack.packb({"trace": TRACE}),
    ],
)
def test_trace_of_a_frame_without_one_is_none(data):
    assert trace_of(data) is None


@pytest.mark.parametrize("extra", [(TRACE,), (TRACE, 1), (TRACE, *range(4))])
def test_without_trailing_gives_the_frame_an_older_node_reads(extra):
    cs = changeset()
    longer = encode_changeset(cs)[1:]  # the ten fields without their array header
    n = 10 + len(extra)
    header = bytes([0x90 + n])
    data = header + longer + b"".join(msgpack.packb(x, use_bin_type=True) for x in extra)
    assert decode_frame(data)[1].trace == TRACE
    cut = without_trailing(data)
    assert cut == encode_changeset(cs)  # byte for byte the frame of before
    assert decode_frame(cut)[1] == cs


def test_without_trailing_cuts_a_traced_changeset_to_its_ten_fields():
    cs = changeset(trace=TRACE)
    cut = without_trailing(encode_changeset(cs))
    assert msgpack.unpackb(cut) == msgpack.unpackb(encode_changeset(changeset()))
    assert decode_frame(cut)[1] == changeset()


@pytest.mark.parametrize(
    "data",
    [
        encode_changeset(changeset()),  # already ten fields
        encode_empty(EmptyVersions(ACTOR, ((1, 2),), 3)),
        encode_control(K_HELLO, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),  # eleven fields, kind 3
        encode_control(K_SYNC_DONE, *range(12)),  # fourteen fields
        frame(K_CHANGESET, WIRE_VERSION, *range(14)),  # sixteen fields: not a fixarray
        b"\x9b\x01\x01",  # a changeset of eleven fields cut short
        b"\x9b",
        b"",
    ],
)
def test_without_trailing_leaves_any_other_frame_as_it_is(data):
    assert without_trailing(data) is data


# ---- peek ---------------------------------------------------------------------------------


def test_peek_reads_the_identity_of_a_chunk():
    cs = changeset(version=9, seqs=(3, 5), last_seq=8, changes=(change(4),))
    assert peek_changeset(encode_changeset(cs)) == (ACTOR, 9, 3, 5)
    assert peek_changeset(encode_changeset(changeset(trace=TRACE))) == (ACTOR, 3, 0, 2)


@pytest.mark.parametrize(
    "data",
    [
        frame(K_CHANGESET, 1, ACTOR, 1, 0, 0, 0, 5, 6),  # nine fields
        frame(K_EMPTY, 1, ACTOR, 1, 0, 0, 0, 5, 6, []),
        frame(K_CHANGESET, 2, ACTOR, 1, 0, 0, 0, 5, 6, []),
        frame(K_CHANGESET, 1, "actor", 1, 0, 0, 0, 5, 6, []),
        frame(K_CHANGESET, 1, ACTOR, "1", 0, 0, 0, 5, 6, []),
        frame(K_CHANGESET, 1, ACTOR, 1, 0.0, 0, 0, 5, 6, []),
        frame(K_CHANGESET, 1, ACTOR, 1, 0, None, 0, 5, 6, []),
        b"\x9a\x01\x01",  # truncated
        msgpack.packb(7),
        b"",
    ],
)
def test_peek_at_anything_but_a_changeset_is_none(data):
    assert peek_changeset(data) is None
    try:  # the replicator reads the header from the unpacked frame: it says the same
        unpacked = unpack_frame(data)
    except FrameError:
        return  # not msgpack (truncated, empty): dropped as malformed before any header
    assert changeset_header(unpacked) is None


def test_the_header_of_an_unpacked_frame_is_what_peek_reads():
    for cs in (
        changeset(version=9, seqs=(3, 5), last_seq=8, changes=(change(4),)),
        changeset(trace=TRACE),
    ):
        data = encode_changeset(cs)
        assert changeset_header(unpack_frame(data)) == peek_changeset(data)
        assert changeset_header(unpack_frame(data)) == (ACTOR, cs.version, *cs.seqs)


# ---- chunking -------------------------------------------------------------------------------


def row_bytes(c: Change) -> int:
    return len(msgpack.packb([c.table, c.pk, c.cid, c.val, c.col_version, None, c.cl, c.seq]))


def assert_tiles(chunks: list[Changeset], changes: list[Change], last_seq: int) -> None:
    assert chunks[0].seqs[0] == 0
    assert chunks[-1].seqs[1] == last_seq
    for a, b in itertools.pairwise(chunks):
        assert b.seqs[0] == a.seqs[1] + 1
    for c in chunks:
        assert c.last_seq == last_seq
        assert all(c.seqs[0] <= ch.seq <= c.seqs[1] for ch in c.changes)
    assert [ch for c in chunks for ch in c.changes] == sorted(changes, key=lambda c: c.seq)


def test_a_small_version_is_one_complete_chunk():
    changes = [change(0), change(1)]
    (only,) = chunk_version(ACTOR, 4, changes, 3, 99, 12, trace=TRACE)
    assert only == Changeset(ACTOR, 4, tuple(changes), (0, 3), 3, 99, 12, TRACE)
    assert only.complete


def test_a_version_with_no_changes_left_is_one_empty_chunk():
    assert chunk_version(ACTOR, 4, [], 5, 99, 12) == [Changeset(ACTOR, 4, (), (0, 5), 5, 99, 12)]


def test_chunks_hold_as_many_changes_as_fit_in_max_bytes():
    changes = [change(seq) for seq in range(10)]  # seqs < 128: every row the same size
    size = row_bytes(changes[0])
    chunks = chunk_version(ACTOR, 1, changes, 9, 5, 6, max_bytes=3 * size)
    assert [len(c.changes) for c in chunks] == [3, 3, 3, 1]
    assert [c.seqs for c in chunks] == [(0, 2), (3, 5), (6, 8), (9, 9)]
    assert_tiles(chunks, changes, 9)
    assert not any(c.complete for c in chunks)
    chunks = chunk_version(ACTOR, 1, changes, 9, 5, 6, max_bytes=3 * size - 1)
    assert [len(c.changes) for c in chunks] == [2] * 5


def test_the_default_chunk_is_about_8_kib():
    changes = [change(seq, val="x" * 1000) for seq in range(20)]
    per_chunk = MAX_CHUNK_BYTES // row_bytes(changes[0])
    assert per_chunk == 8
    chunks = chunk_version(ACTOR, 1, changes, 19, 5, 6)
    assert [len(c.changes) for c in chunks] == [8, 8, 4]
    assert all(len(encode(c)) < MAX_CHUNK_BYTES + 200 for c in chunks)


def test_a_change_larger_than_max_bytes_gets_a_chunk_of_its_own():
    changes = [change(0), change(1, val=b"x" * 500), change(2)]
    chunks = chunk_version(ACTOR, 1, changes, 2, 5, 6, max_bytes=100)
    assert [c.changes for c in chunks] == [(changes[0],), (changes[1],), (changes[2],)]
    assert_tiles(chunks, changes, 2)


def test_chunks_cover_the_holes_superseded_changes_left_in_the_seqs():
    changes = [change(9), change(0), change(5)]  # any order in, by seq out
    size = row_bytes(changes[0])
    chunks = chunk_version(ACTOR, 2, changes, 12, 5, 7, max_bytes=size)
    assert [c.seqs for c in chunks] == [(0, 4), (5, 8), (9, 12)]
    assert_tiles(chunks, changes, 12)
    # every chunk round-trips, and each carries the version's ts, db_version and trace
    for c in chunk_version(ACTOR, 2, changes, 12, 5, 7, max_bytes=size, trace=TRACE):
        assert decode_frame(encode(c))[1] == c
        assert (c.ts, c.db_version, c.trace) == (5, 7, TRACE)


def test_a_last_seq_below_a_change_is_raised_to_cover_it():
    changes = [change(9), change(0), change(2)]  # only the last is above last_seq
    chunks = chunk_version(ACTOR, 1, changes, 3, 5, 6)
    assert [(c.seqs, c.last_seq) for c in chunks] == [((0, 9), 9)]
    assert chunks[0].complete


# ---- versions_to_ranges ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("versions", "ranges"),
    [
        ([], []),
        ([4], [(4, 4)]),
        ([1, 2, 3], [(1, 3)]),
        ({9, 1, 3, 2, 7, 8, 5}, [(1, 3), (5, 5), (7, 9)]),
        ((10, 12, 14), [(10, 10), (12, 12), (14, 14)]),
    ],
)
def test_versions_to_ranges_is_the_runs_of_consecutive_versions(versions, ranges):
    assert versions_to_ranges(versions) == ranges
