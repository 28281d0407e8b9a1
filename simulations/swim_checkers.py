"""SWIM invariants, checked on every run that hosts ``swim`` cores.

* :class:`PacketSize` - no datagram over ``max_packet_size``.
* :class:`RetransmitLimit` - no update piggybacked by one process more than
  ``retransmit_mult * ceil(log10(n + 1))`` times (n = every node the world ever had, the largest
  cluster any member can count).
* :class:`Precedence` - per observer and member: the generation never goes back; within one
  identity the incarnation never decreases, SUSPECT(i) only gives way to ALIVE(j > i), DOWN and
  LEFT are final; no observer holds an incarnation the member itself never reached (only the
  member raises it). Seen through every notification plus periodic audits of whole views.
* :class:`AwarenessRange` - Lifeguard's score stays in ``0 .. awareness_max_multiplier - 1``.
* :class:`FalsePositives` - counts suspicions and DOWN verdicts about live identities; with no
  loss, no partition and no stall ever, a single DOWN about a live member is a violation.
* :class:`DetectionBound` - a crashed member stops being active at every live observer within
  :func:`detection_cycle` of the last news the observer got about it.
* :class:`MessageLoad` - a member sends at most a constant number of datagrams per second
  (SWIM's load is independent of n): a few times what probing, answering probes and gossip
  rounds need, over 10-second windows. Catches reply loops and storms.
* :class:`ViewsConverge` (liveness) - after heal and quiet, every live view is exactly the other
  live members, ALIVE, under their current identities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swim import Config, State, codec
from swim.codec import Framer, Malformed
from swim.events import (
    MemberAlive,
    MemberDown,
    MemberRenamed,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
)

from .checkers import Checker
from .swim_core import GOSSIP, SWIM, SwimCore

if TYPE_CHECKING:
    from .node import SimNode
    from .world import World

__all__ = [
    "AwarenessRange",
    "DetectionBound",
    "FalsePositives",
    "MessageLoad",
    "PacketSize",
    "Precedence",
    "RetransmitLimit",
    "ViewsConverge",
    "detection_cycle",
    "swim_checkers",
    "transition_error",
]

_TERMINAL = (State.DOWN, State.LEFT)
_UPDATES = (codec.ALIVE, codec.SUSPECT, codec.DOWN, codec.USER)


def _swim(node: SimNode) -> SwimCore | None:
    return node.core_of(SWIM, SwimCore) if node.up else None


def detection_cycle(config: Config, n: int, max_delay: float) -> float:
    """The longest a live member may keep a crashed member active without news about it.

    Round-robin probing reaches any member within 2n - 1 periods (SWIM section 4.3; one more
    pass boundary and a newly inserted member give 2n + 1), each period stretched by at most
    the awareness multiplier; the failed probe concludes one period later; the suspicion then
    lasts at most its maximum timeout. Network delay and a second of slack on top.
    """
    period = config.probe_interval * config.awareness_max_multiplier
    _, high, _ = config.suspicion_bounds(n)
    return (2 * n + 2) * period + high + 2 * max_delay + 1.0


def transition_error(old: tuple[int, int, State], new: tuple[int, int, State]) -> str | None:
    """Why ``old -> new`` (gen, incarnation, state) breaks SWIM's precedence, or None."""
    g0, i0, s0 = old
    g1, i1, s1 = new
    if g1 < g0:
        return f"generation went back from {g0} to {g1}"
    if g1 > g0:
        return None
    if s0 in _TERMINAL:
        if (i1, s1) != (i0, s0):
            return f"{s0.name}({i0}) is final but became {s1.name}({i1})"
        return None
    if i1 < i0:
        return f"incarnation decreased from {i0} to {i1} ({s0.name} -> {s1.name})"
    if s0 is State.SUSPECT and s1 is State.ALIVE and i1 <= i0:
        return f"SUSPECT({i0}) -> ALIVE({i1}): a refutation needs a higher incarnation"
    return None


class PacketSize(Checker):
    name = "swim-packet-size"

    def attach(self, world: World) -> None:
        self.largest = 0
        world.send_hooks.append(lambda node, ch, dst, data, info, fate: self._on_send(
            world, node, ch, data))  # fmt: skip

    def _on_send(self, world: World, node: SimNode, channel: str, data: bytes) -> None:
        if channel != SWIM:
            return
        size = len(data)
        if size > self.largest:
            self.largest = size
        core = node.core_of(SWIM, SwimCore)
        if core is not None and size > core.config.max_packet_size:
            world.fail(self.name, f"{node.name} sent {size} B > {core.config.max_packet_size}")


class RetransmitLimit(Checker):
    """Counts, per sending process, each distinct piggybacked update it puts on the wire.

    A datagram's own parts come first and its piggybacked updates after them (``swim.core``'s
    ``_send``): a gossip round sends updates only; any other send carries one part of its own,
    or two for a ping to a suspect (the buddy system's SUSPECT about the target, from us).
    """

    name = "swim-retransmit-limit"

    def __init__(self) -> None:
        self.counts: dict[tuple, int] = {}
        self.most = 0
        self._framers: dict[tuple, Framer] = {}

    def attach(self, world: World) -> None:
        self.world = world
        world.send_hooks.append(self._on_send)
        world.lifecycle_hooks.append(self._on_life)

    def _on_life(self, kind: str, node: SimNode) -> None:
        if kind == "crash":  # that process's queue is gone; forget its counts
            idx = node.index
            for k in [k for k in self.counts if k[0] == idx]:
                del self.counts[k]

    def _on_send(self, node, channel, dst, data, info, fate) -> None:
        if channel != SWIM:
            return
        core = node.core_of(SWIM, SwimCore)
        if core is None:
            return
        m = core.membership
        key = (m.config.label_bytes, id(m.keyring))
        framer = self._framers.get(key)
        if framer is None:
            framer = self._framers[key] = Framer(m.config.label_bytes, m.keyring)
        try:
            sender, parts = codec.decode_body(framer.open(data))
        except Malformed as exc:
            self.world.fail(self.name, f"{node.name} sent an undecodable datagram: {exc}")
            return
        if info == GOSSIP:
            own = 0
        else:
            own = 1
            if (
                parts
                and parts[0][0] == codec.PING
                and len(parts) > 1
                and parts[1][0] == codec.SUSPECT
                and parts[1][1].addr == dst
                and parts[1][3] == sender
            ):
                own = 2
        limit = m.config.retransmit_limit(len(self.world.nodes))
        counts = self.counts
        for p in parts[own:]:
            if p[0] not in _UPDATES:
                self.world.fail(self.name, f"{node.name} piggybacked a non-update part {p!r}")
                continue
            k = (node.index, node.boot, p)
            c = counts.get(k, 0) + 1
            counts[k] = c
            if c > self.most:
                self.most = c
            if c == limit + 1:
                self.world.fail(
                    self.name, f"{node.name} sent update {p!r} {c} times (limit {limit})"
                )


class Precedence(Checker):
    name = "swim-precedence"

    def __init__(self, audit_every: float = 2.0, audit_budget: int = 20_000) -> None:
        self.audit_every = audit_every
        self.audit_budget = audit_budget
        # observer node index -> member address -> (gen, incarnation, state, since)
        self.views: dict[int, dict[tuple, tuple[int, int, State, float]]] = {}
        self.observed = 0
        self._cursor = 0

    def attach(self, world: World) -> None:
        self.world = world
        world.event_hooks.append(self._on_event)
        world.lifecycle_hooks.append(self._on_life)
        world.every(self.audit_every, self._audit)

    def _on_life(self, kind: str, node: SimNode) -> None:
        if kind == "crash":  # a new boot is a new observer
            self.views.pop(node.index, None)

    def _on_event(self, node: SimNode, channel: str, ev) -> None:
        if channel != SWIM:
            return
        t = type(ev)
        if t is MemberRenamed:
            self._observe(node, ev.new)
        elif t in (MemberUp, MemberSuspect, MemberAlive, MemberDown, MemberUpdated):
            self._observe(node, ev.member)

    def _observe(self, node: SimNode, member) -> None:
        self.observed += 1
        mid = member.id
        inc = member.incarnation
        view = self.views.get(node.index)
        if view is None:
            view = self.views[node.index] = {}
        key = (mid.host, mid.port)
        new = (mid.gen, inc, member.state)
        old = view.get(key)
        if old is None or old[:3] != new:
            if old is not None:
                err = transition_error(old[:3], new)
                if err is not None and not self._reaped(node, old):
                    self.world.fail(self.name, f"{node.name}'s view of {mid}: {err}")
            view[key] = (*new, self.world.now)
        if inc:  # only the member raises its incarnation: never above its own
            owner = self.world.by_addr.get(key)
            core = owner.core_of(SWIM, SwimCore) if owner is not None and owner.up else None
            if core is not None:
                m = core.membership
                if inc > m.incarnation and m.identity == mid:
                    self.world.fail(
                        self.name,
                        f"{node.name} holds {mid} at incarnation {inc}, "
                        f"above the member's own {m.incarnation}",
                    )

    def _reaped(self, node: SimNode, old: tuple) -> bool:
        # A forgotten DOWN member may be learned again after down_retention (by design).
        core = node.core_of(SWIM, SwimCore)
        return (
            old[2] in _TERMINAL
            and core is not None
            and self.world.now - old[3] >= core.config.down_retention
        )

    def _audit(self, now: float) -> None:
        nodes = self.world.nodes
        if not nodes:
            return
        budget = self.audit_budget
        for _ in range(len(nodes)):
            node = nodes[self._cursor % len(nodes)]
            self._cursor += 1
            core = _swim(node)
            if core is None:
                continue
            members = core.membership.all_members()
            for m in members:
                self._observe(node, m)
            budget -= len(members) + 1
            if budget <= 0:
                break

    def check(self, world: World, final: bool) -> None:
        if final:
            saved, self.audit_budget = self.audit_budget, 1 << 62
            self._audit(world.now)
            self.audit_budget = saved


class AwarenessRange(Checker):
    name = "swim-awareness"

    def __init__(self, audit_every: float = 1.0) -> None:
        self.audit_every = audit_every
        self.highest = 0

    def attach(self, world: World) -> None:
        self.world = world
        world.every(self.audit_every, self._audit)

    def _audit(self, now: float) -> None:
        for node in self.world.nodes:
            core = _swim(node)
            if core is None:
                continue
            a = core.membership.awareness
            if a.score > self.highest:
                self.highest = a.score
            if not 0 <= a.score <= core.config.awareness_max_multiplier - 1:
                self.world.fail(self.name, f"{node.name} awareness score {a.score} out of range")

    def check(self, world: World, final: bool) -> None:
        self._audit(world.now)


class FalsePositives(Checker):
    """Suspicions and DOWN verdicts about identities that were alive at the time."""

    name = "swim-false-positives"

    def __init__(self) -> None:
        self.suspicions: list[tuple[float, int, str]] = []
        self.downs: list[tuple[float, int, str]] = []

    def attach(self, world: World) -> None:
        self.world = world
        world.event_hooks.append(self._on_event)

    def _live(self, member) -> bool:
        owner = self.world.by_addr.get(member.addr)
        core = None if owner is None else _swim(owner)
        return core is not None and core.identity == member.id

    def _on_event(self, node: SimNode, channel: str, ev) -> None:
        if channel != SWIM:
            return
        t = type(ev)
        if t is MemberSuspect:
            if self._live(ev.member):
                self.suspicions.append((self.world.now, node.index, str(ev.member.id)))
        elif t is MemberDown and ev.member.state is State.DOWN and self._live(ev.member):
            world = self.world
            self.downs.append((world.now, node.index, str(ev.member.id)))
            core = node.core_of(SWIM, SwimCore)
            assert core is not None  # it just published this event
            stall_free = 2 * world.net.max_delay < core.config.probe_timeout
            if not world.ever_disturbed and stall_free:
                world.fail(
                    self.name,
                    f"{node.name} declared live {ev.member.id} down with no loss, "
                    "partition or stall in the run",
                )

    @property
    def victims(self) -> int:
        """Distinct live identities declared down by someone."""
        return len({d[2] for d in self.downs})


class DetectionBound(Checker):
    name = "swim-detection-bound"

    def __init__(self, audit_every: float = 1.0) -> None:
        self.audit_every = audit_every
        self.victims: dict[tuple[str, int], tuple[float, int]] = {}  # addr -> (crash t, gen)
        self.news: dict[tuple, tuple[int, int, float]] = {}
        self.detected = 0  # (victim, observer) pairs that reached a non-active state
        self._reported: dict[tuple, None] = {}

    def attach(self, world: World) -> None:
        self.world = world
        world.lifecycle_hooks.append(self._on_life)
        world.every(self.audit_every, self._audit)

    def _on_life(self, kind: str, node: SimNode) -> None:
        if kind == "crash":
            core = node.core_of(SWIM, SwimCore)
            if core is not None:
                self.victims[node.addr] = (self.world.now, core.identity.gen)
        elif kind == "boot":
            self.victims.pop(node.addr, None)
            for k in [k for k in self.news if k[0] == node.addr]:
                del self.news[k]

    def _audit(self, now: float) -> None:
        if not self.victims:
            return
        world = self.world
        n = len(world.nodes)
        for addr, (crashed, gen) in self.victims.items():
            for obs in world.nodes:
                core = _swim(obs)
                if core is None:
                    continue
                key = (addr, obs.index, obs.boot)
                rec = core.membership.member(addr)
                if rec is None or not rec.active or rec.id.gen > gen:
                    if self.news.pop(key, None) is not None:
                        self.detected += 1
                    continue
                prev = self.news.get(key)
                if prev is None or prev[:2] != (rec.id.gen, rec.incarnation):
                    self.news[key] = (rec.id.gen, rec.incarnation, now)
                    continue
                cycle = detection_cycle(core.config, n, world.net.max_delay)
                if now - prev[2] > cycle and key not in self._reported:
                    self._reported[key] = None
                    world.fail(
                        self.name,
                        f"{obs.name} still holds crashed {rec.id} {rec.state.name} "
                        f"{now - prev[2]:.1f}s after its last news of it (bound {cycle:.1f}s, "
                        f"crashed at {crashed:.1f}s)",
                    )

    def check(self, world: World, final: bool) -> None:
        self._audit(world.now)


class MessageLoad(Checker):
    """Datagrams per member per window, against a constant bound from its config."""

    name = "swim-message-load"

    def __init__(self, window: float = 10.0, factor: float = 4.0) -> None:
        self.window = window
        self.factor = factor
        self.counts: dict[int, tuple[int, int]] = {}
        self.busiest = 0.0  # highest datagrams/s of one member over one window

    def bound(self, config: Config) -> int:
        """Datagrams one member may send in one window."""
        probe = (2 + 4 * config.indirect_checks) / config.probe_interval
        answer = probe  # answering others' probes and ping-reqs, on average as many
        gossip = config.gossip_nodes / config.gossip_interval
        return int(self.factor * self.window * (probe + answer + gossip)) + config.join_announce

    def attach(self, world: World) -> None:
        self.world = world
        world.send_hooks.append(self._on_send)

    def _on_send(self, node, channel, dst, data, info, fate) -> None:
        if channel != SWIM:
            return
        w = int(self.world.now // self.window)
        prev = self.counts.get(node.index)
        c = 1 if prev is None or prev[0] != w else prev[1] + 1
        self.counts[node.index] = (w, c)
        rate = c / self.window
        if rate > self.busiest:
            self.busiest = rate
        core = node.core_of(SWIM, SwimCore)
        if core is not None and c == self.bound(core.config) + 1:
            self.world.fail(
                self.name,
                f"{node.name} sent more than {c - 1} datagrams in the {self.window:g}s window "
                f"from {w * self.window:g}s (a reply loop or a storm)",
            )


class ViewsConverge(Checker):
    name = "swim-views-converge"
    liveness = True

    def attach(self, world: World) -> None:
        self.world = world

    def differences(self, world: World, limit: int = 5) -> list[str]:
        live = [(n, c) for n in world.nodes if (c := _swim(n)) is not None]
        expect = {n.addr: (c.identity.gen, State.ALIVE) for n, c in live}
        out = []
        for node, core in live:
            seen = {m.addr: (m.id.gen, m.state) for m in core.membership.members()}
            want = {a: v for a, v in expect.items() if a != node.addr}
            if seen != want:
                extra = sorted(a for a in seen if seen[a] != want.get(a))
                missing = sorted(a for a in want if seen.get(a) != want[a])
                out.append(
                    f"{node.name} sees wrong/extra {_fmt(extra, seen)}; lacks {_fmt(missing, want)}"
                )
                if len(out) >= limit:
                    break
        return out

    def settled(self, world: World) -> bool:
        return not self.differences(world, limit=1)

    def deadline(self, world: World) -> float:
        n = len(world.nodes)
        cores = [c for node in world.nodes if (c := _swim(node)) is not None]
        if not cores:
            return 0.0
        cfg = cores[0].config
        cycle = detection_cycle(cfg, n, world.net.max_delay)
        push_pull = cfg.push_pull_period(n) if cfg.push_pull_interval > 0 else 60.0
        return cycle + 6 * push_pull + 30.0

    def check(self, world: World, final: bool) -> None:
        if not final or world.liveness is None:
            return
        diffs = self.differences(world)
        if diffs:
            start, end, _ = world.liveness
            world.fail(
                self.name,
                f"live views still differ {end - start:.1f}s after heal: " + "; ".join(diffs),
            )


def _fmt(addrs, views) -> str:
    if not addrs:
        return "-"
    return ",".join(f"{a[0]}:{a[1]}#{views[a][0]}/{views[a][1].name}" for a in addrs)


def swim_checkers(audit_every: float = 1.0) -> list[Checker]:
    """Every SWIM checker, ready for ``world.add_checker``."""
    return [
        PacketSize(),
        RetransmitLimit(),
        Precedence(audit_every=max(audit_every, 1.0) * 2),
        AwarenessRange(audit_every),
        FalsePositives(),
        DetectionBound(audit_every),
        MessageLoad(),
        ViewsConverge(),
    ]
