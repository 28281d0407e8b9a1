"""Tombstone GC: when a deleted row's metadata may be collected (``db.tombstone_gc``).

A delete leaves a tombstone (the sentinel clock row, an even causal length ``c``) so that an
older change for the key, arriving later, loses to it. Collecting it (``crdt.reaper``) is safe
only when no change for that key with a causal length below ``c`` can ever arrive at any node
again. corrosion's reaper collects by age alone, which resurrects rows when such a change is
still travelling, and loses re-inserted keys (its issues #418, #532, #541).

The watermark
=============

Every member reports what it holds: the sync state it sends with each sync request (per actor:
head, gaps, partial versions), from which we take per actor its *contiguous head*, the highest
``v`` with every version ``1..v`` held (``Report``). The node's own report is its bookie.
``Watermark.advance`` runs once per reaper pass, on the event loop:

1. If some current member has not reported yet, nothing is reapable.
2. ``cut[a] = min over members of contig_M[a]``: every member holds actor ``a`` up to there.
   The pass records it with ``own[M] = contig_M[M]`` (how far each member had written itself,
   in the report that gave the cut) and the member set.
3. The stable cut is the latest earlier record ``r`` with the same member set such that the
   current ``cut[M] >= r.own[M]`` for every member ``M``. A tombstone is reapable when the
   version that carried it (actor ``D``, version ``v``) has ``v <= r.cut[D]``.

Why that is enough. At record ``r`` every member ``M`` held the delete (``v <= contig_M[D]``),
in a report where its own head was ``r.own[M]``. Any change ``M`` made to the key *before* it
held the delete has a version ``<= r.own[M]``; any change it made after has a causal length
above ``c`` (it wrote over the tombstone, or, if it had reaped it, over the floor: see
``crdt.reaper``). The current cut says every member now holds every member's versions up to
``r.own``: every change that the tombstone must beat has been applied everywhere already, where
the tombstone beat it. Such a version is never received again (held versions are dropped as
duplicates), and sync serves a version's *current* clocks, in which the tombstone has long
replaced the losing change, so a node joining later receives nothing for the key: the row is
simply not there, as it is not anywhere.

Membership. "Members" are those SWIM reports up, those it reports down, those remembered from
the last run, and every actor whose versions this node or a reporting member holds: a member
that is down (crashed, partitioned) is still a member and holds the watermark back until it
returns and reports, and one SWIM has not told us of yet (after a restart the list fills in
slowly) is not skipped if anything it wrote reached anyone. A member that *left* (SWIM's LEFT,
a graceful leave) is dropped; we assume a node that left does not come back with its database
(it rejoins as a new node, with an empty one): its versions still travelling could otherwise
carry a change older than a delete. A change to the member set starts the stabilisation again
(step 3 needs the same set).

Floors. A node that joins after a collection holds the delete's version only as an empty one
(it was served after the tombstone was gone), so the argument above does not make its writes to
the key exceed ``c``: the table's floor does. Each sync answer ends with the server's floors
(``hear_floors``), and a node keeps the largest it has heard.

What is not covered: a node that joins and writes a key before its first sync has completed
(before it has the key's tombstone or the table's floor). Its insert (cl 1) is then concurrent
with the delete; a node that has reaped accepts it, one still holding the tombstone ignores it.
Without GC the delete would win everywhere. Let a new node sync before it takes writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import crdt
from crdt import reaper

from .bookie import Booked, Bookie
from .store import Store


@dataclass(frozen=True)
class Report:
    """What one member held: per actor its contiguous head; ``own``, its own; ``writers``, every
    actor it holds any version of."""

    contig: dict[bytes, int]
    own: int
    writers: frozenset[bytes] = frozenset()


def contiguous_from_state(entry: dict[str, Any]) -> int:
    """The contiguous head in one actor's entry of a sync state: below the first gap or
    partial version."""
    top = int(entry["head"])
    for start, _end in entry.get("gaps", []):
        top = min(top, int(start) - 1)
    for v in entry.get("partials", {}):
        top = min(top, int(v) - 1)
    return max(top, 0)


def contiguous_from_booked(booked: Booked) -> int:
    for start, end in booked.held:
        return end if start == 1 else 0
    return 0


def report_from_state(actor: bytes, state: dict[bytes, Any]) -> Report:
    contig = {a: contiguous_from_state(e) for a, e in state.items()}
    return Report(contig, contig.get(actor, 0), frozenset(a for a, e in state.items() if e["head"]))


def report_from_bookie(actor: bytes, bookie: Bookie) -> Report:
    contig = {a: contiguous_from_booked(b) for a, b in bookie.actors.items()}
    return Report(contig, contig.get(actor, 0))


MAX_RECORDS = 64  # passes remembered while nothing stabilises (a member down, say)


@dataclass(frozen=True)
class _Record:
    members: frozenset[bytes]
    cut: dict[bytes, int]
    own: dict[bytes, int]


@dataclass
class Watermark:
    """The reports and records behind the stable cut (owned by the event loop, O1)."""

    actor: bytes
    members: dict[bytes, bool] = field(default_factory=dict)  # actor -> up
    left: set[bytes] = field(default_factory=set)  # members that left: never counted again
    reports: dict[bytes, Report] = field(default_factory=dict)
    records: list[_Record] = field(default_factory=list)

    def member_up(self, actor: bytes) -> None:
        if actor != self.actor:
            self.members[actor] = True
            self.left.discard(actor)  # back: counted again (it should have come back empty)

    def remembered(self, actor: bytes, *, left: bool = False) -> None:
        """A member remembered from the last run: it counts until it leaves."""
        if left:
            self.member_down(actor, left=True)
        elif actor != self.actor:
            self.members.setdefault(actor, False)

    def member_down(self, actor: bytes, *, left: bool) -> None:
        if left:
            self.members.pop(actor, None)
            self.reports.pop(actor, None)
            self.left.add(actor)
        elif actor in self.members:
            self.members[actor] = False

    def report(self, actor: bytes, state: dict[bytes, Any]) -> None:
        """A member's sync state (validated) arrived with its sync request."""
        if actor != self.actor:
            self.reports[actor] = report_from_state(actor, state)

    def counted(self, bookie: Bookie) -> frozenset[bytes]:
        """Whose reports the cut needs: the members SWIM told us of, and every actor whose
        versions this node or a reporting member holds (a writer is a member until it leaves,
        whether or not SWIM has told us of it yet: after a restart or at a first start the
        member list fills in slowly, and a member missing from it must not be skipped)."""
        found = set(self.members) | {a for a, b in bookie.actors.items() if b.held}
        for r in self.reports.values():
            found.update(r.writers)
        found.add(self.actor)
        return frozenset(found - self.left)

    def unreported(self, bookie: Bookie) -> list[bytes]:
        return sorted(a for a in self.counted(bookie) if a != self.actor and a not in self.reports)

    def advance(self, bookie: Bookie) -> dict[bytes, int] | None:
        """Record the current cut and return the stable cut (None: nothing reapable yet)."""
        if self.unreported(bookie):
            self.records.clear()
            return None
        reports = dict(self.reports)
        reports[self.actor] = report_from_bookie(self.actor, bookie)
        members = self.counted(bookie)
        actors = sorted({a for r in reports.values() for a in r.contig})
        cut = {a: min(reports[m].contig.get(a, 0) for m in members) for a in actors}
        own = {m: reports[m].own for m in members}
        self.records = [r for r in self.records if r.members == members]
        stable = None
        for i in range(len(self.records) - 1, -1, -1):
            r = self.records[i]
            if all(cut.get(m, 0) >= r.own[m] for m in members):
                stable = r.cut
                del self.records[:i]  # older records can only give a lower cut
                break
        self.records.append(_Record(members, cut, own))
        if stable is None:
            del self.records[:-MAX_RECORDS]
        return stable


@dataclass
class ReapResult:
    """What a pass collected (``crdt.reaper.Reaped``) and the floors now in force."""

    bound: int
    keys: dict[str, int]
    clock_rows: int
    floors: dict[str, int]
    scanned: dict[str, int]  # per table, where the next pass starts (``crdt.reaper``)

    @property
    def total_keys(self) -> int:
        return sum(self.keys.values())


def hear_floors(store: Store, obj: Any) -> None:
    """A sync answer's done frame carried the server's table floors (``crdt.reaper``): keys
    this node creates in those tables start above them too, even if it never reaped (a node
    that joined after a collection would otherwise re-insert a collected key at causal length
    1, which peers still holding the tombstone ignore). Malformed floors are ignored. On the
    loop (O3); the next local write that creates keys stores them."""
    if not isinstance(obj, dict) or not all(
        type(k) is str and type(v) is int and v >= 0 for k, v in obj.items()
    ):
        return
    merged = reaper.merge_floors(store.tombstone_floors, obj)
    if merged != store.tombstone_floors:
        store.tombstone_floors = merged


def reap_bound(store: Store, cut: dict[bytes, int]) -> int:
    """The largest local db_version at or below which every booked version is under ``cut``
    (tombstones stamped at or below it are reapable). Reads the bookkeeping (O2)."""
    conn = store.conn
    lowest: int | None = None
    for actor in list(store.bookie.actors):
        row = conn.execute(
            "SELECT min(db_version) FROM __corro_bookkeeping WHERE actor_id = ? "
            "AND end_version > ? AND db_version IS NOT NULL",
            (actor, cut.get(actor, 0)),
        ).fetchone()
        if row is not None and row[0] is not None:
            lowest = row[0] if lowest is None else min(lowest, row[0])
    if lowest is not None:
        return lowest - 1
    return crdt.db_version(conn)


def reap(
    store: Store, cut: dict[bytes, int], limit: int, after: dict[str, int] | None = None
) -> ReapResult:
    """The database half of a reaper pass (a worker thread, under the database lock): collect
    up to ``limit`` tombstones below the stable ``cut``, reading from where the last pass got to
    (``after``, the previous ``ReapResult.scanned``)."""
    bound = reap_bound(store, cut)
    reaper.save_floors(store.conn, store.tombstone_floors)  # those heard from peers too
    done = reaper.reap_tombstones(store.conn, store.conn.crr, bound, limit, after)
    return ReapResult(bound, done.keys, done.clock_rows, reaper.floors(store.conn), done.scanned)
