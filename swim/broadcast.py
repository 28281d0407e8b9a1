"""The dissemination queue: updates waiting to be piggybacked, least-sent first.

Infection-style dissemination (SWIM section 4.1): every outgoing packet is topped up with pending
updates until it is full. Each update may ride on at most ``limit`` packets, where the limit is
``retransmit_mult * ceil(log10(n + 1))`` for the *current* cluster size (so a shrinking cluster
may retire an update early; it is never sent once its count reaches the limit). The queue prefers
updates sent the fewest times (among equals, the one that reached that count last: for unsent
updates, the newest), so fresh news goes out before news most members already heard.

Updates are keyed: a membership update is keyed by the member's address, so a newer update about
a member replaces the older one (and starts again at zero sends); a user broadcast by its origin
and sequence number (or by a user-chosen key at its origin).

An update is never sent twice to the same address, nor back to the member we learned it from
(``known_by``): in a small cluster the few allowed sends then reach distinct members instead of
repeating themselves, which plain random piggybacking (memberlist) does not guarantee.
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
    __slots__ = ("key", "part", "sent_to", "transmits")

    def __init__(self, key: Hashable, part: bytes, known_by: Hashable | None) -> None:
        self.key = key
        self.part = part
        self.transmits = 0
        self.sent_to: dict[Hashable, None] = {} if known_by is None else {known_by: None}


class BroadcastQueue:
    """Keyed updates bucketed by send count; ``fill`` picks what fits into a packet."""

    __slots__ = ("_buckets", "_items", "max_items", "sent_total")

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self._items: dict[Hashable, _Item] = {}
        # transmits -> items with that count, in the order they reached it.
        self._buckets: dict[int, dict[Hashable, _Item]] = {}
        self.sent_total = 0  # parts handed out, for instrumentation

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def transmits(self, key: Hashable) -> int | None:
        item = self._items.get(key)
        return None if item is None else item.transmits

    def push(self, key: Hashable, part: bytes, known_by: Hashable | None = None) -> None:
        """Queue ``part`` under ``key``, replacing (and resetting) any older update with it.
        ``known_by`` is the address we learned it from: it is not sent back there."""
        self.discard(key)
        if len(self._items) >= self.max_items:  # full: forget the most-sent, oldest update
            worst = self._buckets[max(self._buckets)]
            self.discard(next(iter(worst)))
        item = _Item(key, part, known_by)
        self._items[key] = item
        self._buckets.setdefault(0, {})[key] = item

    def discard(self, key: Hashable) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            bucket = self._buckets[old.transmits]
            del bucket[key]
            if not bucket:
                del self._buckets[old.transmits]

    def fill(
        self,
        budget: int,
        limit: int,
        dest: Hashable | None = None,
        audience: int | None = None,
    ) -> list[bytes]:
        """Parts totalling at most ``budget`` bytes for a packet to ``dest``; each counts one
        send against ``limit``. Parts already sent to (or learned from) ``dest`` are skipped.
        An update that ``audience`` (> 0) distinct addresses already have - everyone we could
        tell - is retired, like one that reached ``limit``."""
        buckets = self._buckets
        chosen: list[_Item] = []
        done: list[_Item] = []
        room = budget
        for t in sorted(buckets):
            if t >= limit:  # the cluster shrank below this count: retire, never send
                done.extend(buckets[t].values())
                continue
            if room < _MIN_PART:
                break
            for item in reversed(buckets[t].values()):
                if audience and len(item.sent_to) >= audience:
                    done.append(item)
                    continue
                size = len(item.part)
                if size <= room and dest not in item.sent_to:
                    chosen.append(item)
                    room -= size
                    if room < _MIN_PART:
                        break
        for item in done:
            self.discard(item.key)
        for item in chosen:
            if dest is not None:
                item.sent_to[dest] = None
            t = item.transmits
            bucket = buckets[t]
            del bucket[item.key]
            if not bucket:
                del buckets[t]
            t += 1
            item.transmits = t
            if t < limit and not (audience and len(item.sent_to) >= audience):
                nxt = buckets.get(t)
                if nxt is None:
                    buckets[t] = nxt = {}
                nxt[item.key] = item
            else:
                del self._items[item.key]
        self.sent_total += len(chosen)
        return [item.part for item in chosen]

    def snapshot(self) -> list[PendingUpdate]:
        """Every queued update, least-sent first (newest first among equals)."""
        out = []
        for t in sorted(self._buckets):
            for item in reversed(self._buckets[t].values()):
                out.append(PendingUpdate(item.key, item.transmits, len(item.part)))
        return out
