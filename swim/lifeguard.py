"""Lifeguard's local mechanisms (Dadgar et al. 2018, as memberlist implements them).

* :class:`Awareness` - the local health multiplier (LHA-Probe). A saturating score in
  ``0..max-1``: a probe answered lowers it by one; a probe unanswered raises it by the number of
  nacks that did not arrive (or by one if no helper could be asked); having to refute a
  suspicion about ourselves raises it by one. The probe interval is multiplied by ``score + 1``:
  a member that cannot hear its peers slows down instead of accusing them. The probe timeout is
  deliberately not scaled (waiting longer for a UDP ack rarely helps; memberlist's reasoning).
* :class:`Suspicion` - the suspicion timer (LHA-Suspicion). It starts at ``high`` (Max) and
  shrinks towards ``low`` (Min) as independent members confirm the suspicion:
  ``max(Min, Max - (Max - Min) * ln(C + 1) / ln(K + 1))`` measured from the start. The member
  that raised the suspicion does not count as a confirmation; each other member counts once.
"""

from __future__ import annotations

from .config import remaining_suspicion_time
from .member import NodeId

__all__ = ["Awareness", "Suspicion"]


class Awareness:
    """Saturating health score; 0 is healthy."""

    __slots__ = ("max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.max - 1)

    def scale(self, interval: float) -> float:
        return interval * (self.score + 1)


class Suspicion:
    """One member's suspicion: when it started, its bounds, who confirmed it, its deadline."""

    __slots__ = ("_seen", "confirmations", "deadline", "high", "k", "low", "start")

    def __init__(self, start: float, low: float, high: float, k: int, raised_by: NodeId) -> None:
        self.start = start
        self.low = low
        self.high = high
        self.k = k
        self.confirmations = 0
        self._seen: dict[NodeId, None] = {raised_by: None}
        self.deadline = start + (high if k >= 1 else low)

    def confirm(self, by: NodeId) -> bool:
        """Count ``by`` once; True when that was news (the deadline may have moved earlier)."""
        if self.confirmations >= self.k or by in self._seen:
            return False
        self._seen[by] = None
        self.confirmations += 1
        remaining = remaining_suspicion_time(self.confirmations, self.k, 0.0, self.low, self.high)
        self.deadline = self.start + remaining
        return True
