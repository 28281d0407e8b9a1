"""Bookkeeping of versions: for every actor, which versions this node holds, which are partial
(chunks buffered until all seqs are present), and the gaps between.

The in-memory ``Bookie`` mirrors the ``__corro_*`` tables (store.py writes both in the same
transaction) and answers the questions replication asks: is this chunk new? what do I need?
what does a peer lack that I hold?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ranges import RangeSet


@dataclass
class Partial:
    """A version received in part: the seq ranges held so far."""

    last_seq: int
    ts: int
    seqs: RangeSet = field(default_factory=RangeSet)

    @property
    def complete(self) -> bool:
        return self.seqs.covers(0, self.last_seq)


@dataclass
class Booked:
    """One actor's versions at this node."""

    held: RangeSet = field(default_factory=RangeSet)
    partials: dict[int, Partial] = field(default_factory=dict)

    def max(self) -> int:
        top = self.held.max()
        if self.partials:
            top = max(top, max(self.partials))
        return top

    def gaps(self) -> RangeSet:
        """Versions known to exist (below the max) that are neither held nor partial."""
        out = self.held.complement_within(1, self.max())
        for v in self.partials:
            out.remove(v, v)
        return out

    def copy(self) -> Booked:
        return Booked(
            self.held.copy(),
            {v: Partial(p.last_seq, p.ts, p.seqs.copy()) for v, p in self.partials.items()},
        )


class Bookie:
    """All actors' versions. Keys are 16-byte actor ids; iteration is in insertion order."""

    def __init__(self) -> None:
        self.actors: dict[bytes, Booked] = {}

    def get(self, actor: bytes) -> Booked:
        b = self.actors.get(actor)
        if b is None:
            b = self.actors[actor] = Booked()
        return b

    def head(self, actor: bytes) -> int:
        """The highest version of ``actor`` known here (0: none), without booking the actor:
        a partial version counts from its first chunk (``holds`` says when it is applied)."""
        b = self.actors.get(actor)
        return 0 if b is None else b.max()

    def holds(self, actor: bytes, version: int) -> bool:
        b = self.actors.get(actor)
        return b is not None and version in b.held

    def gap_count(self) -> int:
        return sum(len(b.gaps()) for b in self.actors.values())

    # -- sync state -----------------------------------------------------------------------

    def sync_state(self) -> dict[bytes, Any]:
        """What a node tells a peer it has: per actor the head, the gaps below it, and the
        seq ranges held of partial versions (corrosion's SyncStateV1)."""
        out: dict[bytes, Any] = {}
        for actor, b in self.actors.items():
            head = b.max()
            if head == 0:
                continue
            out[actor] = {
                "head": head,
                "gaps": [list(r) for r in b.gaps()],
                "partials": {v: [list(r) for r in p.seqs] for v, p in b.partials.items()},
            }
        return out

    def missing_for(self, theirs: dict[bytes, Any]) -> dict[bytes, RangeSet]:
        """Versions this node holds that a peer with sync state ``theirs`` lacks (whole versions;
        partial ones at the peer count as lacking)."""
        out: dict[bytes, RangeSet] = {}
        for actor, b in self.actors.items():
            if not b.held:
                continue
            state = theirs.get(actor)
            if state is None:
                lack = b.held.copy()
            else:
                theirs_held = RangeSet([(1, state["head"])]) if state["head"] > 0 else RangeSet()
                for s, e in state.get("gaps", []):
                    theirs_held.remove(s, e)
                for v in state.get("partials", {}):
                    theirs_held.remove(v, v)
                lack = b.held.difference(theirs_held)
            if lack:
                out[actor] = lack
        return out


def validate_sync_state(obj: Any) -> dict[bytes, Any]:
    """Check a decoded peer sync state; raise ValueError on anything malformed."""
    if not isinstance(obj, dict):
        raise ValueError("sync state must be a map")
    out: dict[bytes, Any] = {}
    for actor, st in obj.items():
        if type(actor) is not bytes or len(actor) != 16 or not isinstance(st, dict):
            raise ValueError("sync state entries are 16-byte actor -> map")
        head = st.get("head")
        if type(head) is not int or head < 0:
            raise ValueError("head must be a non-negative integer")
        gaps = st.get("gaps", [])
        partials = st.get("partials", {})
        if not isinstance(gaps, list) or not isinstance(partials, dict):
            raise ValueError("gaps must be a list, partials a map")
        for r in gaps:
            if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)):
                raise ValueError("gap ranges are [start, end] integer pairs")
        for v, rs in partials.items():
            if type(v) is not int or not isinstance(rs, list):
                raise ValueError("partials map versions to seq ranges")
        out[actor] = {"head": head, "gaps": gaps, "partials": partials}
    return out
