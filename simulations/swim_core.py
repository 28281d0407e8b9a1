"""Hosting ``swim.Membership`` (the real sans-IO core) on a simulated node.

The adapter performs the core's effects through its :class:`~simulations.node.Port`: ``Send``
becomes a datagram on the ``swim`` channel, ``SetTimer`` a timer, ``OpenStream`` a simulated
stream whose single reply frame goes to ``handle_stream_reply``, notifications are published to
sibling cores and checkers. Each datagram is tagged with what made the core send it (a gossip
round, a timer, a datagram, a stream, an API call): checkers use the tag to tell piggybacked
updates from the message's own parts.

Durable state is the identity generation only (``swim.gen`` on the node's disk): a restarted
node comes back one generation above its last life, so the cluster sees a new identity replace
the old one, as with the runtime's clock-derived generations. It rejoins through its seeds.

Like any production host, the adapter retries the join while the member knows nobody (every
``rejoin_interval`` seconds): a node whose seeds were all unreachable when it booted would
otherwise stay alone for ever - nobody knows its address, and it knows nobody to probe or to
exchange state with (the simulator found exactly that after a crash during a partition).
"""

from __future__ import annotations

from collections.abc import Sequence

from swim import Config, Member, Membership
from swim.events import (
    GossipTick,
    IdentityRenewed,
    Notification,
    OpenStream,
    Send,
    SetTimer,
    StreamDone,
    StreamReply,
    Timer,
)

from .network import Address
from .node import Core, CoreSpec, Port

__all__ = ["SWIM", "SwimCore", "swim"]

SWIM = "swim"

# Send tags: why the core produced a datagram (see checkers.RetransmitLimit).
GOSSIP = "gossip"  # a gossip round or leave(): every part is a piggybacked update
TIMER = "timer"
DATAGRAM = "datagram"
STREAM = "stream"
API = "api"


class _Rejoin:
    __slots__ = ()

    def __repr__(self) -> str:
        return "Rejoin"


REJOIN = _Rejoin()


class SwimCore(Core):
    """A ``swim.Membership`` on a simulated node (channel ``"swim"``)."""

    name = SWIM

    def __init__(
        self,
        port: Port,
        config: Config,
        seeds: Sequence[Address] = (),
        meta: bytes = b"",
        preload: Sequence[Member] = (),
        rejoin_interval: float = 5.0,
    ) -> None:
        """``preload``: members learned before the first boot starts (``Membership.restore``),
        a warm start with no join; a restarted node rejoins through ``seeds`` instead.
        ``rejoin_interval``: how often to retry the join while alone (0: never)."""
        super().__init__(port)
        disk = port.disk.values
        gen = disk.get("swim.gen", 0) + 1
        disk["swim.gen"] = gen
        self.config = config
        self.seeds = [a for a in seeds if a != port.addr]
        self.membership = Membership(port.addr, config, port.rng(), gen=gen, meta=meta)
        self._streams: dict[int, int] = {}  # simulated stream id -> core stream id
        self._requests = 0
        self._preload = preload if port.boot == 1 else ()
        self.rejoin_interval = rejoin_interval
        self.rejoins = 0
        self.timer: Timer | None = None
        """The swim timer being handled (so observers can tell a member's own verdict, made by
        its ``SuspicionTimeout``, from a DOWN it adopted from gossip)."""

    @property
    def identity(self):
        return self.membership.identity

    def start(self, now: float) -> None:
        m = self.membership
        if self._preload:
            self._apply(m.restore(self._preload, now), API)
        self._apply(m.start(now), TIMER)
        if self.seeds and not self._preload:  # a node that knows its view needs no join
            self._apply(m.join(self.seeds, now), API)
        if self.seeds and self.rejoin_interval > 0:
            self.port.set_timer(now + self.rejoin_interval, REJOIN)

    def restore(self, members: Sequence[Member], now: float) -> None:
        """Learn ``members`` without gossiping them (a warm start; needs ``Membership.restore``)."""
        self._apply(self.membership.restore(members, now), API)

    def leave(self, now: float) -> None:
        self._apply(self.membership.leave(now), GOSSIP)

    def broadcast(self, payload: bytes, now: float) -> None:
        self._apply(self.membership.broadcast(payload, now), API)

    # -- inputs ---------------------------------------------------------------------------------

    def on_datagram(self, src: Address, data: bytes, now: float) -> None:
        self._apply(self.membership.handle_datagram(src, data, now), DATAGRAM)

    def on_timer(self, timer, now: float) -> None:
        if timer is REJOIN:
            self.port.set_timer(now + self.rejoin_interval, REJOIN)
            m = self.membership
            if m.num_members() == 1 and not m.leaving:
                self.rejoins += 1
                self._apply(m.join(self.seeds, now), API)
            return
        tag = GOSSIP if type(timer) is GossipTick else TIMER
        self.timer = timer
        try:
            self._apply(self.membership.handle_timer(timer, now), tag)
        finally:
            self.timer = None

    def on_stream_request(self, src: Address, data: bytes, now: float) -> list[bytes] | None:
        self._requests += 1
        rid = self._requests
        effects = self.membership.handle_stream_request(rid, src, data, now)
        reply = None
        for e in effects:
            if type(e) is StreamReply and e.request_id == rid:
                reply = e.data
        self._apply(effects, STREAM)
        return None if reply is None else [reply]

    def on_stream_reply(self, stream_id: int, frames: list[bytes], now: float) -> None:
        sid = self._streams.pop(stream_id, None)
        if sid is None:
            return
        data = frames[0] if frames else b""
        self._apply(self.membership.handle_stream_reply(sid, data, now), STREAM)

    def on_stream_failed(self, stream_id: int, now: float) -> None:
        sid = self._streams.pop(stream_id, None)
        if sid is not None:
            self._apply(self.membership.handle_stream_failed(sid, now), STREAM)

    # -- effects --------------------------------------------------------------------------------

    def _apply(self, effects: list, tag: str) -> None:
        port = self.port
        for e in effects:
            t = type(e)
            if t is Send:
                port.send(e.addr, e.data, tag)
            elif t is SetTimer:
                port.set_timer(e.at, e.timer)
            elif t is OpenStream:
                self._streams[port.open_stream(e.addr, e.data)] = e.stream_id
            elif t is StreamReply or t is StreamDone:
                pass  # replies are returned by on_stream_request; completions need nothing
            elif isinstance(e, Notification):
                if isinstance(e, IdentityRenewed):
                    disk = port.disk.values
                    disk["swim.gen"] = max(disk.get("swim.gen", 0), e.new.gen)
                port.publish(e)
            else:
                raise TypeError(f"unknown swim effect {e!r}")


def swim(
    config: Config,
    seeds: Sequence[Address] = (),
    meta: bytes = b"",
    preload: Sequence[Member] = (),
) -> CoreSpec:
    """A spec hosting a ``swim.Membership`` with ``config`` that joins ``seeds`` at each boot
    (and knows ``preload`` from its first boot on)."""
    seeds = tuple(seeds)

    def build(port: Port) -> SwimCore:
        return SwimCore(port, config, seeds, meta, preload)

    return build
