"""A simulated machine: an address, durable disk, and the protocol cores it hosts.

A node hosts a list of *cores* - sans-IO protocol objects such as ``swim.Membership`` wrapped in
an adapter (``simulations.swim_core``), and later the agent's replication core. Each core owns a
*channel* (its name): datagrams, timers and streams carry the channel, so cores on one address do
not see each other's traffic. Cores talk to the world only through their :class:`Port`, and to
each other through events they publish (a replication core learns its peers from the membership
core's notifications).

A crash drops everything volatile: the core objects, pending timers, messages in flight to them.
The :class:`Disk` survives; a restart builds fresh cores from their :data:`CoreSpec` factories,
which may read only the disk. That is what "restart from durable state" means here.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from .clock import Scheduler
from .network import Address, Delay
from .rng import Streams
from .trace import Trace

__all__ = ["Clog", "Core", "CoreSpec", "Disk", "Port", "PortHost", "SimNode"]


class PortHost(Protocol):
    """What a :class:`Port`, and a core through it, may use of the world (``World`` is one):
    the virtual clock and its scheduler, the random streams, the trace, and the ways traffic
    leaves a core. The world imports this module, so this is how a port names it."""

    sched: Scheduler
    streams: Streams
    trace: Trace

    @property
    def now(self) -> float: ...

    def transmit(
        self, node: SimNode, channel: str, dst: Address, data: bytes, info: Any
    ) -> None: ...

    def fire_timer(self, node: SimNode, boot: int, channel: str, timer: Any) -> None: ...

    def open_stream(self, node: SimNode, channel: str, dst: Address, data: bytes) -> int: ...

    def publish(self, node: SimNode, channel: str, event: Any) -> None: ...


class Disk:
    """What survives a crash: small ``values`` and a directory for files (SQLite databases)."""

    def __init__(self, root: Path | None, name: str) -> None:
        self.values: dict[str, Any] = {}
        self._root = root
        self._name = name
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        """The node's directory (created on first use)."""
        if self._path is None:
            if self._root is None:
                raise RuntimeError("this world has no directory for files (World(tmpdir=...))")
            self._path = self._root / self._name
            self._path.mkdir(parents=True, exist_ok=True)
        return self._path

    def wipe(self) -> None:
        """Lose everything (a replaced machine)."""
        self.values.clear()
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


class Port:
    """A core's handle on the world: the clock, its random stream, sends, timers, streams."""

    __slots__ = ("boot", "name", "node", "world")

    def __init__(self, world: PortHost, node: SimNode, name: str) -> None:
        self.world = world
        self.node = node
        self.name = name
        self.boot = node.boot

    @property
    def now(self) -> float:
        return self.world.sched.now

    @property
    def addr(self) -> Address:
        return self.node.addr

    @property
    def disk(self) -> Disk:
        return self.node.disk

    def rng(self, purpose: str = "") -> random.Random:
        """This core's random stream for this boot (a restart gets a new, still seeded, one)."""
        return self.world.streams.fresh(f"{self.node.name}.boot{self.boot}.{self.name}{purpose}")

    def send(self, dst: Address, data: bytes, info: Any = None) -> None:
        """Send one datagram on our channel. ``info`` is passed to send hooks (checkers)."""
        self.world.transmit(self.node, self.name, dst, data, info)

    def set_timer(self, at: float, timer: Any) -> None:
        """Call ``on_timer(timer)`` at ``at``, unless the node crashes first."""
        self.world.sched.at(at, self.world.fire_timer, self.node, self.boot, self.name, timer)

    def open_stream(self, dst: Address, data: bytes) -> int:
        """Open a reliable stream to ``dst``'s core on our channel and send ``data``; later
        ``on_stream_reply(id, frames)`` or ``on_stream_failed(id)``. Returns the stream id."""
        return self.world.open_stream(self.node, self.name, dst, data)

    def publish(self, event: Any) -> None:
        """Tell sibling cores (``on_event``) and the world's observers about ``event``."""
        self.world.publish(self.node, self.name, event)

    def sibling(self, name: str) -> Core | None:
        return self.node.cores.get(name)


class Core:
    """Base class of a hosted core. Override what the protocol needs; defaults ignore input."""

    name: str = "core"

    def __init__(self, port: Port) -> None:
        self.port = port

    def start(self, now: float) -> None:
        """Called once per boot, after every core of the node is built."""

    def on_datagram(self, src: Address, data: bytes, now: float) -> None:
        pass

    def on_timer(self, timer: Any, now: float) -> None:
        pass

    def on_stream_request(self, src: Address, data: bytes, now: float) -> list[bytes] | None:
        """Answer a stream opened by ``src``: the frames to send back (None: close, no answer)."""
        return None

    def on_stream_reply(self, stream_id: int, frames: list[bytes], now: float) -> None:
        pass

    def on_stream_failed(self, stream_id: int, now: float) -> None:
        pass

    def on_event(self, source: str, event: Any, now: float) -> None:
        """A sibling core on this node published ``event``."""

    def stop(self) -> None:
        """The node crashed: release resources (close files) without writing anything more."""


CoreSpec = Callable[[Port], Core]
"""Builds a core for one boot of a node, from the node's disk only."""


class Clog:
    """A stressed node (Lifeguard's experiment): received messages are handled late.

    Each datagram or stream request waits ``lag`` (sampled per message) after it arrives, and
    messages are handled in arrival order, as by a process whose receive loop starves. Timers
    still fire on time, so the node keeps probing with stale information. With ``capacity``,
    at most that many datagrams wait; more are dropped, like a full socket receive buffer.
    """

    __slots__ = ("busy_until", "capacity", "lag", "pending")

    def __init__(self, lag: Delay, capacity: int | None = None) -> None:
        self.lag = lag
        self.capacity = capacity
        self.busy_until = 0.0
        self.pending = 0


C = TypeVar("C", bound=Core)


class SimNode:
    """One machine of the world."""

    __slots__ = ("addr", "boot", "clog", "cores", "crashed_at", "disk", "halted", "index", "name",
                 "specs", "up")  # fmt: skip

    def __init__(self, index: int, addr: Address, specs: list[CoreSpec], disk: Disk) -> None:
        self.index = index
        self.addr = addr
        self.name = f"n{index}"
        self.specs = specs
        self.disk = disk
        self.cores: dict[str, Core] = {}
        self.up = False
        self.boot = 0
        self.clog: Clog | None = None
        self.crashed_at: float | None = None
        self.halted = False
        """Lost power in the middle of an event (``simulations.power_cuts``): nothing it sends
        from then on leaves the machine, and the world crashes it once the event is over."""

    def core(self, name: str) -> Any:
        return self.cores.get(name)

    def core_of(self, name: str, kind: type[C]) -> C | None:
        """The core registered as ``name``, typed as the ``kind`` its spec builds (a static
        view only: not checked at run time)."""
        return cast("C | None", self.cores.get(name))

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<SimNode {self.name} {self.addr[0]}:{self.addr[1]} boot={self.boot} {state}>"
