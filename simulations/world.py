"""The world: one virtual clock, one seed, a faulty network, nodes hosting cores, checkers.

Theory of operation
===================

Everything happens in one thread on one :class:`~simulations.clock.Scheduler`. A core's send
becomes a fate decided at once by the :class:`~simulations.network.Network` (dropped, or one or
two deliveries at sampled times) and scheduled on the heap; timers go on the same heap; a crash
bumps the node's boot number, so every event addressed to the old boot is dropped when it comes
due. Nothing reads the wall clock or the global ``random``; every draw comes from a named
sub-stream of the seed (:class:`~simulations.rng.Streams`). So a run is a function of its seed
and its configuration, and :meth:`World.digest` proves it.

Faults are plain methods - :meth:`crash`, :meth:`restart`, :meth:`partition`, :meth:`heal`,
:meth:`clog`, :meth:`set_link` - that scenarios, hypothesis rules and tests call directly or
schedule with :meth:`at`. Checkers (``simulations.checkers``) subscribe to hooks (datagrams sent,
events published, lifecycle, faults) and to periodic audits; :meth:`check` raises
:class:`SimulationFailure` with the seed, the configuration and the last trace records.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .clock import Scheduler
from .errors import SimulationError
from .network import Address, Delay, LinkModel, Network, Partition
from .node import Clog, Core, CoreSpec, Disk, Port, SimNode
from .rng import Streams
from .trace import Trace

__all__ = ["SimulationFailure", "Violation", "World"]

SendHook = Callable[[SimNode, str, Address, bytes, Any, tuple], None]
EventHook = Callable[[SimNode, str, Any], None]
LifecycleHook = Callable[[str, SimNode], None]


@dataclass(frozen=True, slots=True)
class Violation:
    checker: str
    time: float
    message: str

    def __str__(self) -> str:
        return f"[{self.checker}] t={self.time:.3f}s {self.message}"


class SimulationFailure(SimulationError, AssertionError):
    """An invariant broke. The message carries everything needed to reproduce the run."""

    def __init__(self, world: World, violations: Sequence[Violation]) -> None:
        self.violations = list(violations)
        self.seed = world.seed
        shown = "\n".join(f"  {v}" for v in self.violations[:20])
        more = len(self.violations) - 20
        if more > 0:
            shown += f"\n  ... and {more} more"
        parts = [
            f"{len(self.violations)} invariant violation(s) in a simulated run",
            shown,
            f"reproduce with seed {world.seed}: {world.repro or '(built by a test; see above)'}",
        ]
        if world.config_text:
            parts.append("configuration:\n" + world.config_text)
        parts.append(f"last trace records (of {world.trace.records}):\n{world.trace.format_tail()}")
        super().__init__("\n".join(parts))


class World:
    """A deterministic simulated cluster. See the module docstring."""

    def __init__(
        self,
        seed: int,
        *,
        link: LinkModel | None = None,
        files: bool = False,
        stream_timeout: float = 2.0,
        trace_tail: int = 64,
        files_dir: str | None = None,
    ) -> None:
        """``files``: give nodes a directory (a temporary one, removed by :meth:`close`) for
        durable files such as SQLite databases; ``files_dir`` is where it is made (default:
        the system's temporary directory; ``/dev/shm`` makes fsync-heavy cores cheap).
        ``stream_timeout``: how long a stream to a crashed or unreachable node takes to fail."""
        self.seed = seed
        self.streams = Streams(seed)
        self.sched = Scheduler()
        self.net = Network(self.streams, link)
        self.trace = Trace(trace_tail)
        self.stream_timeout = stream_timeout
        self.nodes: list[SimNode] = []
        self.by_addr: dict[Address, SimNode] = {}
        self.checkers: list[Any] = []
        self.violations: list[Violation] = []
        self.send_hooks: list[SendHook] = []
        self.event_hooks: list[EventHook] = []
        self.lifecycle_hooks: list[LifecycleHook] = []
        self.fault_log: list[tuple[float, str]] = []
        self.repro = ""
        self.fail_fast = False
        """Raise at the first violation instead of at :meth:`check` (shorter failing runs)."""
        self.liveness: tuple[float, float, bool] | None = None
        """(start, end, settled) of the last ``checkers.run_liveness``."""
        self.config_text = ""
        self.ever_disturbed = False  # any loss, partition or clog so far
        self.calm_since = 0.0  # when the last disturbance ended (-1 while disturbed)
        self._clogged: dict[int, None] = {}
        self._clog_rng = self.streams("clog")
        self._stream_seq = 0
        self._tmp = (
            tempfile.TemporaryDirectory(prefix="corrosion-sim-", dir=files_dir) if files else None
        )
        self._root = Path(self._tmp.name) if self._tmp else None
        self._closed = False
        self._closers: list[Callable[[], Any]] = []
        self._probes: list[Callable[[], Any]] = []
        self._update_calm()

    # -- building -------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.sched.now

    @staticmethod
    def address(index: int, port: int = 7946) -> Address:
        """The address of node ``index``: 10.x.y.z, one host per node."""
        return (f"10.{index // 62500 % 256}.{index // 250 % 250}.{index % 250 + 1}", port)

    def add_node(
        self, specs: Sequence[CoreSpec], *, start: bool = True, addr: Address | None = None
    ) -> SimNode:
        """A new node hosting one core per spec (built in order, started in order)."""
        index = len(self.nodes)
        addr = addr or self.address(index)
        if addr in self.by_addr:
            raise ValueError(f"{addr} is taken")
        node = SimNode(index, addr, list(specs), Disk(self._root, f"n{index}"))
        self.nodes.append(node)
        self.by_addr[addr] = node
        if start:
            self._boot(node)
        return node

    def live_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up]

    def add_checker(self, checker: Any) -> Any:
        """Attach ``checker`` (see ``simulations.checkers.Checker``); returns it."""
        self.checkers.append(checker)
        checker.attach(self)
        return checker

    def at(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` (a fault, a write, a probe of the state) at ``when``."""
        self.sched.at(when, fn, *args)

    def after_each_event(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` after every event the scheduler runs (invariants that must hold at
        any time, not only at the end of a phase)."""
        self._probes.append(fn)
        probes = self._probes
        if len(probes) == 1:
            self.sched.probe = fn
        else:

            def all_probes() -> None:
                for probe in probes:
                    probe()

            self.sched.probe = all_probes

    def every(self, period: float, fn: Callable[[float], Any], start: float | None = None) -> None:
        """Call ``fn(now)`` every ``period`` seconds (checker audits, samples for plots)."""

        def tick() -> None:
            fn(self.sched.now)
            self.sched.after(period, tick)

        self.sched.at(self.now + period if start is None else start, tick)

    # -- lifecycle faults ---------------------------------------------------------------------

    def _boot(self, node: SimNode) -> None:
        node.boot += 1
        node.up = True
        node.crashed_at = None
        self.trace.note(self.now, "boot", node.index, node.boot)
        cores: dict[str, Core] = {}
        node.cores = cores
        for spec in node.specs:
            port = Port(self, node, "")
            core = spec(port)
            port.name = core.name
            if core.name in cores:
                raise ValueError(f"two cores named {core.name!r} on {node.name}")
            cores[core.name] = core
        for hook in self.lifecycle_hooks:
            hook("boot", node)
        for core in list(cores.values()):
            if node.up:
                core.start(self.now)

    def crash(self, node: SimNode) -> None:
        """Stop ``node`` at once: volatile state and messages in flight to it are lost."""
        if not node.up:
            return
        self._note_fault(f"crash {node.name}")
        for hook in self.lifecycle_hooks:  # before the cores go: checkers read their last state
            hook("crash", node)
        node.up = False
        node.crashed_at = self.now
        for core in node.cores.values():
            core.stop()
        node.cores = {}
        if node.clog is not None:
            node.clog = None
            self._clogged.pop(node.index, None)
            self._update_calm()

    def start(self, node: SimNode) -> None:
        """Boot a node added with ``start=False``."""
        if not node.up:
            self._boot(node)

    def restart(self, node: SimNode) -> None:
        """Boot a crashed ``node`` again: fresh cores built from its disk."""
        if node.up:
            return
        self._note_fault(f"restart {node.name}")
        self._boot(node)

    # -- network faults -----------------------------------------------------------------------

    def partition(
        self,
        groups: Sequence[Iterable[SimNode | Address]],
        *,
        symmetric: bool = True,
        label: str = "split",
    ) -> int:
        """Cut traffic between ``groups`` (nodes left out join the last group). Returns an id
        for :meth:`heal`."""
        seen: dict[Address, None] = {}
        gs: list[list[Address]] = []
        for g in groups:
            addrs = [x.addr if isinstance(x, SimNode) else x for x in g]
            gs.append(addrs)
            for a in addrs:
                seen[a] = None
        rest = [n.addr for n in self.nodes if n.addr not in seen]
        if rest:
            gs[-1].extend(rest)
        p = Partition.split(gs, symmetric=symmetric, label=label)
        pid = self.net.add_partition(p)
        self._note_fault(f"partition#{pid} {p.describe()}")
        self._update_calm()
        return pid

    def heal(self, pid: int | None = None) -> None:
        """Remove partition ``pid``, or every partition."""
        pids = list(self.net.partitions) if pid is None else [pid]
        for p in pids:
            if self.net.remove_partition(p) is not None:
                self._note_fault(f"heal#{p}")
        self._update_calm()

    def set_link(
        self,
        model: LinkModel,
        src: Address | None = None,
        dst: Address | None = None,
        *,
        channel: str | None = None,
    ):
        """Change the default link model, or the model of the directed link ``src -> dst``;
        with ``channel``, only for that channel's datagrams (``network.Network.channel_links``)."""
        if channel is not None:
            if (src is None) != (dst is None):
                raise ValueError("give both ends of the link, or neither")
            self.net.set_channel_link(channel, model, src, dst)
            where = "" if src is None else f" {src}->{dst}"
            self._note_fault(f"link {channel}{where} {_brief(model)}")
        elif src is None or dst is None:
            self.net.default = model
            self._note_fault(f"link default {_brief(model)}")
        else:
            self.net.set_link(src, dst, model)
            self._note_fault(f"link {src}->{dst} {_brief(model)}")
        self._update_calm()

    def mute(self, channel: str, src: SimNode, dst: SimNode, muted: bool = True) -> None:
        """Drop every ``channel`` datagram from ``src`` to ``dst`` until unmuted (streams still
        pass; healing leaves it: see ``network``); ``muted=False`` unmutes."""
        self.net.mute(channel, src.addr, dst.addr, muted)
        self._note_fault(f"{'mute' if muted else 'unmute'} {channel} {src.name}->{dst.name}")

    def clog(self, node: SimNode, lag: Delay, capacity: int | None = None) -> None:
        """Stress ``node``: it handles received messages ``lag`` late, and drops datagrams
        beyond ``capacity`` waiting ones (see ``node.Clog``)."""
        if not node.up:
            return
        node.clog = Clog(lag, capacity)
        self._clogged[node.index] = None
        cap = "" if capacity is None else f" capacity {capacity}"
        self._note_fault(f"clog {node.name} {lag.kind} {lag.low:g}..{lag.high:g}s{cap}")
        self._update_calm()

    def unclog(self, node: SimNode) -> None:
        if node.clog is None:
            return
        node.clog = None
        self._clogged.pop(node.index, None)
        self._note_fault(f"unclog {node.name}")
        self._update_calm()

    def heal_all(self, link: LinkModel | None = None) -> None:
        """End every network fault: partitions, clogs, and (given ``link``) lossy links, per
        channel too. Muted channels stay muted."""
        self.heal()
        for idx in list(self._clogged):
            self.unclog(self.nodes[idx])
        if link is not None:
            self.net.links.clear()
            self.net.channel_links.clear()
            self.set_link(link)

    @property
    def calm(self) -> bool:
        """No partition, no clogged node, no lossy link right now."""
        return not self.net.partitions and not self._clogged and self.net.clean

    def _update_calm(self) -> None:
        if self.calm:
            if self.calm_since < 0:
                self.calm_since = self.now
        else:
            self.ever_disturbed = True
            self.calm_since = -1.0

    def _note_fault(self, text: str) -> None:
        self.fault_log.append((self.now, text))
        self.trace.note(self.now, "fault", text)

    # -- running ------------------------------------------------------------------------------

    def run_until(self, t: float) -> None:
        self.sched.run_until(t)

    def run_for(self, dt: float) -> None:
        self.sched.run_until(self.now + dt)

    def run_until_true(self, pred: Callable[[], bool], timeout: float, step: float = 0.5) -> bool:
        """Advance in ``step``s until ``pred()`` holds (True) or ``timeout`` passes (False)."""
        end = self.now + timeout
        while not pred():
            if self.now >= end:
                return False
            self.run_until(min(end, self.now + step))
        return True

    # -- checking -----------------------------------------------------------------------------

    def fail(self, checker: str, message: str) -> None:
        """Record a violation (checkers call this); with ``fail_fast``, stop the run here."""
        self.violations.append(Violation(checker, self.now, message))
        self.trace.note(self.now, "violation", checker, message)
        if self.fail_fast:
            raise SimulationFailure(self, self.violations)

    def check(self, final: bool = True) -> None:
        """Run every checker's end-of-run (``final``) or intermediate check; raise
        :class:`SimulationFailure` if any violation was recorded."""
        for c in self.checkers:
            c.check(self, final)
        if self.violations:
            raise SimulationFailure(self, self.violations)

    def digest(self) -> str:
        return self.trace.digest()

    def on_close(self, fn: Callable[[], Any]) -> None:
        """Call ``fn`` in :meth:`close`, after every core stopped (an event loop to close)."""
        self._closers.append(fn)

    def close(self) -> None:
        """Stop every core and remove the world's files."""
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            for core in node.cores.values():
                core.stop()
        for fn in self._closers:
            fn()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a Port uses (node.PortHost) --------------------------------------------------

    def transmit(self, node: SimNode, channel: str, dst: Address, data: bytes, info: Any) -> None:
        if node.halted:
            return
        fate = self.net.fate(node.addr, dst, channel)
        now = self.sched.now
        target = self.by_addr.get(dst)
        self.trace.datagram(now, node.index, -1 if target is None else target.index, channel,
                            data, fate)  # fmt: skip
        for hook in self.send_hooks:
            hook(node, channel, dst, data, info, fate)
        at = self.sched.at
        for d in fate:
            at(now + d, self._deliver, dst, channel, node.addr, data)

    def _deliver(self, dst: Address, channel: str, src: Address, data: bytes) -> None:
        node = self.by_addr.get(dst)
        if node is None or not node.up:
            self.net.stats.to_down += 1
            return
        clog = node.clog
        if clog is not None:
            if clog.capacity is not None and clog.pending >= clog.capacity:
                self.net.stats.overflow += 1
                return
            clog.pending += 1
            t = max(self.sched.now + clog.lag.sample(self._clog_rng), clog.busy_until)
            clog.busy_until = t
            self.sched.at(t, self._handle, node, node.boot, channel, src, data, clog)
            return
        core = node.cores.get(channel)
        if core is not None:
            self.net.stats.delivered += 1
            core.on_datagram(src, data, self.sched.now)

    def _handle(
        self, node: SimNode, boot: int, channel: str, src: Address, data: bytes, clog: Clog
    ) -> None:
        clog.pending -= 1
        if node.boot != boot or not node.up:
            return
        core = node.cores.get(channel)
        if core is not None:
            self.net.stats.delivered += 1
            core.on_datagram(src, data, self.sched.now)

    def fire_timer(self, node: SimNode, boot: int, channel: str, timer: Any) -> None:
        if node.boot != boot or not node.up:
            return
        core = node.cores.get(channel)
        if core is not None:
            core.on_timer(timer, self.sched.now)

    def publish(self, node: SimNode, channel: str, event: Any) -> None:
        now = self.sched.now
        self.trace.event(now, node.index, channel, event)
        for hook in self.event_hooks:
            hook(node, channel, event)
        cores = node.cores
        if len(cores) > 1:
            for name, core in list(cores.items()):
                if name != channel and node.up:
                    core.on_event(channel, event, now)

    # streams: request -> (server handles, maybe late if clogged) -> reply frames, or failure

    def open_stream(self, node: SimNode, channel: str, dst: Address, data: bytes) -> int:
        self._stream_seq += 1
        sid = self._stream_seq
        if node.halted:
            return sid  # never sent: the node crashes before anything comes back
        self.net.stats.streams += 1
        target = self.by_addr.get(dst)
        self.trace.note(self.now, "stream", sid, node.index,
                        -1 if target is None else target.index, channel, len(data))  # fmt: skip
        d = self.net.stream_delay(node.addr, dst)
        if d is None:
            self.sched.after(self.stream_timeout, self._stream_fail, sid, node, node.boot, channel)
        else:
            self.sched.after(d, self._stream_arrive, sid, node, node.boot, channel, dst, data,
                             self.now)  # fmt: skip
        return sid

    def _stream_arrive(self, sid, client, cboot, channel, dst, data, opened_at) -> None:
        server = self.by_addr.get(dst)
        if server is None or not server.up or channel not in server.cores:
            self.sched.at(opened_at + self.stream_timeout, self._stream_fail, sid, client, cboot,
                          channel)  # fmt: skip
            return
        if server.clog is not None:
            clog = server.clog
            t = max(self.now + clog.lag.sample(self._clog_rng), clog.busy_until)
            clog.busy_until = t
            self.sched.at(t, self._stream_serve, sid, client, cboot, channel, server, server.boot,
                          data, opened_at)  # fmt: skip
            return
        self._stream_serve(sid, client, cboot, channel, server, server.boot, data, opened_at)

    def _stream_serve(self, sid, client, cboot, channel, server, sboot, data, opened_at) -> None:
        if server.boot != sboot or not server.up or server.halted:
            self.sched.at(opened_at + self.stream_timeout, self._stream_fail, sid, client, cboot,
                          channel)  # fmt: skip
            return
        frames = server.cores[channel].on_stream_request(client.addr, data, self.now)
        d = self.net.stream_delay(server.addr, client.addr)
        if d is None or server.halted:  # the answer cannot get back: the client times out
            when = max(self.now, opened_at + self.stream_timeout)
            self.sched.at(when, self._stream_fail, sid, client, cboot, channel)
            return
        if frames is None:  # closed without an answer: the client sees it one trip later
            self.sched.after(d, self._stream_fail, sid, client, cboot, channel)
            return
        self.sched.after(d, self._stream_reply, sid, client, cboot, channel, frames)

    def _stream_reply(self, sid, client, cboot, channel, frames) -> None:
        if client.boot != cboot or not client.up:
            return
        core = client.cores.get(channel)
        if core is not None:
            self.trace.note(self.now, "stream_reply", sid, sum(len(f) for f in frames))
            core.on_stream_reply(sid, frames, self.now)

    def _stream_fail(self, sid, client, cboot, channel) -> None:
        self.net.stats.streams_failed += 1
        if client.boot != cboot or not client.up:
            return
        core = client.cores.get(channel)
        if core is not None:
            self.trace.note(self.now, "stream_failed", sid)
            core.on_stream_failed(sid, self.now)


def _brief(m: LinkModel) -> str:
    d = m.delay
    return (
        f"delay={d.kind}({d.low:g},{d.mean:g},{d.high:g}) loss={m.loss:g} "
        f"dup={m.duplicate:g} reorder={m.reorder:g}"
    )
