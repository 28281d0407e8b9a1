"""The agent's bookkeeping after heal: every version everywhere, none partial, tables in step.

:class:`AgentBookkeeping` is a liveness checker over the nodes hosting the agent's replication
core (``simulations.agent_core``). After heal and quiet, on every live node:

- every version that some live node holds whole, every live node holds whole: a version
  received in part (chunks lost, or a crash in between) must have been completed, by broadcast
  or by sync, and none may be missing (no gap below it). A version whose only whole copies are
  on nodes that are down cannot be completed until one comes back: its partials and gaps are
  not counted (a crashed node stays down in the liveness phase);
- no buffered change is left over except for a version still held in part;
- the bookkeeping in memory (``Store.bookie``) says what the tables say (``__corro_bookkeeping``,
  ``__corro_seq_bookkeeping``, ``__corro_bookkeeping_gaps``), read here with plain SQL, so a bug
  that books one thing and writes another shows even when no crash reloads the tables.

:class:`BookkeepingAtAnyTime` is the safety half, checked after every event of the run, not only
after heal (corrosion's Antithesis suite asserts it at any time): on every live node whose
database changed in that event, and on every live node every ``full_every`` events, the
bookkeeping in memory says what the tables say, and no buffered change belongs to a version not
held in part. A partial version or a gap is no violation here: faults make them.

Equal databases ("every row is everywhere") are :class:`~simulations.crdt_checks.CrdtConvergence`'s
part; the two run side by side in ``agent_core.agent_world``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corrosion.core.ranges import RangeSet

from .checkers import Checker, SettlingChecker

if TYPE_CHECKING:
    from .node import SimNode
    from .world import World

__all__ = [
    "AgentBookkeeping",
    "BookkeepingAtAnyTime",
    "bookkeeping_problems",
    "consistency_problems",
]


def _short(actor: bytes, names: dict[bytes, str]) -> str:
    return names.get(actor) or actor[:4].hex()


def bookkeeping_problems(
    name: str,
    store: Any,
    names: dict[bytes, str],
    available: dict[bytes, RangeSet] | None = None,
) -> list[str]:
    """What is wrong with one node's bookkeeping once everything should have arrived
    (``store``: a ``corrosion.core.store.Store``; ``names``: actor id -> node name, for
    messages; ``available``: the versions of each actor some live node holds whole, the only
    ones this node can be asked to complete; None: all of them)."""
    out: list[str] = []
    actors = store.bookie.actors
    for actor, booked in actors.items():
        who = _short(actor, names)
        whole = available.get(actor, RangeSet()) if available is not None else None
        for version, p in sorted(booked.partials.items()):
            if whole is None or version in whole:
                out.append(
                    f"{name} holds version {who}:{version} in part "
                    f"(seqs {p.seqs.ranges()} of 0..{p.last_seq})"
                )
        gaps = booked.gaps()
        if whole is not None:
            gaps = gaps.difference(gaps.difference(whole))  # the gaps another node could fill
        if gaps:
            out.append(f"{name} misses versions {gaps.ranges()} of {who}")
    return out + consistency_problems(name, store, names)


def consistency_problems(name: str, store: Any, names: dict[bytes, str]) -> list[str]:
    """Where one node's bookkeeping in memory and its tables disagree (true at any time, not
    only once everything has arrived)."""
    out: list[str] = []
    conn = store.conn
    actors = store.bookie.actors
    held: dict[bytes, RangeSet] = {}
    for actor, start, end in conn.execute(
        "SELECT actor_id, start_version, end_version FROM __corro_bookkeeping"
    ):
        held.setdefault(actor, RangeSet()).add(start, end)
    seqs: dict[tuple[bytes, int], RangeSet] = {}
    for actor, version, start, end in conn.execute(
        "SELECT site_id, version, start_seq, end_seq FROM __corro_seq_bookkeeping"
    ):
        seqs.setdefault((actor, version), RangeSet()).add(start, end)
    gap_rows: dict[bytes, RangeSet] = {}
    for actor, start, end in conn.execute(
        'SELECT actor_id, start, "end" FROM __corro_bookkeeping_gaps'
    ):
        gap_rows.setdefault(actor, RangeSet()).add(start, end)
    for actor in sorted(set(actors) | set(held) | {a for a, _v in seqs} | set(gap_rows)):
        who = _short(actor, names)
        booked = actors.get(actor)
        mem_held = booked.held if booked is not None else RangeSet()
        if mem_held != held.get(actor, RangeSet()):
            out.append(
                f"{name} books {who} versions {mem_held.ranges()} in memory but "
                f"{held.get(actor, RangeSet()).ranges()} in __corro_bookkeeping"
            )
        mem_parts = {v: p.seqs for v, p in (booked.partials.items() if booked else ())}
        table_parts = {v: r for (a, v), r in seqs.items() if a == actor}
        if mem_parts != table_parts:
            out.append(
                f"{name} books partial seqs of {who} "
                f"{ {v: r.ranges() for v, r in sorted(mem_parts.items())} } in memory but "
                f"{ {v: r.ranges() for v, r in sorted(table_parts.items())} } in "
                "__corro_seq_bookkeeping"
            )
        mem_gaps = booked.gaps() if booked is not None else RangeSet()
        if actor in gap_rows and gap_rows[actor] != mem_gaps:
            out.append(
                f"{name} has gaps {mem_gaps.ranges()} of {who} in memory but "
                f"{gap_rows[actor].ranges()} in __corro_bookkeeping_gaps"
            )
    for actor, version, count in conn.execute(
        "SELECT actor_id, version, count(*) FROM __corro_buffered_changes "
        "GROUP BY actor_id, version ORDER BY actor_id, version"
    ):
        booked = actors.get(actor)
        if booked is None or version not in booked.partials:
            who = _short(actor, names)
            out.append(f"{name} keeps {count} buffered change(s) of {who}:{version}, not partial")
    return out


class AgentBookkeeping(SettlingChecker):
    name = "agent-bookkeeping"

    def __init__(self, store_of: Callable[[SimNode], Any], deadline: float = 120.0) -> None:
        """``store_of(node)``: the node's ``Store``, or None if it hosts no agent (or is down)."""
        self.store_of = store_of
        super().__init__(deadline)

    def problems(self, world: World) -> list[str]:
        stores = [(n.name, s) for n in world.nodes if n.up and (s := self.store_of(n)) is not None]
        names = {s.actor_id: name for name, s in stores}
        available: dict[bytes, RangeSet] = {}  # versions some live node holds whole
        for _name, store in stores:
            for actor, booked in store.bookie.actors.items():
                whole = available.setdefault(actor, RangeSet())
                for start, end in booked.held:
                    whole.add(start, end)
        out: list[str] = []
        for name, store in stores:
            out += bookkeeping_problems(name, store, names, available)
            for actor, whole in sorted(available.items()):
                booked = store.bookie.actors.get(actor)
                missing = whole.difference(booked.held) if booked is not None else whole
                if missing and booked is not None:
                    missing = missing.difference(booked.gaps())  # reported as gaps already
                    for v in booked.partials:
                        missing = missing.difference(RangeSet([(v, v)]))  # ... or as partial
                if missing:
                    out.append(
                        f"{name} lacks versions {missing.ranges()} of {_short(actor, names)} "
                        "that another live node holds"
                    )
        return out


class BookkeepingAtAnyTime(Checker):
    name = "agent-bookkeeping-always"

    def __init__(self, store_of: Callable[[SimNode], Any], full_every: int = 64) -> None:
        """``store_of`` as for :class:`AgentBookkeeping`; ``full_every``: every this many
        events, check the nodes whose database did not change too (a bug that changes the
        bookkeeping in memory alone)."""
        self.store_of = store_of
        self.full_every = full_every
        self.checks = 0  # nodes checked (for tests and reports)
        self._changes: dict[int, int] = {}  # id(connection) -> its total_changes() when checked
        self._reported: set[str] = set()
        self._events = 0

    def attach(self, world: World) -> None:
        world.after_each_event(lambda: self._probe(world))

    def _probe(self, world: World) -> None:
        self._events += 1
        full = self._events % self.full_every == 0
        for node in world.nodes:
            if not node.up or node.halted or (store := self.store_of(node)) is None:
                continue  # a node that lost power mid-event writes nothing more: not checked
            conn = store.conn
            changes = conn.total_changes()
            key = id(conn)
            if not full and self._changes.get(key) == changes:
                continue
            self._changes[key] = changes
            self.checks += 1
            for problem in consistency_problems(node.name, store, {}):
                if problem not in self._reported:  # each once: it may last many events
                    self._reported.add(problem)
                    world.fail(self.name, f"{problem} (at event {self._events} of the run)")
