"""Fault schedules: timed fault events, drawn from a seed, applied to a world.

A :class:`FaultEvent` is data (time, action, arguments) so a schedule can be printed as part of
the derived configuration, compared, and replayed. Actions name :class:`~simulations.world.World`
methods: ``crash``/``restart`` a node, ``partition`` (halves, one isolated node, or random
groups; symmetric or not) and ``heal`` it, ``clog``/``unclog`` a node (stress), ``link`` to
change the default link model (loss bursts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .network import Delay, LinkModel
from .world import World

__all__ = ["FaultEvent", "Schedule"]


@dataclass(frozen=True, slots=True)
class FaultEvent:
    time: float
    action: str  # crash, restart, partition, heal, clog, unclog, link
    node: int = -1
    groups: tuple[tuple[int, ...], ...] = ()
    symmetric: bool = True
    tag: str = ""  # names a partition for its heal
    lag: Delay | None = None
    link: LinkModel | None = None

    def describe(self) -> str:
        a = self.action
        if a in ("crash", "restart", "unclog"):
            what = f"n{self.node}"
        elif a == "clog":
            lag = self.lag
            what = f"n{self.node} lag {lag.low:g}..{lag.high:g}s" if lag else f"n{self.node}"
        elif a == "partition":
            sizes = "/".join(str(len(g)) for g in self.groups)
            way = "symmetric" if self.symmetric else "asymmetric"
            what = f"{self.tag} {sizes} {way} {[list(g) for g in self.groups]}"
        elif a == "heal":
            what = self.tag
        elif a == "link" and self.link is not None:
            m = self.link
            what = f"loss={m.loss:g} dup={m.duplicate:g} reorder={m.reorder:g}"
        else:
            what = ""
        return f"t={self.time:8.3f}s {a:9s} {what}".rstrip()


class Schedule:
    """Applies fault events to a world at their times."""

    def __init__(self, events: Sequence[FaultEvent]) -> None:
        self.events = sorted(events, key=lambda e: (e.time, e.action, e.node, e.tag))
        self._partitions: dict[str, int] = {}

    def install(self, world: World) -> None:
        for e in self.events:
            world.at(e.time, self.apply, world, e)

    def apply(self, world: World, e: FaultEvent) -> None:
        a = e.action
        if a == "crash":
            world.crash(world.nodes[e.node])
        elif a == "restart":
            world.restart(world.nodes[e.node])
        elif a == "partition":
            groups = [[world.nodes[i] for i in g] for g in e.groups]
            self._partitions[e.tag] = world.partition(
                groups, symmetric=e.symmetric, label=e.tag or "split"
            )
        elif a == "heal":
            pid = self._partitions.pop(e.tag, None)
            if pid is not None:
                world.heal(pid)
        elif a == "clog":
            if e.lag is None:
                raise ValueError("a clog needs a lag")
            world.clog(world.nodes[e.node], e.lag)
        elif a == "unclog":
            world.unclog(world.nodes[e.node])
        elif a == "link":
            if e.link is None:
                raise ValueError("a link event needs a model")
            world.set_link(e.link)
        else:
            raise ValueError(f"unknown fault action {a!r}")

    def describe(self) -> list[str]:
        return [e.describe() for e in self.events]
