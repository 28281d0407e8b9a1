"""SWIM + Lifeguard membership as a sans-IO state machine. Everything that decides lives here.

Theory of operation
===================

A :class:`Membership` is one member's view of the cluster. It never touches a socket or a
clock: the host feeds it events, each with the current time ``now`` (seconds, any monotonic
origin), and performs the effects it returns (``swim.events``: send a datagram, set a timer,
open or answer a stream, tell the application). Randomness comes from an injected
``random.Random``; iteration follows dict insertion order or sorted lists, never a set. Same
seed and same events give the same effects, byte for byte (encryption nonces aside, see
``swim.keyring``).

Inputs: ``start``, ``join``, ``restore``, ``leave``, ``broadcast``, ``send_message``,
``set_meta``, ``handle_datagram``, ``handle_timer``, ``handle_stream_request``,
``handle_stream_reply``, ``handle_stream_failed``. Each returns ``list[Effect]``.

The rules, in the order a reader meets them
===========================================

R1  Identity. A member is ``NodeId(host, port, gen)``; one member per address. A larger ``gen``
    replaces a smaller one at the same address (``_on_alive``); news about a smaller ``gen`` is
    stale and ignored (``_on_alive``/``_on_suspect``/``_on_down``, ``handle_datagram`` for
    senders).

R2  Precedence for one identity (SWIM section 4.2, memberlist's checks):
      ALIVE(i)   accepted if i >  current incarnation               (``_on_alive``)
      SUSPECT(i) accepted if i >  current, or i == current and the member is ALIVE;
                 at i == current while already SUSPECT it is a *confirmation* (``_on_suspect``)
      DOWN(i)    accepted if i >= current (LEFT when the member announced it) (``_on_down``)
    DOWN and LEFT are final for an identity: nothing changes them (``_TERMINAL`` checks).
    Unknown identities are learned only from ALIVE (which carries the metadata).

R3  Refutation. Only a member raises its own incarnation. Told it is SUSPECT at i >= its own,
    or ALIVE at i > its own (or at its own with other metadata), it takes max(i, own) + 1 and
    gossips ALIVE; awareness +1 (``_refute``). Past 2**32 - 1 it renews instead.

R4  Renewal. Told it is DOWN or LEFT (any incarnation), or that a newer identity holds its
    address (a previous life that restarted with a larger gen), a member renews: gen + 1 above
    both, incarnation 0, gossip ALIVE, notify ``IdentityRenewed`` (``_renew``). The cluster sees
    the new identity replace the old one. A member receiving a packet from an identity it holds
    DOWN answers with that DOWN, and from an identity older than the one it holds at that
    address answers with the newer ALIVE, so the sender learns it must renew (foca's "turn
    undead", ``handle_datagram``). Two live processes advertising one address would keep
    renewing against each other: advertise distinct addresses.

R5  Probing (SWIM section 3.1, 4.3). Every probe period (``ProbeTick``) the previous probe is
    concluded and the next target is pinged. Targets are taken round-robin from a shuffled list
    of active members, reshuffled at the end of each pass; new (and returning) members are
    inserted at a random position in the rest of the pass (``_next_target``,
    ``_insert_probe_order``). Probing a SUSPECT sends the suspicion
    along with the ping so it can refute at once (Lifeguard's buddy system, ``_start_probe``).
    ``probe_timeout`` later without an ack, up to ``indirect_checks`` random ALIVE members get a
    PING_REQ (``_on_indirect_probe``); each pings the target and relays its ack, or sends a NACK
    after ``NACK_FRACTION * probe_timeout`` (``_on_ping_req``, ``_on_nack_due``). A probe with
    no ack by the next tick, or whose helpers have all nacked (no evidence is left to wait
    for), makes the target SUSPECT at the incarnation seen when the probe started
    (``_conclude_probe``).

R6  Local health (Lifeguard LHA-Probe, ``swim.lifeguard.Awareness``): probe answered -1;
    unanswered +(helpers asked - nacks received), or +1 if no helper could be asked; refuting
    +1. The probe period is ``probe_interval * (score + 1)``; the probe timeout is not scaled.

R7  Suspicion timeout (LHA-Suspicion, ``swim.lifeguard.Suspicion``): Min = alpha * max(1,
    log10 n) * probe_interval, Max = beta * Min, K = alpha - 2 (0 when n - 2 < K). It starts at
    Max and shrinks towards Min with each new member confirming (re-gossiped). At its deadline a
    still-SUSPECT member at the same incarnation is declared DOWN (``_on_suspicion_timeout``).

R8  Dissemination (SWIM section 4.1, ``swim.broadcast``). Every accepted update is queued;
    every packet we send is topped up with queued updates up to ``max_packet_size`` (``_send``);
    each update rides at most ``retransmit_mult * ceil(log10(n + 1))`` packets, least-sent
    first; a newer update about a member replaces the older one. An update never goes twice to
    one address nor back to the member it came from, and retires once every member we could
    tell has it. Gossip rounds push the queue to ``gossip_nodes`` random members (active, or
    down for less than ``gossip_to_the_dead_time``) when it is not empty (``_on_gossip_tick``).
    A state change (a new suspicion, a refutation, a death, our own new alive) that breaks a
    quiet spell (nothing queued) is also pushed at once to ``eager_gossip_nodes`` ALIVE
    members, at most one such round per gossip interval (``_queue_update``, ``_push_news``): news
    crosses a quiet cluster in network round trips, not gossip intervals.

R9  User payloads. ``broadcast`` queues a USER part that every receiver delivers once
    (deduplicated by origin identity and sequence) and relays with the same limit - epidemic
    dissemination (``_on_user``). ``send_message`` sends a MESSAGE part to one address.

R10 Anti-entropy (memberlist's push/pull). Every ``push_pull_scale(push_pull_interval, n)`` a
    member exchanges its full state with one random ALIVE member over a stream, and with one
    random DOWN member still remembered (so the two sides of a healed partition find each
    other and renew: foca's announce-to-down, serf's reconnect); ``join`` does the same with
    each seed. Remote ALIVE and LEFT are applied as such; remote SUSPECT and DOWN
    become a SUSPECT ("we prefer to suspect", ``_merge``) - except DOWN about ourselves, which
    renews (R4). After a join, we send our ALIVE to up to ``join_announce`` learned members.

R11 Leaving. ``leave`` gossips LEFT about ourselves, stops probing and push/pull, and keeps
    gossiping until the LEFT update has been sent its full count (``leave_done``).

R12 Bad input. Frames that are too big, of another version or label, undecryptable, or not
    valid msgpack of the expected shape are dropped and counted in ``stats.dropped`` by reason;
    ``handle_datagram`` never raises on any bytes. Valid packets we choose to ignore (from
    ourselves, from stale or dead identities, pings for someone else) count in
    ``stats.ignored``.

Deliberate differences from memberlist: DOWN is final per identity and members rejoin by
renewal (foca's model, R4); helpers nack at 0.8 * probe_timeout so the nack reaches the prober
within its probe period (memberlist's nack at probe_timeout arrives just as the period ends),
and the probe concludes as soon as every helper has nacked; state changes are gossiped at once
(R8; ``eager_gossip_nodes = 0`` waits for the tick as memberlist does);
no TCP fallback ping; user broadcasts are relayed epidemically rather than left to a delegate.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .broadcast import BroadcastQueue, PendingUpdate
from .codec import BODY_HEADER_MAX, Framer, Malformed
from .config import Config, ConfigError
from .errors import SwimError
from .events import (
    BroadcastReceived,
    Effect,
    GossipTick,
    IdentityRenewed,
    IndirectProbe,
    MemberAlive,
    MemberDown,
    MemberRenamed,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
    MessageReceived,
    NackDue,
    OpenStream,
    ProbeTick,
    PushPullTick,
    ReapDown,
    Send,
    SetTimer,
    StreamDone,
    StreamReply,
    SuspicionTimeout,
    Timer,
)
from .keyring import Keyring
from .lifeguard import Awareness, Suspicion
from .member import INCARNATION_MAX, Address, Member, NodeId, State

__all__ = ["NACK_FRACTION", "Membership", "PayloadTooLarge", "Stats"]

NACK_FRACTION = 0.8
"""A ping-req helper nacks after this fraction of ``probe_timeout`` (see the module notes)."""

SEEN_BROADCASTS_MAX = 8192
"""User broadcasts remembered for de-duplication (oldest forgotten first)."""

_TERMINAL = (State.DOWN, State.LEFT)
_ABOUT_MEMBERS = (codec.ALIVE, codec.SUSPECT, codec.DOWN)


class PayloadTooLarge(SwimError, ValueError):
    """A user payload or metadata that cannot fit in one packet."""


@dataclass(slots=True)
class Stats:
    """Counters for instrumentation; plain ints, safe to read at any time."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    streams_in: int = 0
    streams_out: int = 0
    stream_bytes_out: int = 0
    probes: int = 0
    probes_failed: int = 0
    refutations: int = 0
    renewals: int = 0
    suspicions: int = 0
    declared_down: int = 0
    piggybacked: int = 0
    eager_rounds: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Malformed input by reason (R12): short, version, label, encrypted, plaintext,
    decrypt, decode, field, type, too_big."""
    ignored: dict[str, int] = field(default_factory=dict)
    """Valid input deliberately ignored, by reason."""

    @property
    def malformed(self) -> int:
        return sum(self.dropped.values())


class _Rec:
    """Our mutable record of one member (``Member`` is the public snapshot)."""

    __slots__ = ("changed_at", "id", "incarnation", "meta", "state")

    def __init__(self, nid: NodeId, incarnation: int, state: State, meta: bytes, now: float):
        self.id = nid
        self.incarnation = incarnation
        self.state = state
        self.meta = meta
        self.changed_at = now

    def snapshot(self) -> Member:
        return Member(self.id, self.incarnation, self.state, self.meta)


class _Probe:
    __slots__ = ("acked", "expected_nacks", "incarnation", "nacks", "seq", "target")

    def __init__(self, seq: int, target: NodeId, incarnation: int) -> None:
        self.seq = seq
        self.target = target
        self.incarnation = incarnation
        self.acked = False
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    __slots__ = ("requester", "seq")

    def __init__(self, requester: Address, seq: int) -> None:
        self.requester = requester
        self.seq = seq


def _member_key(addr: Address) -> Hashable:
    return ("m", addr)


class Membership:
    """One member's SWIM/Lifeguard state machine. See the module docstring for the rules."""

    def __init__(
        self,
        addr: Address,
        config: Config,
        rng: random.Random,
        *,
        gen: int | None = None,
        meta: bytes = b"",
        keyring: Keyring | None = None,
    ) -> None:
        host, port = addr
        if not isinstance(host, str) or not host or not isinstance(port, int):
            raise ConfigError(f"addr must be (host, port), got {addr!r}")
        if not 0 < port <= 0xFFFF:
            raise ConfigError(f"addr port must be in 1..65535, got {port}")
        if not isinstance(config, Config):
            raise ConfigError("config must be a swim.Config")
        self.config = config
        self._rng = rng
        self._framer = Framer(config.label_bytes, keyring)
        self._id = NodeId(host, port, rng.getrandbits(32) if gen is None else gen)
        self._inc = 0
        self._meta = self._check_meta(meta)
        self._packed_self = codec.pack_id(self._id)
        self._members: dict[Address, _Rec] = {}
        self._recs: list[_Rec] | None = None  # self._members' values, for sampling
        self._active = 0  # members (not us) alive or suspect
        self._recently_down: dict[Address, float] = {}  # still gossiped to: addr -> since
        self._limit_n, self._limit = -1, 0  # retransmit limit cached for one cluster size
        self._suspicions: dict[Address, Suspicion] = {}
        self._probe_order: list[Address] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = rng.getrandbits(32)
        self._queue = BroadcastQueue()
        self._user_seq = 0
        self._seen: dict[tuple[Any, ...], None] = {}
        self._streams: dict[int, bool] = {}  # stream id -> join
        self._stream_seq = 0
        self._token = 0
        self._started = False
        self._leaving = False
        self._news = False  # a state change to push before the next gossip tick (R8)
        self._last_eager = float("-inf")
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.stats = Stats()
        self.last_dropped = ""  # the reason of the latest drop, for a runtime naming its source
        self._out: list[Effect] = []

    # -- instrumentation -----------------------------------------------------------------------

    @property
    def identity(self) -> NodeId:
        return self._id

    @property
    def addr(self) -> Address:
        return self._id.addr

    @property
    def incarnation(self) -> int:
        return self._inc

    @property
    def meta(self) -> bytes:
        return self._meta

    @property
    def keyring(self) -> Keyring | None:
        return self._framer.keyring

    @property
    def leaving(self) -> bool:
        return self._leaving

    @property
    def leave_done(self) -> bool:
        """True once our LEFT update has been sent its full count (or nobody is left to tell)."""
        if not self._leaving:
            return False
        if _member_key(self.addr) not in self._queue:
            return True
        return not any(r.state.active for r in self._members.values())

    def members(self) -> list[Member]:
        """Active (alive or suspect) members other than us, sorted by address."""
        return [
            self._members[a].snapshot()
            for a in sorted(self._members)
            if self._members[a].state.active
        ]

    def all_members(self) -> list[Member]:
        """Every remembered member, down and left included, sorted by address."""
        return [self._members[a].snapshot() for a in sorted(self._members)]

    def member(self, addr: Address) -> Member | None:
        rec = self._members.get(addr)
        return None if rec is None else rec.snapshot()

    def num_members(self) -> int:
        """The cluster size n used by the formulas: active members plus us."""
        return self._active + 1

    @property
    def retransmit_limit(self) -> int:
        n = self._active + 1
        if n != self._limit_n:
            self._limit_n, self._limit = n, self.config.retransmit_limit(n)
        return self._limit

    def pending_updates(self) -> list[PendingUpdate]:
        """Queued updates with their send counts (compare with ``retransmit_limit``)."""
        return self._queue.snapshot()

    def suspicion_deadline(self, addr: Address) -> float | None:
        s = self._suspicions.get(addr)
        return None if s is None else s.deadline

    def suspicion_confirmations(self, addr: Address) -> int | None:
        s = self._suspicions.get(addr)
        return None if s is None else s.confirmations

    # -- inputs: lifecycle ---------------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """Begin probing, gossiping and push/pull. After ``leave``, rejoin as a renewed identity."""
        if self._started and not self._leaving:
            raise RuntimeError("membership already started")
        if self._leaving:
            self._leaving = False
            self._renew(self._id.gen)
        self._started = True
        self._token += 1
        self._queue_self_alive()
        c = self.config
        self._timer(now + self._rng.random() * c.probe_interval, ProbeTick(self._token))
        self._timer(now + self._rng.random() * c.gossip_interval, GossipTick(self._token))
        if c.push_pull_interval > 0:  # first exchange anywhere in one (scaled) period
            first = now + self._rng.random() * c.push_pull_period(self.num_members())
            self._timer(first, PushPullTick(self._token))
        return self._take()

    def join(self, seeds: Iterable[Address], now: float) -> list[Effect]:
        """Exchange full state with each seed (R10); one ``OpenStream`` per seed not ourselves."""
        self._require_running()
        payload = self._state_payload(join=True)
        for addr in seeds:
            addr = (addr[0], int(addr[1]))
            if addr == self.addr:
                continue
            self._open_stream(addr, payload, join=True)
        return self._take()

    def restore(self, members: Iterable[Member], now: float) -> list[Effect]:
        """Learn ``members`` without gossiping them: a view persisted before a restart (the
        agent keeps one in SQLite), or a simulation's warm start. Each ALIVE member not yet
        known is added ALIVE at its incarnation, and probing will confirm or suspect it; known
        members, ourselves and members in other states are skipped. One ``MemberUp`` each.
        """
        added = False
        me, known = self.addr, self._members
        for m in members:
            nid = m.id
            addr = (nid.host, nid.port)
            if m.state is not State.ALIVE or addr == me or addr in known:
                continue
            rec = _Rec(nid, m.incarnation, State.ALIVE, self._check_meta(m.meta), now)
            known[addr] = rec
            self._active += 1
            self._out.append(MemberUp(rec.snapshot()))
            added = True
            self._recs = None
        if added:  # start a fresh, shuffled probe pass over everyone (O(n) once, R5)
            self._probe_index = len(self._probe_order)
        return self._take()

    def leave(self, now: float) -> list[Effect]:
        """Announce our departure (R11). Keep feeding timers until ``leave_done``."""
        if not self._started:
            raise RuntimeError("call start() first")
        if self._leaving:
            return self._take()
        self._leaving = True
        self._queue_update(self.addr, codec.down(self._id, self._inc, self._id))
        self._gossip(self.config.gossip_nodes, self._gossip_audience(now))
        return self._take()

    def broadcast(self, payload: bytes, now: float, *, key: Hashable | None = None) -> list[Effect]:
        """Disseminate ``payload`` to every member (R9). A later broadcast with the same ``key``
        replaces this one in our queue if it has not gone out yet."""
        payload = bytes(payload)
        self._user_seq = (self._user_seq + 1) & codec.SEQ_MAX
        part = codec.user(self._id, self._user_seq, payload)
        self._check_fits(part, "broadcast payload")
        # Not remembered for de-duplication (``_on_user`` drops our own broadcasts coming back),
        # so they take no room from other members' in the bounded memory of what was seen.
        own = (self._id.host, self._id.port, self._id.gen, self._user_seq)
        qkey = ("u", "key", key) if key is not None else ("u", *own)
        self._queue.push(qkey, part)
        return self._take()

    def send_message(self, addr: Address, payload: bytes, now: float) -> list[Effect]:
        """Send ``payload`` to the member at ``addr`` as one datagram (R9)."""
        part = codec.message(bytes(payload))
        self._check_fits(part, "message payload")
        self._send(addr, [part])
        return self._take()

    def set_meta(self, meta: bytes, now: float) -> list[Effect]:
        """Change our metadata; gossiped with a new incarnation."""
        self._meta = self._check_meta(meta)
        if self._inc >= INCARNATION_MAX:
            self._renew(0)
        else:
            self._inc += 1
            self._queue_self_alive()
        return self._take()

    # -- inputs: network -----------------------------------------------------------------------

    def handle_datagram(self, src: Address, data: bytes, now: float) -> list[Effect]:
        """A datagram arrived from ``src``. Never raises on any bytes (R12)."""
        st = self.stats
        st.packets_in += 1
        st.bytes_in += len(data)
        if len(data) > self.config.max_packet_size:
            self._drop("too_big")
            return self._take()
        try:
            sender, parts = codec.decode_body(self._framer.open(bytes(data)))
        except Malformed as exc:
            self._drop(exc.reason)
            return self._take()
        if sender.addr == self.addr:
            self._ignore("from_self")
            return self._take()
        rec = self._members.get(sender.addr)
        if rec is not None:
            if sender.gen < rec.id.gen:
                self._ignore("stale_sender")
                if not self._leaving:  # R4: show it the newer identity at its address
                    self._send(sender.addr, [codec.alive(rec.id, rec.incarnation, rec.meta)])
                return self._take()
            if sender.gen == rec.id.gen and rec.state in _TERMINAL:
                self._ignore("down_sender")
                # It may hold us down as well (both sides of a healed partition declared each
                # other): take in what it says about us first, so we renew (R4) and it reads
                # our answer from a newer identity - otherwise each side would answer the
                # other's DOWN with its own, forever.
                for p in parts:
                    if p[0] in _ABOUT_MEMBERS and p[1].addr == self.addr:
                        self._apply_update(p, now, sender.addr)
                if rec.state is State.DOWN and not self._leaving:  # R4: tell it to renew
                    self._send(sender.addr, [codec.down(rec.id, rec.incarnation, self._id)])
                return self._take()
        # Updates first, so an ack to a ping already carries our refutation (R3, buddy system).
        for p in parts:
            t = p[0]
            if t in _ABOUT_MEMBERS:
                self._apply_update(p, now, sender.addr)
            elif t == codec.USER:
                self._on_user(p[1], p[2], p[3], sender.addr)
        for p in parts:
            t = p[0]
            if t == codec.PING:
                self._on_ping(sender, p[1], p[2])
            elif t == codec.ACK:
                self._on_ack(p[1])
            elif t == codec.PING_REQ:
                self._on_ping_req(sender, p[1], p[2], p[3], now)
            elif t == codec.NACK:
                probe = self._probe
                if probe is not None and probe.seq == p[1] and not probe.acked:
                    probe.nacks += 1
                    if probe.nacks >= probe.expected_nacks > 0:
                        self._conclude_probe(now)  # every helper failed too: nothing to wait for
            elif t == codec.MESSAGE:
                self._out.append(MessageReceived(sender, p[1]))
        self._push_news(now)
        return self._take()

    def handle_stream_request(
        self, request_id: int, src: Address, data: bytes, now: float
    ) -> list[Effect]:
        """A peer opened a stream with a push/pull (or join) request; answer with our state."""
        self.stats.streams_in += 1
        decoded = self._decode_stream(data)
        if decoded is not None:
            sender, _join, states = decoded
            reply = self._state_payload(join=False)
            self._merge(sender, states, now)
            self._push_news(now)
            self.stats.stream_bytes_out += len(reply)
            self._out.append(StreamReply(request_id, reply))
        return self._take()

    def handle_stream_reply(self, stream_id: int, data: bytes, now: float) -> list[Effect]:
        """The reply to our ``OpenStream(stream_id)`` arrived."""
        join = self._streams.pop(stream_id, None)
        if join is None:
            self._ignore("unknown_stream")
            return self._take()
        decoded = self._decode_stream(data)
        if decoded is None:
            self._out.append(StreamDone(stream_id, False, join))
            return self._take()
        sender, _join, states = decoded
        self._merge(sender, states, now)
        if join and not self._leaving:
            self._announce()
        self._push_news(now)
        self._out.append(StreamDone(stream_id, True, join))
        return self._take()

    def handle_stream_failed(self, stream_id: int, now: float) -> list[Effect]:
        """Our ``OpenStream(stream_id)`` could not complete (refused, timed out, cut)."""
        join = self._streams.pop(stream_id, None)
        if join is not None:
            self._out.append(StreamDone(stream_id, False, join))
        return self._take()

    # -- inputs: timers ------------------------------------------------------------------------

    def handle_timer(self, timer: Timer, now: float) -> list[Effect]:
        """A timer set by ``SetTimer`` is due. Stale timers (old token, old payload) do nothing."""
        if timer.token != self._token:
            self._ignore("stale_timer")
            return self._take()
        if isinstance(timer, ProbeTick):
            self._on_probe_tick(now)
        elif isinstance(timer, IndirectProbe):
            self._on_indirect_probe(timer.seq)
        elif isinstance(timer, NackDue):
            self._on_nack_due(timer.seq, timer.nack)
        elif isinstance(timer, SuspicionTimeout):
            self._on_suspicion_timeout(timer, now)
        elif isinstance(timer, GossipTick):
            self._on_gossip_tick(now)
        elif isinstance(timer, PushPullTick):
            self._on_push_pull_tick(now)
        elif isinstance(timer, ReapDown):
            self._on_reap(timer.member)
        else:
            raise TypeError(f"not a swim timer: {timer!r}")
        self._push_news(now)
        return self._take()

    # -- R1-R4: applying updates ---------------------------------------------------------------

    def _apply_update(self, p: tuple[Any, ...], now: float, src: Address) -> None:
        t = p[0]
        if t == codec.ALIVE:
            self._on_alive(p[1], p[2], p[3], now, src)
        elif t == codec.SUSPECT:
            self._on_suspect(p[1], p[2], p[3], now, src)
        else:
            self._on_down(p[1], p[2], p[3], now, src)

    def _on_alive(
        self, nid: NodeId, inc: int, meta: bytes, now: float, src: Address | None = None
    ) -> None:
        if nid.addr == self.addr:  # about our address (R3, R4)
            if self._leaving or nid.gen < self._id.gen:
                return
            if nid.gen > self._id.gen:
                self._renew(nid.gen)
            elif inc > self._inc or (inc == self._inc and meta != self._meta):
                self._refute(inc)
            return
        rec = self._members.get(nid.addr)
        if rec is None:  # R1: a new member
            rec = _Rec(nid, inc, State.ALIVE, meta, now)
            self._members[nid.addr] = rec
            self._recs = None
            self._active += 1
            self._insert_probe_order(nid.addr)
            self._queue_update(nid.addr, codec.alive(nid, inc, meta), src)
            self._out.append(MemberUp(rec.snapshot()))
            return
        if nid.gen != rec.id.gen:
            if nid.gen < rec.id.gen:
                return  # stale identity (R1)
            old = rec.snapshot()  # a newer identity takes the address (R1)
            self._suspicions.pop(nid.addr, None)
            self._set_state(rec, State.ALIVE, now)
            rec.id, rec.incarnation, rec.meta = nid, inc, meta
            self._queue_update(nid.addr, codec.alive(nid, inc, meta), src)
            if old.active:
                self._out.append(MemberRenamed(old, rec.snapshot()))
            else:
                self._out.append(MemberUp(rec.snapshot()))
            return
        if rec.state in _TERMINAL or inc <= rec.incarnation:  # R2
            return
        was = rec.state
        meta_changed = meta != rec.meta
        rec.incarnation, rec.meta = inc, meta
        self._suspicions.pop(nid.addr, None)
        self._set_state(rec, State.ALIVE, now)
        self._queue_update(nid.addr, codec.alive(nid, inc, meta), src, news=was is State.SUSPECT)
        if was is State.SUSPECT:
            self._out.append(MemberAlive(rec.snapshot()))
        elif meta_changed:
            self._out.append(MemberUpdated(rec.snapshot()))

    def _on_suspect(
        self, nid: NodeId, inc: int, frm: NodeId, now: float, src: Address | None = None
    ) -> None:
        if nid.addr == self.addr:  # R3, R4
            if self._leaving or nid.gen < self._id.gen:
                return
            if nid.gen > self._id.gen:
                self._renew(nid.gen)
            elif inc >= self._inc:
                self._refute(inc)
            return
        rec = self._members.get(nid.addr)
        if rec is None or rec.id != nid or rec.state in _TERMINAL or inc < rec.incarnation:
            return  # unknown, other identity, final, or old news (R1, R2)
        if rec.state is State.SUSPECT and inc == rec.incarnation:
            s = self._suspicions.get(nid.addr)
            if s is not None and s.confirm(frm):  # R7: an independent confirmation
                self._timer(max(s.deadline, now), SuspicionTimeout(self._token, nid, inc))
                self._queue_update(nid.addr, codec.suspect(nid, inc, frm), src)
            return
        if (rec.state is State.ALIVE and inc == rec.incarnation) or inc > rec.incarnation:
            rec.incarnation = inc
            self._set_state(rec, State.SUSPECT, now)
            low, high, k = self.config.suspicion_bounds(self.num_members())
            s = Suspicion(now, low, high, k, frm)
            self._suspicions[nid.addr] = s
            self._timer(s.deadline, SuspicionTimeout(self._token, nid, inc))
            self._queue_update(nid.addr, codec.suspect(nid, inc, frm), src, news=True)
            self.stats.suspicions += 1
            self._out.append(MemberSuspect(rec.snapshot()))

    def _on_down(
        self, nid: NodeId, inc: int, frm: NodeId, now: float, src: Address | None = None
    ) -> None:
        if nid.addr == self.addr:  # R4
            if not self._leaving and nid.gen >= self._id.gen:
                self._renew(nid.gen)
            return
        rec = self._members.get(nid.addr)
        if rec is None:
            return
        if nid.gen != rec.id.gen:
            if nid.gen < rec.id.gen:
                return
            rec.id, rec.meta = nid, b""  # the newer identity is already gone
        elif rec.state in _TERMINAL or inc < rec.incarnation:
            return
        was_active = rec.state.active
        rec.incarnation = inc
        self._suspicions.pop(nid.addr, None)
        self._set_state(rec, State.LEFT if frm == nid else State.DOWN, now)
        self._queue_update(nid.addr, codec.down(nid, inc, frm), src, news=was_active)
        self._timer(now + self.config.down_retention, ReapDown(self._token, nid))
        if was_active:
            self._out.append(MemberDown(rec.snapshot()))

    def _refute(self, accused: int) -> None:
        self.stats.refutations += 1
        self.awareness.apply(1)  # R6
        inc = max(self._inc, accused) + 1
        if inc > INCARNATION_MAX:
            self._renew(0)
            return
        self._inc = inc
        self._queue_self_alive()

    def _renew(self, above: int) -> None:
        old = self._id
        self._id = old.renew(above)
        self._inc = 0
        self._packed_self = codec.pack_id(self._id)
        self.stats.renewals += 1
        self._queue_self_alive()
        self._out.append(IdentityRenewed(old, self._id))

    def _queue_self_alive(self) -> None:
        self._queue_update(self.addr, codec.alive(self._id, self._inc, self._meta), news=True)

    def _set_state(self, rec: _Rec, state: State, now: float) -> None:
        if rec.state.active != state.active:
            self._active += 1 if state.active else -1
            if state.active:
                self._recently_down.pop(rec.id.addr, None)
                self._insert_probe_order(rec.id.addr)
            else:
                self._recently_down[rec.id.addr] = now
        if rec.state is not state:
            rec.state = state
            rec.changed_at = now

    def _on_user(self, origin: NodeId, seq: int, payload: bytes, src: Address) -> None:
        if origin.addr == self.addr:
            return
        key = (origin.host, origin.port, origin.gen, seq)
        if key in self._seen:
            return
        self._remember(key)
        self._out.append(BroadcastReceived(origin, payload))
        self._queue.push(("u", *key), codec.user(origin, seq, payload), src)  # R9: relay

    def _remember(self, key: tuple[Any, ...]) -> None:
        self._seen[key] = None
        if len(self._seen) > SEEN_BROADCASTS_MAX:
            del self._seen[next(iter(self._seen))]

    # -- R5-R7: probing and suspicion ----------------------------------------------------------

    def _on_probe_tick(self, now: float) -> None:
        if self._leaving:
            return  # R11: the probe chain ends
        self._conclude_probe(now)
        target = self._next_target()
        if target is not None:
            self._start_probe(target, now)
        interval = self.awareness.scale(self.config.probe_interval)  # R6
        self._timer(now + interval, ProbeTick(self._token))

    def _conclude_probe(self, now: float) -> None:
        p, self._probe = self._probe, None
        if p is None:
            return
        if p.acked:
            self.awareness.apply(-1)
            return
        self.stats.probes_failed += 1
        if p.expected_nacks > 0:
            self.awareness.apply(p.expected_nacks - p.nacks)
        else:
            self.awareness.apply(1)
        self._on_suspect(p.target, p.incarnation, self._id, now)

    def _next_target(self) -> _Rec | None:
        for _ in range(2 * len(self._probe_order) + 2):
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [a for a, r in self._members.items() if r.state.active]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            addr = self._probe_order[self._probe_index]
            self._probe_index += 1
            rec = self._members.get(addr)
            if rec is not None and rec.state.active:
                return rec
        return None

    def _insert_probe_order(self, addr: Address) -> None:
        """Put a new (or returning) member at a random place in what is left of this pass, so
        it is probed within the pass (SWIM 4.3 inserts anywhere; a returning member could then
        wait a whole pass, which delays detecting a member that restarted and died again)."""
        order = self._probe_order
        if addr in order:  # O(n), only when a member appears or comes back
            i = order.index(addr)
            if i >= self._probe_index:
                return
            del order[i]
            self._probe_index -= 1
        order.insert(self._rng.randrange(self._probe_index, len(order) + 1), addr)

    def _start_probe(self, rec: _Rec, now: float) -> None:
        seq = self._next_seq()
        parts = [codec.ping(seq, rec.id)]
        if rec.state is State.SUSPECT:  # buddy system: let it refute now
            parts.append(codec.suspect(rec.id, rec.incarnation, self._id))
        self._probe = _Probe(seq, rec.id, rec.incarnation)
        self.stats.probes += 1
        self._send(rec.id.addr, parts)
        self._timer(now + self.config.probe_timeout, IndirectProbe(self._token, seq))

    def _on_indirect_probe(self, seq: int) -> None:
        p = self._probe
        if p is None or p.seq != seq or p.acked:
            return
        helpers = self._random_members(
            self.config.indirect_checks,
            lambda r: r.state is State.ALIVE and r.id.addr != p.target.addr,
        )
        for h in helpers:
            self._send(h.id.addr, [codec.ping_req(seq, p.target, True)])
        p.expected_nacks = len(helpers)

    def _on_ping(self, sender: NodeId, seq: int, gen: int) -> None:
        if gen != self._id.gen:
            self._ignore("not_for_us")
            if gen < self._id.gen:
                # The sender pings an older identity of ours: show it the current one.
                self._send(sender.addr, [codec.alive(self._id, self._inc, self._meta)])
            return
        self._send(sender.addr, [codec.ack(seq)])

    def _on_ack(self, seq: int) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            p.acked = True
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.requester, [codec.ack(relay.seq)])

    def _on_ping_req(
        self, sender: NodeId, seq: int, target: NodeId, want_nack: bool, now: float
    ) -> None:
        if target.addr == self.addr:
            self._ignore("ping_req_for_us")
            return
        local = self._next_seq()
        self._relays[local] = _Relay(sender.addr, seq)
        self._send(target.addr, [codec.ping(local, target)])
        wait = NACK_FRACTION * self.config.probe_timeout
        self._timer(now + wait, NackDue(self._token, local, want_nack))

    def _on_nack_due(self, seq: int, nack: bool) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None and nack:
            self._send(relay.requester, [codec.nack(relay.seq)])

    def _on_suspicion_timeout(self, timer: SuspicionTimeout, now: float) -> None:
        m = timer.member
        rec = self._members.get(m.addr)
        s = self._suspicions.get(m.addr)
        if (
            rec is None
            or s is None
            or rec.id != m
            or rec.state is not State.SUSPECT
            or rec.incarnation != timer.incarnation
            or now < s.deadline
        ):
            return  # refuted, replaced, already down, or a later deadline is pending
        self.stats.declared_down += 1
        self._on_down(m, timer.incarnation, self._id, now)

    def _on_reap(self, nid: NodeId) -> None:
        rec = self._members.get(nid.addr)
        if rec is not None and rec.id == nid and rec.state in _TERMINAL:
            del self._members[nid.addr]
            self._recs = None
            self._recently_down.pop(nid.addr, None)

    # -- R8: gossip ----------------------------------------------------------------------------

    def _on_gossip_tick(self, now: float) -> None:
        if self._leaving and self.leave_done:
            return  # R11: nothing more to say
        horizon = now - self.config.gossip_to_the_dead_time
        for addr, since in list(self._recently_down.items()):
            if since < horizon:
                del self._recently_down[addr]
        self._timer(now + self.config.gossip_interval, GossipTick(self._token))
        self._gossip(self.config.gossip_nodes, self._gossip_audience(now))

    def _queue_update(
        self, addr: Address, part: bytes, src: Address | None = None, *, news: bool = False
    ) -> None:
        """Queue an update about the member at ``addr`` (R8). A state change (``news``) that
        breaks a quiet spell (nothing queued) is also pushed at once by ``_push_news``; during
        churn the queue is never empty, the ticks batch the news, and stressed members are not
        flooded with extra rounds."""
        if news and not len(self._queue):
            self._news = True
        self._queue.push(_member_key(addr), part, src)

    def _push_news(self, now: float) -> None:
        """Gossip a state change now instead of at the next tick (R8), at most one such round
        per ``gossip_interval``: a death, a suspicion or a refutation then crosses a quiet
        cluster in a few network round trips rather than a few gossip intervals."""
        if not self._news:
            return
        self._news = False
        fanout = self.config.eager_gossip_nodes
        if fanout == 0 or now - self._last_eager < self.config.gossip_interval:
            return
        self._last_eager = now
        self.stats.eager_rounds += 1
        # ALIVE members only: a suspect may be a slow member, and an extra packet would only
        # crowd its receive queue (fewer false positives under stress, bench/sim_papers.py).
        self._gossip(fanout, lambda r: r.state is State.ALIVE)

    def _gossip_audience(self, now: float) -> Callable[[_Rec], bool]:
        """Who a gossip round may pick: active members, and members down for less than
        ``gossip_to_the_dead_time`` (so they can learn they must renew)."""
        dead_time = self.config.gossip_to_the_dead_time
        return lambda r: r.state.active or now - r.changed_at <= dead_time

    def _gossip(self, fanout: int, pred: Callable[[_Rec], bool]) -> None:
        if not len(self._queue) or fanout == 0:
            return
        for rec in self._random_members(fanout, pred):
            # Nothing for this one (it told us everything queued) says nothing of the others.
            self._send(rec.id.addr, [], required=False)

    # -- R10: push/pull ------------------------------------------------------------------------

    def _on_push_pull_tick(self, now: float) -> None:
        if self._leaving:
            return
        self._timer(
            now + self.config.push_pull_period(self.num_members()), PushPullTick(self._token)
        )
        peers = self._random_members(1, lambda r: r.state is State.ALIVE)
        peers += self._random_members(1, lambda r: r.state is State.DOWN)  # heals partitions
        for rec in peers:
            self._open_stream(rec.id.addr, self._state_payload(join=False), join=False)

    def _open_stream(self, addr: Address, payload: bytes, join: bool) -> None:
        self._stream_seq += 1
        self._streams[self._stream_seq] = join
        self.stats.streams_out += 1
        self.stats.stream_bytes_out += len(payload)
        self._out.append(OpenStream(self._stream_seq, addr, payload, join))

    def _state_payload(self, join: bool) -> bytes:
        me = State.LEFT if self._leaving else State.ALIVE
        states = [(self._id, self._inc, me, self._meta)]
        states.extend((r.id, r.incarnation, r.state, r.meta) for r in self._members.values())
        body = codec.encode_body(self._packed_self, [codec.push_pull(join, states)])
        return self._framer.seal(body)

    def _decode_stream(self, data: bytes) -> tuple[NodeId, bool, list[Any]] | None:
        if len(data) > self.config.max_stream_size:
            self._drop("too_big")
            return None
        try:
            sender, parts = codec.decode_body(self._framer.open(bytes(data)), stream=True)
        except Malformed as exc:
            self._drop(exc.reason)
            return None
        if sender.addr == self.addr:
            self._ignore("from_self")
            return None
        _, join, states = parts[0]
        return sender, join, states

    def _merge(self, sender: NodeId, states: list[Any], now: float) -> None:
        src = sender.addr
        for nid, inc, state, meta in states:
            if state is State.ALIVE:
                self._on_alive(nid, inc, meta, now, src)
            elif state is State.LEFT or (state is State.DOWN and nid.addr == self.addr):
                self._on_down(nid, inc, nid if state is State.LEFT else sender, now, src)
            else:  # SUSPECT, or DOWN about someone else: we prefer to suspect
                self._on_suspect(nid, inc, sender, now, src)

    def _announce(self) -> None:
        limit = self.config.join_announce
        if limit <= 0:
            return
        me = codec.alive(self._id, self._inc, self._meta)
        for rec in self._random_members(limit, lambda r: r.state.active):
            self._send(rec.id.addr, [me])

    # -- sending -------------------------------------------------------------------------------

    def _send(self, addr: Address, parts: list[bytes], *, required: bool = True) -> None:
        """Send ``parts`` topped up with queued updates (R8). With nothing to say and not
        ``required``, send nothing."""
        used = sum(len(p) for p in parts)
        room = (
            self.config.max_packet_size
            - self._framer.overhead
            - BODY_HEADER_MAX
            - len(self._packed_self)
            - used
        )
        audience = self._active + len(self._recently_down)
        extra = self._queue.fill(room, self.retransmit_limit, addr, audience) if room > 0 else []
        if not parts and not extra and not required:
            return
        self.stats.piggybacked += len(extra)
        data = self._framer.seal(codec.encode_body(self._packed_self, parts + extra))
        self.stats.packets_out += 1
        self.stats.bytes_out += len(data)
        self._out.append(Send(addr, data))

    def _check_fits(self, part: bytes, what: str) -> None:
        room = (
            self.config.max_packet_size
            - self._framer.overhead
            - BODY_HEADER_MAX
            - len(self._packed_self)
        )
        if len(part) > room:
            raise PayloadTooLarge(f"{what} too large: {len(part)} bytes encoded, room {room}")

    def _check_meta(self, meta: bytes) -> bytes:
        meta = bytes(meta)
        if len(meta) > self.config.meta_max_size:
            raise PayloadTooLarge(
                f"meta is {len(meta)} bytes, more than meta_max_size ({self.config.meta_max_size})"
            )
        return meta

    # -- helpers -------------------------------------------------------------------------------

    def _random_members(self, k: int, pred: Callable[[_Rec], bool]) -> list[_Rec]:
        """Up to ``k`` distinct members satisfying ``pred``, uniformly at random.

        In a large cluster most members qualify, so random draws with rejection find ``k`` of
        them in O(k) instead of scanning every member (gossip rounds run five times a second);
        when too many draws miss, a scan of the qualifying pool decides instead. Either way each
        qualifying k-subset is equally likely.
        """
        if k <= 0:
            return []
        recs = self._recs
        if recs is None:
            recs = self._recs = list(self._members.values())
        n = len(recs)
        if n > 8 * k:
            randbelow = self._rng.randrange
            chosen: dict[int, _Rec] = {}
            for _ in range(4 * k + 8):
                i = randbelow(n)
                if i not in chosen and pred(recs[i]):
                    chosen[i] = recs[i]
                    if len(chosen) == k:
                        return list(chosen.values())
        pool = [r for r in recs if pred(r)]
        if len(pool) <= k:
            self._rng.shuffle(pool)
            return pool
        return self._rng.sample(pool, k)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & codec.SEQ_MAX
        return self._seq

    def _timer(self, at: float, timer: Timer) -> None:
        self._out.append(SetTimer(at, timer))

    def _require_running(self) -> None:
        if not self._started:
            raise RuntimeError("call start() first")
        if self._leaving:
            raise RuntimeError("this member has left; start() again to rejoin")

    def _drop(self, reason: str) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        self.last_dropped = reason

    def _ignore(self, reason: str) -> None:
        self.stats.ignored[reason] = self.stats.ignored.get(reason, 0) + 1

    def _take(self) -> list[Effect]:
        out, self._out = self._out, []
        return out
