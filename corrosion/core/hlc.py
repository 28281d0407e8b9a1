"""A hybrid logical clock: timestamps that follow physical time but never go backwards and move
past any timestamp received, so a node's transactions are ordered after everything it has seen.

A timestamp is a 64-bit integer: milliseconds since the Unix epoch in the high 48 bits, a
counter in the low 16. Physical time comes from an injected function (the simulator's clock).
"""

from __future__ import annotations

from collections.abc import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
MAX_DRIFT_MS = 300_000  # remote timestamps further ahead than this are not followed


class HybridClock:
    def __init__(self, physical_ms: Callable[[], int]) -> None:
        self._physical_ms = physical_ms
        self._last = 0

    @property
    def last(self) -> int:
        return self._last

    def now(self) -> int:
        wall = self._physical_ms() << COUNTER_BITS
        self._last = wall if wall > self._last else self._last + 1
        return self._last

    def observe(self, remote: int) -> bool:
        """Move past ``remote``; refuse (return False) a timestamp from too far in the future."""
        wall_ms = self._physical_ms()
        if (remote >> COUNTER_BITS) - wall_ms > MAX_DRIFT_MS:
            return False
        if remote > self._last:
            self._last = remote
        return True
