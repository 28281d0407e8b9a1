"""The wire: message round trips, framing with label and encryption, keyring rotation."""

from __future__ import annotations

import os

import msgpack
import pytest

from swim import codec
from swim.codec import Framer, Malformed
from swim.keyring import OVERHEAD, Keyring
from swim.member import NodeId, State

A = NodeId("10.0.0.1", 7946, 12345)
B = NodeId("fe80::1", 65535, 2**64 - 1)


def roundtrip(parts: list[bytes], sender: NodeId = A) -> tuple[NodeId, list[tuple]]:
    return codec.decode_body(codec.encode_body(codec.pack_id(sender), parts))


def test_every_datagram_part_round_trips():
    parts = [
        codec.ping(7, B),
        codec.ack(2**32 - 1),
        codec.ping_req(9, B, True),
        codec.nack(0),
        codec.alive(B, 3, b"meta\x00"),
        codec.suspect(B, 4, A),
        codec.down(B, 5, B),
        codec.user(A, 11, b"hello"),
        codec.message(b""),
    ]
    sender, got = roundtrip(parts)
    assert sender == A
    assert got == [
        (codec.PING, 7, B.gen),
        (codec.ACK, 2**32 - 1),
        (codec.PING_REQ, 9, B, True),
        (codec.NACK, 0),
        (codec.ALIVE, B, 3, b"meta\x00"),
        (codec.SUSPECT, B, 4, A),
        (codec.DOWN, B, 5, B),
        (codec.USER, A, 11, b"hello"),
        (codec.MESSAGE, b""),
    ]


def test_body_is_plain_msgpack():
    body = codec.encode_body(codec.pack_id(A), [codec.ack(5), codec.alive(B, 1, b"m")])
    assert msgpack.unpackb(body) == [
        ["10.0.0.1", 7946, 12345],
        [1, 5],
        [4, ["fe80::1", 65535, 2**64 - 1], 1, b"m"],
    ]


def test_many_parts_use_a_wider_array_header():
    parts = [codec.ack(i) for i in range(40)]
    _sender, got = roundtrip(parts)
    assert [p[1] for p in got] == list(range(40))


def test_push_pull_only_on_streams():
    states = [(A, 1, State.ALIVE, b""), (B, 2, State.LEFT, b"x")]
    body = codec.encode_body(codec.pack_id(A), [codec.push_pull(True, states)])
    _sender, parts = codec.decode_body(body, stream=True)
    assert parts == [(codec.PUSH_PULL, True, states)]
    with pytest.raises(Malformed) as exc:
        codec.decode_body(body)
    assert exc.value.reason == "type"
    with pytest.raises(Malformed):
        codec.decode_body(codec.encode_body(codec.pack_id(A), [codec.ack(1)]), stream=True)


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"a": 1},
        [["h", 1]],
        [["h", 1, 1], [99, 1]],
        [["h", 1, 1], [False, 1, 1]],
        [["h", 1, 1], [0, -1, 1]],
        [["h", 1, 1], [1, 2**32]],
        [["h", 1, 1], [4, ["h", 1, 1], 1, "str-not-bytes"]],
        [["h", 1, 1], [4, ["h", 70000, 1], 1, b""]],
        [["", 1, 1], [1, 1]],
        [["h", 1, 1], [2, 1, ["h", 1, 1], 1]],
        [["h", 1, 1], [1, 1, 2]],
        [["h", 1, 1], []],
        [["h", 1, 1], [9, True, [[["h", 1, 1], 0, 7, b""]]]],
    ],
)
def test_malformed_bodies_are_rejected_with_a_reason(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(Malformed) as exc:
        codec.decode_body(body, stream=bool(obj and len(obj) > 1 and obj[1][:1] == [9]))
    assert exc.value.reason in {"decode", "field", "type"}


def test_trailing_garbage_and_truncation_are_rejected():
    body = codec.encode_body(codec.pack_id(A), [codec.ack(1)])
    for bad in (body + b"\x00", body[:-1], b"\xc1", b""):
        with pytest.raises(Malformed):
            codec.decode_body(bad)


def test_plain_frame_layout_and_label_check():
    f = Framer(b"prod")
    frame = f.seal(b"BODY")
    assert frame == bytes([1, 4]) + b"prod" + b"BODY"
    assert f.overhead == 6
    assert f.open(frame) == b"BODY"
    for other, reason in ((Framer(b"test"), "label"), (Framer(b""), "label")):
        with pytest.raises(Malformed) as exc:
            other.open(frame)
        assert exc.value.reason == reason
    with pytest.raises(Malformed, match="version"):
        f.open(bytes([2, 4]) + b"prodBODY")
    with pytest.raises(Malformed, match="short"):
        f.open(b"\x01")
    with pytest.raises(Malformed, match="short"):
        f.open(bytes([1, 9]) + b"prod")


def test_encrypted_frame_hides_the_body_and_authenticates_the_label():
    ring = Keyring([os.urandom(32)])
    f = Framer(b"prod", ring)
    frame = f.seal(b"secret body")
    assert b"secret" not in frame
    assert len(frame) == 6 + len(b"secret body") + OVERHEAD
    assert f.overhead == 6 + OVERHEAD == 6 + 28
    assert f.open(frame) == b"secret body"
    # Swapping the label (authenticated data) breaks the tag even with the right key.
    relabelled = bytes([frame[0], 4]) + b"test" + frame[6:]
    with pytest.raises(Malformed) as exc:
        Framer(b"test", ring).open(relabelled)
    assert exc.value.reason == "decrypt"
    # A flipped ciphertext bit is caught.
    flipped = bytearray(frame)
    flipped[-1] ^= 1
    with pytest.raises(Malformed, match="decrypt"):
        f.open(bytes(flipped))


def test_encryption_mismatch_is_dropped_both_ways():
    ring = Keyring([os.urandom(32)])
    with pytest.raises(Malformed, match="encrypted"):
        Framer(b"").open(Framer(b"", ring).seal(b"x"))
    with pytest.raises(Malformed, match="plaintext"):
        Framer(b"", ring).open(Framer(b"").seal(b"x"))
    with pytest.raises(Malformed, match="decrypt"):
        Framer(b"", Keyring([os.urandom(32)])).open(Framer(b"", ring).seal(b"x"))


def test_keyring_rotation_without_downtime():
    old, new = os.urandom(32), os.urandom(32)
    a, b = Keyring([old]), Keyring([old])
    fa, fb = Framer(b"", a), Framer(b"", b)

    def talk() -> None:
        assert fb.open(fa.seal(b"a->b")) == b"a->b"
        assert fa.open(fb.seal(b"b->a")) == b"b->a"

    talk()
    a.add(new)  # step 1: install everywhere (b not yet)
    talk()
    b.add(new)
    a.use(new)  # step 2: switch primary one member at a time
    talk()
    b.use(new)
    talk()
    a.remove(old)  # step 3: retire the old key
    b.remove(old)
    talk()
    assert a.keys == [new] and b.primary == new
    with pytest.raises(Malformed):
        Framer(b"", Keyring([old])).open(fa.seal(b"x"))


def test_keyring_validates_keys():
    with pytest.raises(ValueError, match="16, 24 or 32"):
        Keyring([b"short"])
    with pytest.raises(ValueError, match="at least one"):
        Keyring([])
    ring = Keyring([b"k" * 32, b"j" * 16])
    with pytest.raises(ValueError, match="primary"):
        ring.remove(b"k" * 32)
    with pytest.raises(ValueError, match="not installed"):
        ring.use(b"x" * 24)
    ring.add(b"j" * 16)  # idempotent
    assert len(ring.keys) == 2


def test_injected_nonce_source_makes_frames_reproducible():
    counter = iter(range(1000))

    def nonces(n: int) -> bytes:
        return next(counter).to_bytes(n, "big")

    key = b"k" * 32
    f1 = Framer(b"", Keyring([key], nonce_source=nonces))
    first = f1.seal(b"x")
    counter = iter(range(1000))
    f2 = Framer(b"", Keyring([key], nonce_source=nonces))
    assert f2.seal(b"x") == first
