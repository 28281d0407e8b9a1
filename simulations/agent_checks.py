"""The agent's bookkeeping after heal: every version everywhere, none partial, tables in step.

:class:`AgentBookkeeping` is a liveness checker over the nodes hosting the agent's replication
core (``simulations.agent_core``). After heal and quiet, on every live node:

- no version is partial: a version received in part (chunks lost, or a crash in between) must
  have been completed, by broadcast or by sync, and no buffered change may be left over;
- no version is missing below an actor's head (no gaps);
- every actor's head is the same on every live node (a version one live node holds reaches all);
- the bookkeeping in memory (``Store.bookie``) says what the tables say (``__corro_bookkeeping``,
  ``__corro_seq_bookkeeping``, ``__corro_bookkeeping_gaps``), read here with plain SQL, so a bug
  that books one thing and writes another shows even when no crash reloads the tables.

Equal databases ("every row is everywhere") are :class:`~simulations.crdt_checks.CrdtConvergence`'s
part; the two run side by side in ``agent_core.agent_world``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corrosion.core.ranges import RangeSet

from .checkers import SettlingChecker

if TYPE_CHECKING:
    from .node import SimNode
    from .world import World

__all__ = ["AgentBookkeeping", "bookkeeping_problems"]


def _short(actor: bytes, names: dict[bytes, str]) -> str:
    return names.get(actor) or actor[:4].hex()


def bookkeeping_problems(name: str, store: Any, names: dict[bytes, str]) -> list[str]:
    """What is wrong with one node's bookkeeping once everything should have arrived
    (``store``: a ``corrosion.core.store.Store``; ``names``: actor id -> node name, for
    messages)."""
    out: list[str] = []
    conn = store.conn
    actors = store.bookie.actors
    for actor, booked in actors.items():
        who = _short(actor, names)
        for version, p in sorted(booked.partials.items()):
            out.append(
                f"{name} holds version {who}:{version} in part "
                f"(seqs {p.seqs.ranges()} of 0..{p.last_seq})"
            )
        gaps = booked.gaps()
        if gaps:
            out.append(f"{name} misses versions {gaps.ranges()} of {who}")
    # the tables, read on their own
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
        out: list[str] = []
        for name, store in stores:
            out += bookkeeping_problems(name, store, names)
        for actor in sorted({a for _name, s in stores for a in s.bookie.actors}):
            by_head: dict[int, list[str]] = {}
            for name, store in stores:
                by_head.setdefault(store.bookie.head(actor), []).append(name)
            if len(by_head) > 1:
                spread = ", ".join(f"v{h} at {','.join(ns)}" for h, ns in sorted(by_head.items()))
                out.append(f"heads of {_short(actor, names)} differ: {spread}")
        return out
