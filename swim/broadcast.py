"""The dissemination queue: updates waiting to be piggybacked, least-sent first.

Infection-style dissemination (SWIM section 4.1): every outgoing packet is topped up with pending
updates until it is full. Each update may ride on at most ``limit`` packets, where the limit is
``retransmit_mult * ceil(log10(n + 1))`` for the *current* cluster size (so a shrinking cluster
may retire an update early; it is never sent once its count reaches the limit). The queue prefers
updates sent the fewest times, newest first among equals, so fresh news goes out before news
most members already heard.

Updates are keyed: a membership update is keyed by the member's address, so a newer update about
a member replaces the older one (and starts again at zero sends); a user broadcast by its origin
and sequence number (or by a user-chosen key at its origin).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["BroadcastQueue", "PendingUpdate"]

_MIN_PART = 8  # no queued part is smaller; stop filling once less room than this is left


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """Instrumentation: one queued update, its send count so far and its size in bytes."""

    key: Hashable
    transmits: int
    size: int


class _Item:
    __slots__ = ("key", "part", "seq", "transmits")

    def __init__(self, key: Hashable, part: bytes, seq: int) -> None:
        self.key = key
        self.part = part
        self.seq = seq
        self.transmits = 0


def _newest_first(bucket: dict[Hashable, _Item]) -> list[_Item]:
    return sorted(bucket.values(), key=lambda i: -i.seq)


class BroadcastQueue:
    """Keyed updates bucketed by send count; ``fill`` picks what fits into a packet."""

    __slots__ = ("_buckets", "_items", "_seq", "sent_total")

    def __init__(self) -> None:
        self._items: dict[Hashable, _Item] = {}
        # transmits -> items with that count (any order; ``seq`` orders them).
        self._buckets: dict[int, dict[Hashable, _Item]] = {}
        self._seq = 0
        self.sent_total = 0  # parts handed out, for instrumentation

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def transmits(self, key: Hashable) -> int | None:
        item = self._items.get(key)
        return None if item is None else item.transmits

    def push(self, key: Hashable, part: bytes) -> None:
        """Queue ``part`` under ``key``, replacing (and resetting) any older update with it."""
        self.discard(key)
        self._seq += 1
        item = _Item(key, part, self._seq)
        self._items[key] = item
        self._buckets.setdefault(0, {})[key] = item

    def discard(self, key: Hashable) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            bucket = self._buckets[old.transmits]
            del bucket[key]
            if not bucket:
                del self._buckets[old.transmits]

    def fill(self, budget: int, limit: int) -> list[bytes]:
        """Parts totalling at most ``budget`` bytes; each counts one send against ``limit``."""
        chosen: list[_Item] = []
        expired: list[_Item] = []
        room = budget
        for t in sorted(self._buckets):
            bucket = self._buckets[t]
            if t >= limit:  # the cluster shrank below this count: retire, never send
                expired.extend(bucket.values())
                continue
            if room < _MIN_PART:
                break
            for item in _newest_first(bucket):
                size = len(item.part)
                if size <= room:
                    chosen.append(item)
                    room -= size
                    if room < _MIN_PART:
                        break
        for item in expired:
            self.discard(item.key)
        for item in chosen:
            self.discard(item.key)
            item.transmits += 1
            if item.transmits < limit:
                self._items[item.key] = item
                self._buckets.setdefault(item.transmits, {})[item.key] = item
        self.sent_total += len(chosen)
        return [item.part for item in chosen]

    def snapshot(self) -> list[PendingUpdate]:
        """Every queued update, least-sent first (newest first among equals)."""
        out = []
        for t in sorted(self._buckets):
            for item in _newest_first(self._buckets[t]):
                out.append(PendingUpdate(item.key, item.transmits, len(item.part)))
        return out
