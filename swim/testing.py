"""A small deterministic host for many cores: virtual clock, seeded latency and loss, crashes.

Not the project's simulator (``simulations/`` builds the full world); this is the minimal
driver the swim tests and benchmarks use, and a worked example of hosting the sans-IO core:
every effect a core returns is turned into a future event on one heap, ordered by time and then
by a sequence number, so a run is a pure function of its seed.

    net = LocalNetwork(seed=1, config=Config.local())
    a = net.add()
    b = net.add(seeds=[a.addr])
    net.run_for(5.0)
    assert [m.addr for m in b.members()] == [a.addr]
"""

from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Callable, Iterable
from typing import Any

from . import codec
from .config import Config
from .core import Membership
from .events import (
    Notification,
    OpenStream,
    Send,
    SetTimer,
    StreamDone,
    StreamReply,
    Timer,
)
from .keyring import Keyring
from .member import Address, NodeId, State

__all__ = ["LocalNetwork", "Peer", "decode", "of_type"]


class Peer:
    """Crafts frames as the member ``nid`` would send them (for single-core tests)."""

    def __init__(
        self, nid: NodeId, config: Config | None = None, keyring: Keyring | None = None
    ) -> None:
        self.id = nid
        self.framer = codec.Framer((config or Config.local()).label_bytes, keyring)

    @property
    def addr(self) -> Address:
        return self.id.addr

    def packet(self, *parts: bytes) -> bytes:
        """A datagram carrying ``parts`` (build them with ``swim.codec.ping`` and friends)."""
        return self.framer.seal(codec.encode_body(codec.pack_id(self.id), list(parts)))

    def stream(self, states: list[tuple[NodeId, int, State, bytes]], join: bool = False) -> bytes:
        """A push/pull stream payload announcing ``states``."""
        body = codec.encode_body(codec.pack_id(self.id), [codec.push_pull(join, states)])
        return self.framer.seal(body)


def decode(
    data: bytes, config: Config | None = None, keyring: Keyring | None = None
) -> tuple[NodeId, list[tuple[Any, ...]]]:
    """(sender, parts) of a frame a core produced; raises ``codec.Malformed``."""
    framer = codec.Framer((config or Config.local()).label_bytes, keyring)
    body = framer.open(data)
    try:
        return codec.decode_body(body)
    except codec.Malformed:
        return codec.decode_body(body, stream=True)


def of_type(effects: Iterable[Any], kind: type | tuple[type, ...]) -> list[Any]:
    """The effects of ``kind`` (a class or tuple of classes), in order."""
    return [e for e in effects if isinstance(e, kind)]


class LocalNetwork:
    """Cores on a virtual network. Datagrams take ``latency`` (+ uniform ``jitter``) seconds
    and are lost with probability ``loss``; streams to a missing member fail at once."""

    def __init__(
        self,
        seed: int = 0,
        *,
        config: Config | None = None,
        latency: float = 0.001,
        jitter: float = 0.0,
        loss: float = 0.0,
        host: str = "10.0.0.1",
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config or Config.local()
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.host = host
        self.now = 0.0
        self.nodes: dict[Address, Membership] = {}
        self.notifications: list[tuple[float, Address, Notification]] = []
        self.sent: list[tuple[float, Address, Address, bytes]] = []
        self.record_sent = False
        self.blocked: dict[tuple[Address, Address], None] = {}
        self.on_effect: Callable[[Membership, Any], None] | None = None
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._next_port = 7000
        self._request_seq = 0

    # -- building the world -----------------------------------------------------------------

    def add(
        self,
        port: int | None = None,
        *,
        seeds: Iterable[Address] = (),
        config: Config | None = None,
        meta: bytes = b"",
        keyring: Keyring | None = None,
        gen: int | None = None,
    ) -> Membership:
        """Start a member (at the next free port unless given) and join ``seeds``."""
        if port is None:
            port = self._next_port
            self._next_port += 1
        addr = (self.host, port)
        if addr in self.nodes:
            raise ValueError(f"{addr} is already running")
        core = Membership(
            addr,
            config or self.config,
            random.Random(self.rng.getrandbits(64)),
            gen=gen,
            meta=meta,
            keyring=keyring,
        )
        self.nodes[addr] = core
        self.apply(core, core.start(self.now))
        seeds = list(seeds)
        if seeds:
            self.apply(core, core.join(seeds, self.now))
        return core

    def crash(self, addr: Address) -> Membership:
        """Remove the member at ``addr`` without a word (its pending events die with it)."""
        return self.nodes.pop(addr)

    def apply(self, core: Membership, effects: list[Any]) -> None:
        """Perform ``effects`` returned by ``core``."""
        for eff in effects:
            if self.on_effect is not None:
                self.on_effect(core, eff)
            if isinstance(eff, Send):
                self._send(core, eff)
            elif isinstance(eff, SetTimer):
                timer = eff.timer
                self._at(eff.at, functools.partial(self._fire, core, timer))
            elif isinstance(eff, OpenStream):
                self._stream(core, eff)
            elif isinstance(eff, Notification):
                self.notifications.append((self.now, core.addr, eff))
            elif isinstance(eff, StreamReply | StreamDone):
                pass  # replies are picked up by _stream; completions need no action here
            else:
                raise TypeError(f"unknown effect {eff!r}")

    # -- running ----------------------------------------------------------------------------

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            at, _, fn = heapq.heappop(self._heap)
            self.now = max(self.now, at)
            fn()
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(self, pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        """Advance in ``step``s until ``pred()`` holds (True) or ``timeout`` passes (False)."""
        end = self.now + timeout
        while self.now < end:
            if pred():
                return True
            self.run_for(step)
        return pred()

    def converged(self, addrs: Iterable[Address] | None = None) -> bool:
        """Every listed live member sees exactly the other listed members, alive, under their
        current identities."""
        addrs = sorted(self.nodes if addrs is None else addrs)
        for a in addrs:
            seen = [(m.id, m.state) for m in self.nodes[a].members()]
            if seen != [(self.nodes[b].identity, State.ALIVE) for b in addrs if b != a]:
                return False
        return True

    # -- internals --------------------------------------------------------------------------

    def _at(self, at: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(at, self.now), self._seq, fn))

    def _alive(self, core: Membership) -> bool:
        return self.nodes.get(core.addr) is core

    def _fire(self, core: Membership, timer: Timer) -> None:
        if self._alive(core):
            self.apply(core, core.handle_timer(timer, self.now))

    def _delay(self) -> float:
        return self.latency + (self.rng.random() * self.jitter if self.jitter else 0.0)

    def _send(self, core: Membership, eff: Send) -> None:
        src = core.addr
        if self.record_sent:
            self.sent.append((self.now, src, eff.addr, eff.data))
        if (src, eff.addr) in self.blocked or (self.loss and self.rng.random() < self.loss):
            return

        def deliver(dst: Address = eff.addr, data: bytes = eff.data) -> None:
            target = self.nodes.get(dst)
            if target is not None:
                self.apply(target, target.handle_datagram(src, data, self.now))

        self._at(self.now + self._delay(), deliver)

    def _stream(self, core: Membership, eff: OpenStream) -> None:
        src = core.addr

        def fail() -> None:
            if self._alive(core):
                self.apply(core, core.handle_stream_failed(eff.stream_id, self.now))

        def request() -> None:
            target = self.nodes.get(eff.addr)
            if target is None or (src, eff.addr) in self.blocked:
                fail()
                return
            self._request_seq += 1
            rid = self._request_seq
            effects = target.handle_stream_request(rid, src, eff.data, self.now)
            reply = next(
                (e.data for e in effects if isinstance(e, StreamReply) and e.request_id == rid),
                None,
            )
            self.apply(target, effects)
            if reply is None or (eff.addr, src) in self.blocked:
                self._at(self.now + self._delay(), fail)
                return

            def respond() -> None:
                if self._alive(core):
                    self.apply(core, core.handle_stream_reply(eff.stream_id, reply, self.now))

            self._at(self.now + self._delay(), respond)

        self._at(self.now + self._delay(), request)
