"""Measurements of a SWIM run for summaries, plots and benches (not invariants).

:class:`SwimMetrics` listens to notifications and lifecycle events: suspicions and DOWN verdicts
(false ones are those about identities alive at the time), detection latency of every crash
(until the first member, and until every member live throughout, marks it not active), and,
when asked, samples of every view over time for plotting.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swim import State
from swim.events import MemberDown, MemberRenamed, MemberSuspect, SuspicionTimeout

from .swim_core import SWIM, SwimCore

if TYPE_CHECKING:
    from .node import SimNode
    from .world import World

__all__ = ["Detection", "SwimMetrics"]


@dataclass(slots=True)
class Detection:
    """One crash: when it happened and when members stopped counting the victim."""

    node: int
    identity: str
    crashed_at: float
    watchers: dict[int, None] = field(default_factory=dict)  # held it active at the crash
    suspected: float | None = None  # latency until the first member suspected it
    first: float | None = None
    marked: dict[int, float] = field(default_factory=dict)  # watcher -> time it marked it

    @property
    def all_marked(self) -> float | None:
        """Latency until every watcher still live marked it (None until then)."""
        if self.watchers and all(w in self.marked for w in self.watchers):
            return max(self.marked[w] for w in self.watchers) - self.crashed_at
        return None


class SwimMetrics:
    def __init__(self, sample_every: float = 0.0) -> None:
        self.sample_every = sample_every
        self.suspicions = 0
        self.false_suspicions = 0
        self.downs = 0
        self.false_downs = 0
        self.false_down_ids: dict[str, None] = {}
        self.verdicts = 0  # DOWN declared by the observer's own suspicion timer
        self.false_verdicts: list[tuple[float, int, str]] = []  # (time, observer, member id)
        self.false_marks: list[tuple[float, int, str]] = []  # every false DOWN, own or adopted
        self.detections: list[Detection] = []
        self._open: dict[tuple, Detection] = {}  # (host, port, gen) -> detection
        self.samples: list[tuple[float, int, int, int, int]] = []  # t, node, alive, suspect, down

    def attach(self, world: World) -> SwimMetrics:
        self.world = world
        world.event_hooks.append(self._on_event)
        world.lifecycle_hooks.append(self._on_life)
        if self.sample_every > 0:
            world.every(self.sample_every, self._sample, start=0.0)
        return self

    def _live_identity(self, member) -> bool:
        owner = self.world.by_addr.get(member.addr)
        if owner is None or not owner.up:
            return False
        core = owner.core_of(SWIM, SwimCore)
        return core is not None and core.identity == member.id

    def _on_life(self, kind: str, node: SimNode) -> None:
        for key in [k for k, d in self._open.items() if d.node == node.index]:
            del self._open[key]  # the victim is back: its detection is over
        for d in self._open.values():
            d.watchers.pop(node.index, None)  # a watcher that crashes or reboots stops counting
        if kind != "crash":
            return
        core = node.core_of(SWIM, SwimCore)
        if core is None:
            return
        nid = core.identity
        d = Detection(node.index, str(nid), self.world.now)
        for other in self.world.nodes:  # members that count it as active now
            oc = other.core_of(SWIM, SwimCore) if other.up and other is not node else None
            rec = None if oc is None else oc.membership.member(node.addr)
            if rec is not None and rec.active and rec.id == nid:
                d.watchers[other.index] = None
        self.detections.append(d)
        self._open[(nid.host, nid.port, nid.gen)] = d

    def _on_event(self, node: SimNode, channel: str, ev) -> None:
        if channel != SWIM:
            return
        t = type(ev)
        if t is MemberSuspect:
            self.suspicions += 1
            if self._live_identity(ev.member):
                self.false_suspicions += 1
            m = ev.member.id
            d = self._open.get((m.host, m.port, m.gen))
            if d is not None and d.suspected is None:
                d.suspected = self.world.now - d.crashed_at
        elif t is MemberDown or t is MemberRenamed:
            member = ev.member if t is MemberDown else ev.old
            if t is MemberDown and member.state is State.DOWN:
                self.downs += 1
                core = node.core_of(SWIM, SwimCore)
                verdict = core is not None and type(core.timer) is SuspicionTimeout
                self.verdicts += verdict
                if self._live_identity(member):
                    self.false_downs += 1
                    self.false_down_ids[str(member.id)] = None
                    self.false_marks.append((self.world.now, node.index, str(member.id)))
                    if verdict:
                        self.false_verdicts.append((self.world.now, node.index, str(member.id)))
            d = self._open.get((member.id.host, member.id.port, member.id.gen))
            if d is not None and node.index in d.watchers and node.index not in d.marked:
                now = self.world.now
                d.marked[node.index] = now
                if d.first is None:
                    d.first = now - d.crashed_at

    def _sample(self, now: float) -> None:
        for node in self.world.nodes:
            core = node.core_of(SWIM, SwimCore) if node.up else None
            if core is None:
                continue
            counts = [0, 0, 0]
            for m in core.membership.all_members():
                counts[0 if m.state is State.ALIVE else 1 if m.state is State.SUSPECT else 2] += 1
            self.samples.append((now, node.index, counts[0], counts[1], counts[2]))

    def detection_latencies(self) -> list[float]:
        return [x for d in self.detections if (x := d.all_marked) is not None]

    def summary(self) -> dict[str, float | int | str]:
        lat = self.detection_latencies()
        out: dict[str, float | int | str] = {
            "suspicions": self.suspicions,
            "false_suspicions": self.false_suspicions,
            "downs": self.downs,
            "false_downs": self.false_downs,
            "false_down_identities": len(self.false_down_ids),
            "false_verdicts": len(self.false_verdicts),
            "crashes": len(self.detections),
            "crashes_detected_by_all": len(lat),
        }
        if lat:
            out["detection_all_median_s"] = round(statistics.median(lat), 3)
            out["detection_all_max_s"] = round(max(lat), 3)
        firsts = [d.first for d in self.detections if d.first is not None]
        if firsts:
            out["detection_first_median_s"] = round(statistics.median(firsts), 3)
        return out
