"""The wire format: framing (version, cluster label, optional AES-GCM) and msgpack messages.

A datagram, and a stream payload, is one *frame*::

    byte 0        wire version (1), high bit set when the rest is encrypted
    byte 1        label length L (0..255)
    bytes 2..2+L  cluster label (UTF-8)
    rest          body, or keyring.seal(body, aad = bytes 0..2+L)

The body is a msgpack array ``[sender, part, part, ...]``: a compound packet. ``sender`` is the
sending member's identity ``[host, port, gen]``; each part is an array whose first element is
its type. Types are append-only (a new version may add types, never renumber them)::

    0 PING      [0, seq, gen]                probe; gen of the identity we think we ping
    1 ACK       [1, seq]                     answer to a ping (or a relayed one)
    2 PING_REQ  [2, seq, target, want_nack]  please ping target for me (SWIM's indirect probe)
    3 NACK      [3, seq]                     helper: the target did not answer me either
    4 ALIVE     [4, id, incarnation, meta]   membership updates (piggybacked)
    5 SUSPECT   [5, id, incarnation, from]
    6 DOWN      [6, id, incarnation, from]   from == id means the member left
    7 USER      [7, origin, seq, payload]    user broadcast, relayed epidemically
    8 MESSAGE   [8, payload]                 direct user message to the receiver
    9 PUSH_PULL [9, join, [[id, incarnation, state, meta], ...]]   streams only

Parts are packed once (``bytes``) so a packet is filled by concatenation and its size is exact.
Decoding validates every field; anything unexpected raises :class:`Malformed` with a reason the
core counts - it never escapes ``handle_datagram``.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import msgpack

from .errors import SwimError
from .keyring import OVERHEAD as SEAL_OVERHEAD
from .keyring import Keyring
from .member import GEN_MAX, INCARNATION_MAX, NodeId, State

__all__ = [
    "ACK",
    "ALIVE",
    "BODY_HEADER_MAX",
    "DOWN",
    "MESSAGE",
    "NACK",
    "PING",
    "PING_REQ",
    "PUSH_PULL",
    "SUSPECT",
    "USER",
    "WIRE_VERSION",
    "Framer",
    "Malformed",
    "decode_body",
    "encode_body",
]

WIRE_VERSION = 1
_ENCRYPTED = 0x80

PING, ACK, PING_REQ, NACK, ALIVE, SUSPECT, DOWN, USER, MESSAGE, PUSH_PULL = range(10)
_DATAGRAM_TYPES = frozenset({PING, ACK, PING_REQ, NACK, ALIVE, SUSPECT, DOWN, USER, MESSAGE})
SEQ_MAX = 2**32 - 1

BODY_HEADER_MAX = 5
"""Bytes of the msgpack array header of a body, at most (array32)."""


class Malformed(SwimError):
    """A frame or body that cannot be accepted; ``reason`` is the counter to bump."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -- encoding --------------------------------------------------------------------------------

_pack = msgpack.Packer(use_bin_type=True).pack


@functools.lru_cache(maxsize=4096)
def pack_id(nid: NodeId) -> bytes:
    return b"\x93" + _pack(nid.host) + _pack(nid.port) + _pack(nid.gen)


def _array_header(n: int) -> bytes:
    if n <= 15:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def ping(seq: int, target: NodeId) -> bytes:
    return b"\x93\x00" + _pack(seq) + _pack(target.gen)


def ack(seq: int) -> bytes:
    return b"\x92\x01" + _pack(seq)


def ping_req(seq: int, target: NodeId, want_nack: bool) -> bytes:
    return b"\x94\x02" + _pack(seq) + pack_id(target) + (b"\xc3" if want_nack else b"\xc2")


def nack(seq: int) -> bytes:
    return b"\x92\x03" + _pack(seq)


def alive(nid: NodeId, incarnation: int, meta: bytes) -> bytes:
    return b"\x94\x04" + pack_id(nid) + _pack(incarnation) + _pack(meta)


def suspect(nid: NodeId, incarnation: int, frm: NodeId) -> bytes:
    return b"\x94\x05" + pack_id(nid) + _pack(incarnation) + pack_id(frm)


def down(nid: NodeId, incarnation: int, frm: NodeId) -> bytes:
    return b"\x94\x06" + pack_id(nid) + _pack(incarnation) + pack_id(frm)


def user(origin: NodeId, seq: int, payload: bytes) -> bytes:
    return b"\x94\x07" + pack_id(origin) + _pack(seq) + _pack(payload)


def message(payload: bytes) -> bytes:
    return b"\x92\x08" + _pack(payload)


def push_pull(join: bool, states: list[tuple[NodeId, int, State, bytes]]) -> bytes:
    out = [b"\x93\x09", b"\xc3" if join else b"\xc2", _array_header(len(states))]
    for nid, inc, state, meta in states:
        out.append(b"\x94" + pack_id(nid) + _pack(inc) + _pack(int(state)) + _pack(meta))
    return b"".join(out)


def encode_body(sender: bytes, parts: list[bytes]) -> bytes:
    """A body from a packed sender id (:func:`pack_id`) and packed parts."""
    return _array_header(1 + len(parts)) + sender + b"".join(parts)


def body_size(sender: bytes, parts_size: int, nparts: int) -> int:
    return len(_array_header(1 + nparts)) + len(sender) + parts_size


# -- framing ---------------------------------------------------------------------------------


class Framer:
    """Wraps bodies into frames and back, for one label and an optional keyring."""

    __slots__ = ("_header", "keyring", "label")

    def __init__(self, label: bytes = b"", keyring: Keyring | None = None) -> None:
        if len(label) > 255:
            raise ValueError("label must be at most 255 bytes")
        self.label = label
        self.keyring = keyring
        flag = _ENCRYPTED if keyring is not None else 0
        self._header = bytes((WIRE_VERSION | flag, len(label))) + label

    @property
    def overhead(self) -> int:
        """Bytes a frame adds to its body."""
        return len(self._header) + (SEAL_OVERHEAD if self.keyring is not None else 0)

    def seal(self, body: bytes) -> bytes:
        if self.keyring is None:
            return self._header + body
        return self._header + self.keyring.seal(body, self._header)

    def open(self, data: bytes) -> bytes:
        """The body inside ``data``; raises :class:`Malformed` if it is not ours to read."""
        if len(data) < 2:
            raise Malformed("short")
        first = data[0]
        if first & 0x7F != WIRE_VERSION:
            raise Malformed("version", f"wire version {first & 0x7F}")
        n = data[1]
        end = 2 + n
        if len(data) < end:
            raise Malformed("short")
        if data[2:end] != self.label:
            raise Malformed("label")
        encrypted = bool(first & _ENCRYPTED)
        if self.keyring is None:
            if encrypted:
                raise Malformed("encrypted", "encrypted frame but no keyring")
            return data[end:]
        if not encrypted:
            raise Malformed("plaintext", "plaintext frame but a keyring is required")
        body = self.keyring.open(data[end:], data[:end])
        if body is None:
            raise Malformed("decrypt")
        return body


# -- decoding --------------------------------------------------------------------------------


def _int(v: Any, hi: int) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise Malformed("field", f"expected an integer in 0..{hi}, got {v!r}")
    return v


def _bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise Malformed("field", f"expected bytes, got {type(v).__name__}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise Malformed("field", f"expected a bool, got {v!r}")
    return v


def _id(v: Any) -> NodeId:
    if type(v) is not list or len(v) != 3:
        raise Malformed("field", "expected an identity [host, port, gen]")
    host, port, gen = v
    if type(host) is not str or not 0 < len(host) <= 255:
        raise Malformed("field", "identity host must be a non-empty string")
    return NodeId(host, _int(port, 0xFFFF), _int(gen, GEN_MAX))


def _arity(p: list[Any], n: int) -> None:
    if len(p) != n:
        raise Malformed("field", f"part type {p[0]} expects {n} fields, got {len(p)}")


def _part(p: Any) -> tuple[Any, ...]:
    if type(p) is not list or not p:
        raise Malformed("field", "a part must be a non-empty array")
    t = p[0]
    if type(t) is not int:
        raise Malformed("type", f"part type must be an integer, got {t!r}")
    if t == PING:
        _arity(p, 3)
        return (PING, _int(p[1], SEQ_MAX), _int(p[2], GEN_MAX))
    if t in (ACK, NACK):
        _arity(p, 2)
        return (t, _int(p[1], SEQ_MAX))
    if t == PING_REQ:
        _arity(p, 4)
        return (PING_REQ, _int(p[1], SEQ_MAX), _id(p[2]), _bool(p[3]))
    if t == ALIVE:
        _arity(p, 4)
        return (ALIVE, _id(p[1]), _int(p[2], INCARNATION_MAX), _bytes(p[3]))
    if t in (SUSPECT, DOWN):
        _arity(p, 4)
        return (t, _id(p[1]), _int(p[2], INCARNATION_MAX), _id(p[3]))
    if t == USER:
        _arity(p, 4)
        return (USER, _id(p[1]), _int(p[2], SEQ_MAX), _bytes(p[3]))
    if t == MESSAGE:
        _arity(p, 2)
        return (MESSAGE, _bytes(p[1]))
    if t == PUSH_PULL:
        _arity(p, 3)
        states = p[2]
        if type(states) is not list:
            raise Malformed("field", "push/pull states must be an array")
        out = []
        for s in states:
            if type(s) is not list or len(s) != 4:
                raise Malformed("field", "a member state is [id, incarnation, state, meta]")
            out.append(
                (
                    _id(s[0]),
                    _int(s[1], INCARNATION_MAX),
                    State(_int(s[2], int(State.LEFT))),
                    _bytes(s[3]),
                )
            )
        return (PUSH_PULL, _bool(p[1]), out)
    raise Malformed("type", f"unknown part type {t!r}")


def decode_body(body: bytes, *, stream: bool = False) -> tuple[NodeId, list[tuple[Any, ...]]]:
    """(sender, parts) of a body; raises :class:`Malformed` on anything unexpected.

    Datagrams may not carry PUSH_PULL; a stream body is exactly one PUSH_PULL part.
    """
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    # msgpack raises ValueError (format, extra data, UTF-8, depth), TypeError (unhashable key) and
    # UnpackException (truncated input)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise Malformed("decode", type(exc).__name__) from None
    if type(obj) is not list or len(obj) < 1:
        raise Malformed("decode", "body must be a non-empty array")
    sender = _id(obj[0])
    parts = [_part(p) for p in obj[1:]]
    if stream:
        if len(parts) != 1 or parts[0][0] != PUSH_PULL:
            raise Malformed("type", "a stream carries exactly one push/pull part")
    elif any(p[0] not in _DATAGRAM_TYPES for p in parts):
        raise Malformed("type", "push/pull is only valid on a stream")
    return sender, parts
