"""Subscriptions on simulated agents: corrosion's own live-query code, hosted on a node.

:class:`SubscriptionCore` runs ``corrosion.runtime.subscriptions`` as the agent does, minus its
threads, locks and files: the same ``Subscriptions.build`` (describe, plan, first run),
``notify`` with the changes of every local commit and applied batch (``AgentCore.committed``),
and after the agent's debounce the same evaluation (``rerun_rows`` + ``Subscription.diff`` when
the whole query must run again, ``slice_rows`` + ``Subscription.patch`` for the rows of the
changed primary keys). Subscriptions live in memory: a crash loses them and the restart builds
them afresh (the durable files are the agent tests' part).

:class:`SubscriptionsMatch` is the property from corrosion's Antithesis suite: after heal and
quiet, every subscription's rows equal a fresh run of its query, on every live node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from corrosion.runtime.subscriptions import DEBOUNCE, Subscription, Subscriptions

from .agent_core import AGENT, AgentCore
from .checkers import SettlingChecker
from .crdt_checks import sql_literal
from .node import Core, CoreSpec, Port

if TYPE_CHECKING:
    from .node import SimNode
    from .world import World

__all__ = [
    "DEMO_QUERIES",
    "SUBSCRIPTIONS",
    "SubscriptionCore",
    "SubscriptionsMatch",
    "subscriptions",
    "subscriptions_of",
]

SUBSCRIPTIONS = "subscriptions"

DEMO_QUERIES: tuple[tuple[str, tuple], ...] = (
    # a plain SELECT: re-evaluated incrementally, by primary key
    ("SELECT k, v FROM kv WHERE k LIKE ?", ("b%",)),
    ("SELECT k, length(v) FROM kv WHERE length(v) > ?", (1000,)),
    # an aggregate and a self-join: the whole query runs again
    ("SELECT substr(k, 1, 1) AS kind, count(*), max(k) FROM kv GROUP BY kind", ()),
    ("SELECT a.k, b.k FROM kv a JOIN kv b ON b.k = 's' || substr(a.k, 2) WHERE a.k LIKE 'b%'", ()),
)


class SubscriptionCore(Core):
    """Live queries over the sibling agent's database (channel ``"subscriptions"``)."""

    name = SUBSCRIPTIONS

    def __init__(self, port: Port, queries: Sequence[tuple[str, Any]], incremental: bool) -> None:
        super().__init__(port)
        self.queries = list(queries)
        self.incremental = incremental
        self.subs: Subscriptions | None = None
        self.events = 0  # insert/update/delete events produced (for reports)
        self._due = False

    def start(self, now: float) -> None:
        agent = self.port.node.core_of(AGENT, AgentCore)
        if agent is None:
            raise ValueError("a subscription core needs the agent's core before it")
        conn = agent.store.conn
        self.subs = Subscriptions(lambda: conn, lambda _conn: None, incremental=self.incremental)
        for sql, params in self.queries:
            sub = self.subs.build(sql, params)
            self.subs.by_id[sub.id] = sub
        agent.committed.append(self._changed)

    def _changed(self, changes: Sequence[Any], now: float) -> None:
        assert self.subs is not None
        self.subs.notify(changes)
        self._wake(now)

    def _wake(self, now: float) -> None:
        assert self.subs is not None
        if not self._due and any(s.dirty or s.pending for s in self.subs.by_id.values()):
            self._due = True
            self.port.set_timer(now + DEBOUNCE, "evaluate")

    def on_timer(self, timer: Any, now: float) -> None:
        assert self.subs is not None
        self._due = False
        for sub in list(self.subs.by_id.values()):
            self.evaluate(sub)
        self._wake(now)

    def evaluate(self, sub: Subscription) -> None:
        """``Subscriptions.evaluate`` without its worker thread, lock and file."""
        subs = self.subs
        assert subs is not None
        if sub.dirty:
            sub.dirty = False
            sub.pending = {}
            rows = subs.rerun_rows(sub)
            if rows is not None:
                self.events += len(sub.diff(rows))
        elif sub.pending:
            pending, sub.pending = sub.pending, {}
            sliced = subs.slice_rows(sub, pending)
            if sliced is None:
                sub.dirty = True  # the restricted queries failed: run it all
            else:
                self.events += len(sub.patch(*sliced))


def subscriptions(
    queries: Sequence[tuple[str, Any]] = DEMO_QUERIES, incremental: bool = True
) -> CoreSpec:
    """A spec hosting :class:`SubscriptionCore` (after the agent's core on the node)."""

    def build(port: Port) -> SubscriptionCore:
        return SubscriptionCore(port, queries, incremental)

    return build


def subscriptions_of(node: SimNode) -> SubscriptionCore | None:
    return node.core_of(SUBSCRIPTIONS, SubscriptionCore) if node.up else None


def _lines(rows: Sequence[tuple]) -> list[str]:
    return sorted(" | ".join(map(sql_literal, row)) for row in rows)


class SubscriptionsMatch(SettlingChecker):
    name = "subscriptions-match"

    def problems(self, world: World) -> list[str]:
        out: list[str] = []
        for node in world.nodes:
            core = subscriptions_of(node)
            agent = node.core_of(AGENT, AgentCore) if node.up else None
            if core is None or core.subs is None or agent is None:
                continue
            for sub in core.subs.by_id.values():
                held = _lines(list(sub.rows.values()))
                fresh = _lines(agent.store.conn.execute(sub.sql, sub.params).fetchall())
                if held != fresh:
                    extra = sorted(set(held) - set(fresh))[:2]
                    lacking = sorted(set(fresh) - set(held))[:2]
                    out.append(
                        f"{node.name}'s subscription {sub.sql!r} holds {len(held)} rows, a fresh "
                        f"run {len(fresh)}: extra {extra}, lacking {lacking}"
                    )
        return out
