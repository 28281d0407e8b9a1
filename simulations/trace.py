"""The trace: a running digest of everything observable in a run, and a short tail for reports.

Every datagram sent (time, sender, receiver, bytes, fate), every stream, notification, crash,
restart and fault feeds one BLAKE2b digest. Two runs with the same seed and configuration must
end with the same digest, byte for byte - in one process or two, whatever ``PYTHONHASHSEED`` is.
The last few records are also kept (as tuples, formatted only when a failure is reported).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import deque
from typing import Any

__all__ = ["Trace"]

_HEAD = struct.Struct("<dHii").pack
_TIME = struct.Struct("<d").pack
_EVENT = struct.Struct("<diHQQB").pack
_U64 = (1 << 64) - 1


@functools.lru_cache(maxsize=64)
def _name(cls: type) -> bytes:
    return cls.__name__.encode()


class Trace:
    """Digest plus a bounded tail of recent records."""

    __slots__ = ("_h", "records", "tail")

    def __init__(self, tail: int = 64) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self.records = 0
        self.tail: deque[tuple[Any, ...]] = deque(maxlen=tail)

    def datagram(self, now: float, src: int, dst: int, channel: str, data: bytes, fate: tuple):
        self.records += 1
        h = self._h.update
        h(_HEAD(now, len(fate), src, dst))
        h(channel.encode())
        h(data)
        for d in fate:
            h(struct.pack("<d", d))
        self.tail.append((now, "send", src, dst, channel, len(data), fate))

    def note(self, now: float, kind: str, *fields: Any) -> None:
        """A structured record; ``fields`` must have a stable ``repr`` (ints, strs, dataclasses)."""
        self.records += 1
        self._h.update(struct.pack("<d", now))
        self._h.update(repr((kind, fields)).encode())
        self.tail.append((now, kind, *fields))

    def event(self, now: float, node: int, channel: str, event: Any) -> None:
        """A notification a core published (fast path for events about one member)."""
        self.records += 1
        h = self._h.update
        m = getattr(event, "member", None)
        if m is not None:
            i = m.id
            h(
                _EVENT(now, node, i.port, i.gen & _U64, m.incarnation, int(m.state))
                + _name(type(event))  # type: ignore[arg-type]  # mypy: type[Any] is hashable
                + channel.encode()
                + i.host.encode()
                + m.meta
            )
        else:
            h(_TIME(now))
            h(repr((node, channel, event)).encode())
        self.tail.append((now, "event", node, channel, event))

    def digest(self) -> str:
        return self._h.copy().hexdigest()

    def format_tail(self) -> str:
        return "\n".join(f"  t={r[0]:.6f} {r[1]} {' '.join(map(str, r[2:]))}" for r in self.tail)
