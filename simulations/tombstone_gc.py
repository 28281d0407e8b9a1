"""Tombstone GC hosted in the simulator: the agent's reaper pass (``corrosion.core.tombstones``)
on a virtual timer, beside a node's agent core.

Each pass does what ``corrosion.runtime.tombstones.Reaper`` does: advance the replicator's
watermark, collect below the stable cut, install the floors. The agent remembers members in its
database (down ones included) so that a restart does not forget a member that is down; here the
sibling swim core's member list, down members included, stands in for it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import swim
from corrosion.core.replication import decode_meta
from corrosion.core.tombstones import reap
from crdt.reaper import merge_floors

from .agent_core import AGENT, AgentCore
from .node import Core, CoreSpec, Port
from .swim_core import SWIM, SwimCore

__all__ = ["REAPER", "ReaperCore", "ReaperTotals", "tombstone_gc"]

REAPER = "tombstone-gc"


@dataclass
class ReaperTotals:
    """Collected rows per node index, over the whole run (restarts included)."""

    reaped: dict[int, int] = field(default_factory=dict)
    passes: dict[int, int] = field(default_factory=dict)


class ReaperCore(Core):
    name = REAPER

    def __init__(
        self, port: Port, interval: float, batch: int, totals: ReaperTotals, off: bool = False
    ) -> None:
        super().__init__(port)
        self.off = off  # hosted but never collecting: a node whose reaper lags behind forever
        self.interval = interval
        self.batch = batch
        self.totals = totals
        self.scanned: dict[str, int] = {}

    def start(self, now: float) -> None:
        self.port.set_timer(now + self.interval, "reap")

    def on_timer(self, timer: Any, now: float) -> None:
        self.run_pass()
        self.port.set_timer(now + self.interval, "reap")

    def run_pass(self) -> int:
        """One pass, inline; returns the rows collected."""
        agent = self.port.node.core_of(AGENT, AgentCore)
        if agent is None or self.off:
            return 0
        rep = agent.replicator
        swim_core = self.port.node.core_of(SWIM, SwimCore)
        if swim_core is not None:
            for m in swim_core.membership.all_members():
                info = decode_meta(m.meta)
                if info is not None:
                    rep.watermark.remembered(info[0], left=m.state is swim.State.LEFT)
        cut = rep.watermark.advance(agent.store.bookie)
        if cut is None:
            return 0
        result = reap(agent.store, cut, self.batch, self.scanned)
        agent.store.tombstone_floors = merge_floors(agent.store.tombstone_floors, result.floors)
        self.scanned.update(result.scanned)
        i = self.port.node.index
        self.totals.passes[i] = self.totals.passes.get(i, 0) + 1
        self.totals.reaped[i] = self.totals.reaped.get(i, 0) + result.total_keys
        return result.total_keys


def tombstone_gc(
    totals: ReaperTotals, interval: float = 5.0, batch: int = 1000, off: Collection[int] = ()
) -> CoreSpec:
    """A spec hosting :class:`ReaperCore` (an ``extra`` core of ``agent_world``); the nodes whose
    index is in ``off`` never collect."""

    def build(port: Port) -> ReaperCore:
        return ReaperCore(port, interval, batch, totals, port.node.index in off)

    return build
