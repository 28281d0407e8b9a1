"""Hosting the agent's replication core (``corrosion.core.replication.Replicator``) on a node.

The adapter mirrors what ``corrosion.runtime.agent.AgentRuntime`` does with real sockets: a
``Store`` (a real SQLite file in the node's directory, so it survives crashes; site id from the
node's seeded stream), the ``Replicator`` on the virtual clock (its hybrid logical clock reads
virtual milliseconds), peers learned from the sibling swim core's notifications through the member
metadata the agent advertises (``encode_meta``), by the agent's own translation
(``Replicator.member_event``). Its effects map onto the port: ``SendFrame``
-> a datagram on the ``corrosion`` channel (the simulated network may lose it: sync repairs),
``StartSync`` -> a stream answered with every frame of ``serve_sync``, ``SetTimer`` -> a
timer. Queued changesets are applied as soon as they arrive (the agent's apply loop, without
its thread, but with the same two calls: ``apply_batch``, then ``install_apply``).

:func:`agent_world` builds a world of agents (each node: this core, then a swim core whose
metadata comes from it) with the SWIM checkers, :class:`~simulations.crdt_checks.
CrdtConvergence` (equal databases after heal and quiet) and :class:`~simulations.agent_checks.
AgentBookkeeping` (no partial or missing version, equal heads, bookkeeping tables in step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from corrosion.core.replication import (
    ReplicationConfig,
    Replicator,
    SendFrame,
    SetTimer,
    StartSync,
    encode_meta,
)
from corrosion.core.statements import Statement
from corrosion.core.store import Store
from swim import Config, MemberUp

from .agent_checks import AgentBookkeeping, BookkeepingAtAnyTime
from .cluster import SEEDS_PER_NODE, warm_start
from .crdt_checks import CrdtConvergence
from .network import Address, LinkModel
from .node import Core, CoreSpec, Port, SimNode
from .swim_checkers import swim_checkers
from .swim_core import SWIM, SwimCore
from .world import World

__all__ = ["AGENT", "DEMO_SCHEMA", "AgentCore", "agent", "agent_world"]

AGENT = "corrosion"

DEMO_SCHEMA = "CREATE TABLE kv (k TEXT PRIMARY KEY NOT NULL, v TEXT, n INTEGER DEFAULT 0);"


class AgentCore(Core):
    """A ``Replicator`` over a real ``Store`` (channel ``"corrosion"``)."""

    name = AGENT

    def __init__(self, port: Port, schema: str, config: ReplicationConfig) -> None:
        super().__init__(port)
        site = port.rng("site").randbytes(16)  # used only when the database is created
        # a disk that lies (simulations.power_cuts): its fault-injecting VFS and sync setting
        vfs = port.disk.values.get("vfs")
        self.store = Store(port.disk.path / "agent.db", site_id=site, vfs=vfs and vfs.name)
        if "synchronous" in port.disk.values:
            self.store.conn.execute(f"PRAGMA synchronous = {port.disk.values['synchronous']}")
        if self.store.schema_state().running.version:
            self.store.follow_schema()  # it runs a cluster schema version: as the agent does
        elif schema:
            self.store.apply_schema(schema)
        self.replicator = Replicator(self.store, config, port.rng(), lambda: int(port.now * 1000))
        self.cluster_id = config.cluster_id
        port.disk.values["agent.meta"] = encode_meta(
            self.store.actor_id, port.addr[1], config.cluster_id
        )
        self._syncs: dict[int, Address] = {}
        self.committed: list[Callable[[Sequence[Any], float], None]] = []
        """Called with the changes of every local commit and applied batch (as the agent's
        ``_changed``: subscriptions, ``simulations.subscription_core``)."""

    @property
    def conn(self):
        return self.store.conn

    def start(self, now: float) -> None:
        self._perform(self.replicator.start(now))
        swim = self.port.node.core_of(SWIM, SwimCore)
        if swim is not None:
            for m in swim.membership.members():
                self.replicator.member_event(MemberUp(m))

    def stop(self) -> None:
        self.store.close()

    # -- membership ---------------------------------------------------------------------------

    def on_event(self, source: str, event: Any, now: float) -> None:
        self.replicator.member_event(event)  # the agent's own translation (members persist
        # only in the agent: the simulated disk keeps the database, not the member list)

    # -- writes -------------------------------------------------------------------------------

    def execute(self, statements: Sequence[Statement], now: float) -> int | None:
        """A local transaction; returns its version (None if it changed nothing)."""
        _results, commit, effects = self.replicator.execute(list(statements), now)
        self._perform(effects)
        if commit is not None and commit.changes:
            self._changed(commit.changes, now)
        return None if commit is None else commit.version

    def propose_schema(self, sql: str, now: float, *, allow_destructive: bool = False) -> int:
        """``corrosion schema apply`` on this node: the cluster schema version it wrote (or
        found at the head); raises what ``Store.propose_schema`` raises."""
        done = self.store.propose_schema(
            sql, self.replicator.hlc.now(), allow_destructive=allow_destructive
        )
        self._perform(self.replicator.install_commit(done.commit, now))
        return done.proposal.version.version

    # -- inputs -------------------------------------------------------------------------------

    def on_datagram(self, src: Address, data: bytes, now: float) -> None:
        self._perform(self.replicator.handle_frame(src, data, now))
        self._apply(now)

    def on_timer(self, timer: Any, now: float) -> None:
        self._perform(self.replicator.handle_timer(timer, now))

    def on_stream_request(self, src: Address, data: bytes, now: float) -> list[bytes] | None:
        return list(self.replicator.serve_sync(data))

    def on_stream_reply(self, stream_id: int, frames: list[bytes], now: float) -> None:
        addr = self._syncs.pop(stream_id, None)
        if addr is None:
            return
        rep = self.replicator
        for frame in frames:
            if not rep.handle_sync_frame(addr, frame, now):
                break
        rep.sync_finished(addr)
        self._apply(now)

    def on_stream_failed(self, stream_id: int, now: float) -> None:
        addr = self._syncs.pop(stream_id, None)
        if addr is not None:
            self.replicator.sync_finished(addr)

    # -- effects ------------------------------------------------------------------------------

    def _apply(self, now: float) -> None:
        rep = self.replicator
        while rep.queue:  # the agent's two halves (apply_batch, install_apply), inline
            result = rep.apply_pending(500, now)
            if result is not None and result.changes:
                self._changed(result.changes, now)

    def _changed(self, changes: Sequence[Any], now: float) -> None:
        for listener in self.committed:
            listener(changes, now)

    def _perform(self, effects: list) -> None:
        port = self.port
        for e in effects:
            t = type(e)
            if t is SendFrame:
                port.send(e.addr, e.data)
            elif t is StartSync:
                self._syncs[port.open_stream(e.addr, e.request)] = e.addr
            elif t is SetTimer:
                port.set_timer(e.at, e.timer)
            else:
                raise TypeError(f"unknown replication effect {e!r}")


def agent(schema: str = DEMO_SCHEMA, config: ReplicationConfig | None = None) -> CoreSpec:
    """A spec hosting :class:`AgentCore` (needs ``World(files=True)``)."""
    config = config or ReplicationConfig()

    def build(port: Port) -> AgentCore:
        return AgentCore(port, schema, config)

    return build


def _swim_with_agent_meta(config: Config, seeds: Sequence[Address]) -> CoreSpec:
    def build(port: Port) -> SwimCore:
        return SwimCore(port, config, seeds, port.disk.values["agent.meta"])

    return build


def agent_world(
    seed: int,
    n: int,
    *,
    swim_config: Config | None = None,
    replication: ReplicationConfig | None = None,
    schema: str = DEMO_SCHEMA,
    link: LinkModel | None = None,
    stagger: float = 0.05,
    deadline: float = 180.0,
    extra: Sequence[CoreSpec] = (),
    files_dir: str | None = None,
    checkers: bool = True,
    bootstrap: str = "join",
    bookkeeping_at_any_time: bool = True,
) -> World:
    """``n`` agents joining through the first three, every SWIM checker, and as liveness
    checkers CRDT convergence (equal databases after heal) and the agent's bookkeeping (no
    partial or missing version anywhere, ``agent_checks``), which must also agree with the
    tables after every event (``BookkeepingAtAnyTime``). ``extra``: more cores on
    every node, after the agent and swim (an orchestrator worker, ``simulations.orch_world``);
    ``files_dir``: where the world's temporary directory goes (see ``World``); ``checkers``:
    False for none (benchmarks); ``bootstrap="warm"``: every node boots at 0 and is told every
    other as ALIVE (``cluster.warm_start``), the steady state without the join storm;
    ``bookkeeping_at_any_time``: False checks the bookkeeping only at the end (long sweeps of
    seeds: the check after every event doubles a run's wall time)."""
    if bootstrap not in ("join", "warm"):
        raise ValueError(f"bootstrap must be 'join' or 'warm', got {bootstrap!r}")
    swim_config = swim_config or Config.lan()
    world = World(seed, link=link, files=True, files_dir=files_dir)
    if checkers:
        for c in swim_checkers():
            world.add_checker(c)
        world.add_checker(
            CrdtConvergence(
                lambda node: a.conn if (a := agent_of(node)) else None, deadline=deadline
            )
        )
        store_of = lambda node: a.store if (a := agent_of(node)) else None  # noqa: E731
        world.add_checker(AgentBookkeeping(store_of, deadline))
        if bookkeeping_at_any_time:
            world.add_checker(BookkeepingAtAnyTime(store_of))
    for i in range(n):
        seeds = [world.address(j) for j in range(SEEDS_PER_NODE + 1) if j != i][:SEEDS_PER_NODE]
        if bootstrap == "warm":
            seeds = []  # no join: warm_start tells every node the whole view
        node = world.add_node(
            [agent(schema, replication), _swim_with_agent_meta(swim_config, seeds), *extra],
            start=False,
        )
        if bootstrap == "join":
            world.at(i * stagger, world.start, node)
    if bootstrap == "warm":
        for node in world.nodes:
            world.start(node)
        warm_start(world, world.nodes)
    return world


def agent_of(node: SimNode) -> AgentCore | None:
    return node.core_of(AGENT, AgentCore) if node.up else None
