"""Exhaustive, bounded exploration of the real replication core: a model checker in the spirit
of TLC and stateright, whose "model" is the code the agent runs.

Each node is a :class:`~corrosion.core.replication.Replicator` over a real
:class:`~corrosion.core.store.Store` (in-memory SQLite; a crash restarts it from a file holding
its committed database), hosted the way ``simulations.agent_core`` hosts it. The explorer is the
network and the scheduler: from every state it tries every enabled action -

* ``("write", n)``        node ``n`` commits its next write of the workload (acknowledged);
* ``("apply", n)``        node ``n`` applies its whole apply queue in one transaction (with
                          ``apply_inline=False``; by default arrivals apply at once, as in
                          the simulator);
* ``("sync", n)``         node ``n``'s sync timer fires (it asks every idle peer);
* ``("digest", n)``       node ``n``'s digest timer fires;
* ``("crash", n)``        node ``n`` crashes and restarts from its durable database;
* ``("deliver", m)``      the in-flight message labelled ``m`` arrives (any order: reordering);
* ``("drop", m)``         it is lost (a sync request or answer: the stream fails);
* ``("dup", m)``          a broadcast frame is duplicated;
* ``("cut", m, k)``       a sync answer's stream breaks after its first ``k`` frames;

breadth-first, dropping every state whose digest was seen before, so the first violation found
comes with a shortest trace. Faults are budgeted (losses, duplicates, crashes, timer firings), so
every path is finite and the search ends. The state digest covers each node's database rows
(every table, bookkeeping included), its in-memory replication state (queue, bookkeeping mirror,
syncs in flight, digests, pending broadcasts, clock) and the in-flight message multiset.

Invariants, checked in every state reached:

* ``acknowledged-kept``  a version its origin acknowledged stays booked there (crash included);
* ``bookkeeping``  the bookkeeping mirror equals the tables, the gaps table equals the gaps
  derived from them, no version is both held and partial, no partial is complete, and buffered
  changes belong to partial versions' recorded seqs;
* ``heads-grow``  on every transition, no node's head of any actor decreases and no held version
  is forgotten;
* ``applied-when-complete``  a version held with data has every change its origin committed in
  the database (or superseded by another write of the same cell); no change of a partial
  version is in the database;
* ``converges`` (liveness, in every end state: all writes made, nothing in flight, queues
  empty; or in every state with ``liveness="all"``) after the faults stop - every message
  delivered, then sync between every pair of nodes until nothing changes - every node holds every
  acknowledged version, has no gaps and no partials, and all databases are equal.

The workload's chunked transaction writes one row of 6000 characters per chunk: the chunk limit
is corrosion's ``MAX_CHUNK_BYTES`` (8 KiB, a module constant the broadcast and sync paths use as
the default of ``chunk_version``), so no setting is patched to make chunks.

A state is reached again by restoring copies of the nodes that differ from those loaded: the
serialized SQLite database (``Connection.deserialize``) and the pickled core. ``mode="replay"``
instead re-runs the action prefix from the initial state for every state (a stateless search
with only a visited set); it reaches the same states, several times slower
(``bench/explore_bench.py`` measures both). A crash-restart from a given node state is run once
and then restored from its result.

A violation carries the action list that reaches it, printed as a Python literal that
:func:`replay` turns back into the failing run (a regression test is that literal and one call).

Abstractions, so that each action is a function of the state and traces replay exactly: every
node's wall clock is frozen (the hybrid logical clock still counts, and is part of the state),
timers fire only when the explorer says so (``now`` is constant, with ``digest_grace = 0``), the
broadcast retransmission timer fires at once, and each node's RNG is reseeded before every
action (with ``fanout`` >= the number of peers the RNG only orders effects).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import random
import tempfile
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

import crdt
from corrosion.core.bookie import Bookie, Partial
from corrosion.core.changeset import (
    K_CHANGESET,
    K_DIGEST,
    K_EMPTY,
    FrameError,
    decode_frame,
)
from corrosion.core.ranges import RangeSet
from corrosion.core.replication import (
    BroadcastTick,
    ReplicationConfig,
    Replicator,
    SendFrame,
    SetTimer,
    StartSync,
)
from corrosion.core.statements import Statement
from corrosion.core.store import Store

from .agent_core import DEMO_SCHEMA
from .crdt_checks import database_digest
from .errors import SimulationError

__all__ = [
    "Action",
    "ExploreConfig",
    "ExploreResult",
    "ExploreViolation",
    "Model",
    "NotEnabled",
    "Write",
    "default_writes",
    "explore",
    "replay",
]

Action = tuple[Any, ...]
"""``(kind, node)`` or ``(kind, message label[, k])``: plain values, so a trace is a literal."""

BIG_VALUE = 6000  # one row of this many characters fills most of a chunk (MAX_CHUNK_BYTES 8 KiB)
WALL_MS = 1_700_000_000_000  # every node's frozen wall clock


@dataclass(frozen=True)
class Write:
    """One transaction of the workload."""

    label: str
    statements: tuple[Statement, ...]


def _upsert(key: str, value: str) -> Statement:
    return (
        "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        (key, value),
    )


def default_writes(nodes: int, per_node: int = 1, chunks: int = 2) -> tuple[tuple[Write, ...], ...]:
    """Node 0 first writes a transaction of ``chunks`` chunks (one big row per chunk), then the
    shared key ``x``; every other node writes ``x`` (a conflict with node 0's) then keys of its
    own. ``per_node`` writes each."""
    out = []
    for n in range(nodes):
        writes = []
        if n == 0:
            rows = tuple(_upsert(f"big{c}", chr(97 + c) * BIG_VALUE) for c in range(chunks))
            writes.append(Write(f"n0:big*{chunks}", rows))
        writes.append(Write(f"n{n}:x", (_upsert("x", f"from-{n}"),)))
        writes += [Write(f"n{n}:k{i}", (_upsert(f"k{n}.{i}", f"v{n}.{i}"),)) for i in range(9)]
        out.append(tuple(writes[:per_node]))
    return tuple(out)


@dataclass(frozen=True)
class ExploreConfig:
    """The bounded model: nodes, workload and fault budgets."""

    nodes: int = 2
    writes: tuple[tuple[Write, ...], ...] | None = None  # default_writes(nodes)
    losses: int = 1  # messages dropped or sync streams cut, in all
    duplicates: int = 0  # broadcast frames duplicated, in all
    crashes: int = 1  # crash-restarts, in all
    syncs: int = 1  # sync timer firings, in all
    digests: int = 0  # digest timer firings, in all
    broadcast: bool = True  # False: sync only (no broadcasts, relays or digests)
    apply_inline: bool = True  # False: the apply loop is a step of its own (a crash loses
    # what is queued); True: apply right after each arrival, as the simulator does
    liveness: str = "end"  # "end": check convergence in end states; "all": in every state
    mode: str = "snapshot"  # "snapshot": restore states from copies; "replay": re-run prefixes
    max_depth: int | None = None
    max_states: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 4:
            raise ValueError("nodes must be 1..4 (fanout covers every peer in one round)")
        if self.liveness not in ("end", "all"):
            raise ValueError("liveness must be 'end' or 'all'")
        if self.mode not in ("snapshot", "replay"):
            raise ValueError("mode must be 'snapshot' or 'replay'")
        if self.writes is not None and len(self.writes) != self.nodes:
            raise ValueError("writes must list one tuple of writes per node")

    @property
    def workload(self) -> tuple[tuple[Write, ...], ...]:
        return self.writes if self.writes is not None else default_writes(self.nodes)

    def replication(self) -> ReplicationConfig:
        """The core's configuration under the model's frozen clock: timers fire when the
        explorer says, so a digest-announced head is repaired at the next digest tick."""
        return ReplicationConfig(
            broadcast=self.broadcast,
            fanout=3,
            sync_peers=3,
            max_syncs_in_flight=3,
            digest_grace=0.0,
            digest_window=1e9,
        )


class NotEnabled(SimulationError, ValueError):
    """An action that is not enabled in the current state (a trace that does not fit)."""


class ExploreViolation(SimulationError, AssertionError):
    """An invariant failed; ``trace`` reaches the state where it did."""

    def __init__(self, invariant: str, message: str, trace: Sequence[Action]) -> None:
        self.invariant = invariant
        self.message = message
        self.trace = list(trace)
        super().__init__(self.report())

    def report(self) -> str:
        lines = [f"violated: {self.message}", f"shortest trace ({len(self.trace)} steps):"]
        lines.append(format_trace(self.trace))
        return "\n".join(lines)


def format_trace(trace: Sequence[Action]) -> str:
    """The trace as a Python list literal, one action a line (paste it into ``replay``)."""
    if not trace:
        return "trace = []"
    return "trace = [\n" + "".join(f"    {a!r},\n" for a in trace) + "]"


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Msg:
    """One message in flight; ``label`` (unique per content) names it in traces."""

    kind: str  # "frame" (a datagram), "sync-req" or "sync-reply" (one sync stream)
    src: int
    dst: int
    data: tuple[bytes, ...]  # one frame, or a sync answer's frames
    label: str


def _h(*parts: bytes, size: int = 16) -> bytes:
    h = hashlib.blake2b(digest_size=size)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.digest()


# -- per-node snapshots --------------------------------------------------------------------------

# Replicator fields the host owns (the store, the shared config, the injected RNG and clock)
_HOST_FIELDS = frozenset({"store", "config", "rng", "clock_ms", "hlc"})
# fields that change no decision of the core: left out of the state digest
_UNOBSERVED = frozenset({"stats", "_backoff"})


_SCALARS = (int, float, bool, type(None))


def _canon(v: Any) -> Any:
    """A canonical, comparable form of in-memory state: dicts keep their order (it is observable:
    the order of a sync request's actors), sets are sorted."""
    t = type(v)
    if t in _SCALARS:
        return v
    if t is bytes or t is str:
        return v if len(v) <= 64 else ("h", _h(v.encode() if t is str else v))
    if t is dict:
        return ("d", tuple((_canon(k), _canon(x)) for k, x in v.items()))
    if t is list or isinstance(v, tuple) or t is crdt.CompactChanges:
        # a changeset's changes as they travel compare as the changes they are
        return tuple(_canon(x) for x in v)
    if t is set or t is frozenset:
        return ("s", tuple(sorted((_canon(x) for x in v), key=repr)))
    if t is RangeSet:
        return ("r", tuple(v.ranges()))
    if dataclasses.is_dataclass(v):
        return (t.__name__, *(_canon(getattr(v, f.name)) for f in dataclasses.fields(v)))
    raise TypeError(f"no canonical form for {t.__name__}: add one to the explorer")


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the transition invariants compare: per actor, the head and the versions held."""

    heads: tuple[tuple[bytes, int, tuple[tuple[int, int], ...]], ...]

    def held(self) -> dict[bytes, tuple[int, RangeSet]]:
        return {a: (h, RangeSet(r)) for a, h, r in self.heads}


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node's full state: committed database, in-memory core and host state."""

    db: bytes  # the digest of its tables (the key of the serialized database in ``Model._dbs``)
    mem: bytes  # pickle of the replicator's fields, the bookie, the clock and the host state
    digest: bytes
    acked_digest: bytes
    view: NodeView


@dataclass(frozen=True, slots=True)
class State:
    nodes: tuple[NodeState, ...]
    net: tuple[Msg, ...]  # sorted by label: a multiset
    budget: tuple[int, ...]  # losses, duplicates, crashes, sync ticks, digest ticks left
    digest: bytes
    problems: tuple[str, ...]  # the node-local safety invariants that fail in this state


Cell = tuple[str, bytes, str, int, int, int]


class _Node:
    """The host of one core (as ``simulations.agent_core.AgentCore`` hosts it)."""

    def __init__(self, index: int, store: Store, rep: Replicator) -> None:
        self.index = index
        self.store = store
        self.rep = rep
        self.timers: dict[str, Any] = {}
        self.writes_done = 0
        # the versions this node acknowledged, with the cells each wrote: (table, pk, cid,
        # col_version, cl, seq) - what the invariants compare other nodes' databases against
        self.acked: tuple[tuple[int, tuple[Cell, ...]], ...] = ()


def _site(i: int) -> bytes:
    return bytes([i + 1]) * 16


def _addr(i: int) -> tuple[str, int]:
    return (f"n{i}", 7000 + i)


def _wal_off(data: bytes) -> bytes:
    """A serialized database as a rollback-journal file: in-memory databases cannot be WAL."""
    if len(data) > 19 and data[18] == 2:
        b = bytearray(data)
        b[18] = b[19] = 1
        return bytes(b)
    return data


# -- the model -----------------------------------------------------------------------------------


class Model:
    """N hosted cores, the network between them, and the fault budgets; ``step`` runs an action,
    ``snapshot``/``restore`` move between states."""

    def __init__(self, config: ExploreConfig, workdir: str | Path) -> None:
        self.config = config
        self.rconfig = config.replication()
        self.workload = config.workload
        self.workdir = Path(workdir)
        self.sites = [_site(i) for i in range(config.nodes)]
        self.actor_index = {s: i for i, s in enumerate(self.sites)}
        self.by_addr = {_addr(i): i for i in range(config.nodes)}
        self.nodes: list[_Node] = []
        for i in range(config.nodes):
            # small pages: states are copied whole, so a smaller database is a faster model
            path = self.workdir / f"node{i}.db"
            blank = apsw.Connection(str(path))
            blank.execute("PRAGMA page_size = 512; VACUUM")
            blank.close()
            store = Store(path, site_id=self.sites[i])
            store.apply_schema(DEMO_SCHEMA)
            self.nodes.append(self._boot(i, store))
        self._dump_sql = _dump_queries(self.nodes[0].store.conn)
        self._unpacked: OrderedDict[bytes, bytes] = OrderedDict()
        self.net: list[Msg] = []
        n = config.nodes
        digests = config.digests if config.broadcast else 0
        self.budget = [config.losses, config.duplicates, config.crashes, config.syncs, digests]
        self._loaded: list[NodeState | None] = [None] * n
        self._interned: dict[bytes, NodeState] = {}
        self._dbs: dict[bytes, bytes] = {}  # database digest -> zlib of the serialized database
        # per slot: the digest of the database it holds and the connection's total_changes then
        self._slot_db: list[tuple[bytes, int] | None] = [None] * n
        self._check_cache: dict[tuple[bytes, bytes], tuple[str, ...]] = {}
        self._restarted: dict[bytes, NodeState] = {}
        self.restarts = 0

    # -- hosting ---------------------------------------------------------------------------------

    def _boot(self, i: int, store: Store) -> _Node:
        rep = Replicator(store, self.rconfig, random.Random(0), lambda: WALL_MS)
        node = _Node(i, store, rep)
        self._perform(node, rep.start(0.0))
        for j in range(self.config.nodes):
            rep.member_up(self.sites[j], _addr(j))  # ignores itself
        return node

    def _send(self, kind: str, src: int, dst: int, data: tuple[bytes, ...]) -> None:
        h = _h(*data, size=4).hex()
        if kind == "frame":
            desc = self._describe(data[0])
        elif kind == "sync-req":
            desc = ""
        else:
            desc = f"{len(data)} frames "
        self.net.append(Msg(kind, src, dst, data, f"{kind} {src}>{dst} {desc}#{h}"))

    def _name(self, actor: Any) -> str:
        i = self.actor_index.get(actor) if isinstance(actor, bytes) else None
        return f"n{i}" if i is not None else repr(actor)

    def _describe(self, frame: bytes) -> str:
        try:
            kind, item = decode_frame(frame)
        except FrameError:
            return "garbage "
        if kind == K_CHANGESET:
            s, e = item.seqs
            return f"{self._name(item.actor)}.v{item.version}[{s}-{e}/{item.last_seq}] "
        if kind == K_EMPTY:
            ranges = ",".join(f"{s}-{e}" for s, e in item.versions)
            return f"empty {self._name(item.actor)}.v{ranges} "
        if kind == K_DIGEST:
            heads = ",".join(f"{self._name(a)}:{h}" for a, h in item[1])
            return f"digest {heads} "
        return f"kind{kind} "

    def _perform(self, node: _Node, effects: list) -> None:
        ticks: deque[SetTimer] = deque()
        for e in effects:
            t = type(e)
            if t is SendFrame:
                self._send("frame", node.index, self.by_addr[e.addr], (e.data,))
            elif t is StartSync:
                self._send("sync-req", node.index, self.by_addr[e.addr], (e.request,))
            elif t is SetTimer:
                if isinstance(e.timer, BroadcastTick):
                    ticks.append(e)
                else:
                    node.timers[type(e.timer).__name__] = e.timer
            else:
                raise TypeError(f"unknown replication effect {e!r}")
        # retransmission rounds fire at once (with fanout >= peers they find nobody new)
        for _ in range(1000):
            if not ticks:
                return
            tick = ticks.popleft()
            for e in node.rep.handle_timer(tick.timer, tick.at):
                if type(e) is SetTimer and isinstance(e.timer, BroadcastTick):
                    ticks.append(e)
                else:
                    self._perform(node, [e])
        raise RuntimeError("broadcast retransmissions never ended")

    def _apply(self, node: _Node) -> None:
        while node.rep.queue:
            node.rep.apply_pending(None, 0.0)

    def _crash(self, i: int, before: NodeState | None) -> None:
        """Kill node ``i`` and restart it from its committed database (a file), as the agent
        starts: a new Store (migration, bookkeeping loaded from the tables) and Replicator.
        A restart is a function of the state it starts from: each one runs once, and is
        restored from its result when the same state crashes again."""
        restarted = self._restarted.get(before.digest) if before is not None else None
        if restarted is not None:
            self._load(i, restarted)
            self._loaded[i] = restarted
        else:
            old = self.nodes[i]
            data = _wal_off(old.store.conn.serialize("main"))
            old.store.close()
            self._slot_db[i] = None
            self.restarts += 1
            path = self.workdir / f"node{i}.db"
            for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                stale.unlink(missing_ok=True)
            path.write_bytes(data)
            node = self._boot(i, Store(path, site_id=self.sites[i]))
            node.writes_done, node.acked = old.writes_done, old.acked
            self.nodes[i] = node
            if before is not None:
                self._restarted[before.digest] = self._loaded[i] = self._capture(node)
        # its sync streams die with it: as a client it forgets them, as a server its peers see
        # their stream fail
        keep = []
        for m in self.net:
            client, server = (m.src, m.dst) if m.kind == "sync-req" else (m.dst, m.src)
            if m.kind == "frame" or i not in (client, server):
                keep.append(m)
            elif server == i:
                self.nodes[client].rep.sync_finished(_addr(i))
                self._loaded[client] = None
        self.net = keep

    def _serve(self, m: Msg) -> None:
        server = self.nodes[m.dst]
        frames = tuple(server.rep.serve_sync(m.data[0]))
        self._send("sync-reply", m.dst, m.src, frames)

    def _receive_answer(self, m: Msg, upto: int) -> None:
        client = self.nodes[m.dst]
        rep, addr = client.rep, _addr(m.src)
        for frame in m.data[:upto]:
            if not rep.handle_sync_frame(addr, frame, 0.0):
                break
        rep.sync_finished(addr)

    # -- actions -----------------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        """Every action enabled in the current state, in a fixed order."""
        out: list[Action] = []
        losses, dups, crashes = self.budget[:3]
        for i, node in enumerate(self.nodes):
            if node.writes_done < len(self.workload[i]):
                out.append(("write", i))
            if node.rep.queue and not self.config.apply_inline:
                out.append(("apply", i))
            if self.budget[3] > 0:
                out.append(("sync", i))
            if self.budget[4] > 0:
                out.append(("digest", i))
            if crashes > 0:
                out.append(("crash", i))
        seen: set[str] = set()
        for m in sorted(self.net, key=lambda m: m.label):
            if m.label in seen:
                continue
            seen.add(m.label)
            out.append(("deliver", m.label))
            if losses > 0:
                out.append(("drop", m.label))
                if m.kind == "sync-reply":
                    out.extend(("cut", m.label, k) for k in range(1, len(m.data)))
            if dups > 0 and m.kind == "frame":
                out.append(("dup", m.label))
        return out

    def _take(self, label: str) -> Msg:
        """The message in flight with this label; a label without its ``#hash`` (or with a
        stale one) names the only message in flight that otherwise matches, if there is one."""
        for k, m in enumerate(self.net):
            if m.label == label:
                return self.net.pop(k)
        stem = label.split(" #")[0]
        matches = {m.label for m in self.net if m.label.split(" #")[0] == stem}
        if len(matches) == 1:
            return self._take(matches.pop())
        raise NotEnabled(f"no message {label!r} in flight")

    def step(self, action: Action) -> None:
        """Run one action (:class:`NotEnabled` if it is not enabled in this state)."""
        kind = action[0]
        n = self.config.nodes
        if kind in ("write", "apply", "sync", "digest", "crash"):
            i = action[1]
            if not (type(i) is int and 0 <= i < n):
                raise NotEnabled(f"no node {i!r}")
            node = self.nodes[i]
            node.rep.rng.seed(0)
            before, self._loaded[i] = self._loaded[i], None
            if kind == "write":
                if node.writes_done >= len(self.workload[i]):
                    raise NotEnabled(f"node {i} has no write left")
                write = self.workload[i][node.writes_done]
                node.writes_done += 1
                _results, commit, effects = node.rep.execute(list(write.statements), 0.0)
                if commit is not None:
                    cells = tuple(
                        (c.table, c.pk, c.cid, c.col_version, c.cl, c.seq) for c in commit.changes
                    )
                    node.acked += ((commit.version, cells),)
                self._perform(node, effects)
            elif kind == "apply":
                if not node.rep.queue:
                    raise NotEnabled(f"node {i} has nothing to apply")
                self._apply(node)
            elif kind == "sync" or kind == "digest":
                slot = 3 if kind == "sync" else 4
                if self.budget[slot] <= 0:
                    raise NotEnabled(f"node {i} has no {kind} tick left")
                self.budget[slot] -= 1
                timer = node.timers["SyncTick" if kind == "sync" else "DigestTick"]
                self._perform(node, node.rep.handle_timer(timer, 0.0))
            else:
                if self.budget[2] <= 0:
                    raise NotEnabled("no crash left")
                self.budget[2] -= 1
                self._crash(i, before)
            return
        if kind not in ("deliver", "drop", "dup", "cut"):
            raise NotEnabled(f"unknown action {action!r}")
        m = self._take(action[1])
        if kind == "dup":
            if self.budget[1] <= 0 or m.kind != "frame":
                raise NotEnabled(f"cannot duplicate {m.label!r}")
            self.budget[1] -= 1
            self.net += [m, m]
            return
        if kind in ("drop", "cut"):
            if self.budget[0] <= 0:
                raise NotEnabled("no loss left")
            self.budget[0] -= 1
            if m.kind == "frame":
                return
            client = m.src if m.kind == "sync-req" else m.dst
            self.nodes[client].rep.rng.seed(0)
            self._loaded[client] = None
            if kind == "cut":
                if m.kind != "sync-reply" or not 0 < action[2] < len(m.data):
                    raise NotEnabled(f"cannot cut {m.label!r} at {action[2:]!r}")
                self._receive_answer(m, action[2])
                if self.config.apply_inline:
                    self._apply(self.nodes[client])
            else:
                self.nodes[client].rep.sync_finished(
                    _addr(m.dst if m.kind == "sync-req" else m.src)
                )
            return
        self._deliver(m)

    def _deliver(self, m: Msg) -> None:
        dst = self.nodes[m.dst]
        dst.rep.rng.seed(0)
        self._loaded[m.dst] = None
        if m.kind == "frame":
            self._perform(dst, dst.rep.handle_frame(_addr(m.src), m.data[0], 0.0))
        elif m.kind == "sync-req":
            self._serve(m)
            return
        else:
            self._receive_answer(m, len(m.data))
        if self.config.apply_inline:
            self._apply(dst)

    # -- states ------------------------------------------------------------------------------------

    def snapshot(self) -> State:
        nodes = []
        for i, node in enumerate(self.nodes):
            ns = self._loaded[i]
            if ns is None:
                ns = self._loaded[i] = self._capture(node)
            nodes.append(ns)
        net = tuple(sorted(self.net, key=lambda m: m.label))
        h = hashlib.blake2b(digest_size=16)
        for ns in nodes:
            h.update(ns.digest)
        for m in net:
            h.update(_h(m.kind.encode(), bytes([m.src, m.dst]), *m.data))
        h.update(repr(self.budget).encode())
        # node-local invariants, once per (node state, acknowledged versions anywhere)
        acked = _h(*(ns.acked_digest for ns in nodes))
        problems: list[str] = []
        for node, ns in zip(self.nodes, nodes, strict=True):
            key = (ns.digest, acked)
            found = self._check_cache.get(key)
            if found is None:
                found = self._check_cache[key] = tuple(node_problems(self, node))
            problems += found
        return State(tuple(nodes), net, tuple(self.budget), h.digest(), tuple(problems))

    def restore(self, state: State) -> None:
        for i, ns in enumerate(state.nodes):
            if self._loaded[i] is not ns:
                self._load(i, ns)
                self._loaded[i] = ns
        self.net = list(state.net)
        self.budget = list(state.budget)

    def _capture(self, node: _Node) -> NodeState:
        store, rep, i = node.store, node.rep, node.index
        conn = store.conn
        # the database's digest: recomputed only when the connection changed rows since the
        # slot last held a known database (total_changes counts every row written, triggers,
        # rollbacks and all)
        slot = self._slot_db[i]
        if slot is not None and slot[1] == conn.total_changes():
            db = slot[0]
        else:
            dump = hashlib.blake2b(digest_size=16)
            for t, sql in self._dump_sql:
                dump.update(t)
                for row in conn.execute(sql):
                    dump.update(repr(row).encode())
            db = dump.digest()
            if db not in self._dbs:
                self._dbs[db] = zlib.compress(_wal_off(conn.serialize("main")), 1)
            self._slot_db[i] = (db, conn.total_changes())
        fields = {k: v for k, v in vars(rep).items() if k not in _HOST_FIELDS}
        h = hashlib.blake2b(db, digest_size=16)
        observed = {k: v for k, v in fields.items() if k not in _UNOBSERVED}
        h.update(repr(_canon(observed)).encode())
        h.update(repr(_canon(store.bookie.actors)).encode())
        h.update(repr((_canon(node.timers), node.writes_done, node.acked, rep.hlc.last)).encode())
        digest = h.digest()
        known = self._interned.get(digest)
        if known is not None:
            return known
        host = (node.timers, node.writes_done, node.acked, rep.hlc.last)
        mem = pickle.dumps((fields, store.bookie, host), protocol=pickle.HIGHEST_PROTOCOL)
        heads = tuple(
            (a, b.max(), tuple(b.held.ranges())) for a, b in sorted(store.bookie.actors.items())
        )
        ns = NodeState(db, mem, digest, _h(pickle.dumps(node.acked)), NodeView(heads))
        self._interned[digest] = ns
        return ns

    def _load(self, i: int, ns: NodeState) -> None:
        store = self.nodes[i].store
        conn = store.conn
        if self._slot_db[i] != (ns.db, conn.total_changes()):  # else it holds that database
            data = self._unpacked.get(ns.db)
            if data is None:
                data = self._unpacked[ns.db] = zlib.decompress(self._dbs[ns.db])
                if len(self._unpacked) > 64:
                    self._unpacked.popitem(last=False)
            conn.deserialize("main", data)
            conn.crr.invalidate_db_version()
            self._slot_db[i] = (ns.db, conn.total_changes())
        fields, bookie, host = pickle.loads(ns.mem)
        store.bookie = bookie
        rep = Replicator(store, self.rconfig, random.Random(0), lambda: WALL_MS)
        vars(rep).update(fields)
        node = _Node(i, store, rep)
        node.timers, node.writes_done, node.acked, last = host
        rep.hlc.observe(last)
        self.nodes[i] = node

    def invalidate(self) -> None:
        """Forget which states the node slots hold (after changing them outside ``step``)."""
        self._loaded = [None] * self.config.nodes
        self._slot_db = [None] * self.config.nodes

    def close(self) -> None:
        for node in self.nodes:
            node.store.close()

    # -- liveness ----------------------------------------------------------------------------------

    def is_end(self) -> bool:
        """All writes made, nothing in flight, every queue applied."""
        return (
            not self.net
            and all(not n.rep.queue for n in self.nodes)
            and all(n.writes_done >= len(w) for n, w in zip(self.nodes, self.workload, strict=True))
        )

    def heal(self) -> list[str]:
        """Stop the faults: deliver everything in flight (and what that sends), then sync every
        ordered pair until a whole round changes nothing. Returns the convergence problems."""
        self.invalidate()
        for _ in range(10_000):
            if not self.net:
                break
            self.net.sort(key=lambda m: m.label)
            m = self.net.pop(0)
            self._deliver(m)
            self._apply(self.nodes[m.dst])
        else:
            return ["messages kept coming after the faults stopped"]
        for node in self.nodes:
            self._apply(node)
        n = self.config.nodes
        for _ in range(2 * n + 2):
            before = [database_digest(x.store.conn) + repr(_book(x)) for x in self.nodes]
            for a in range(n):
                for b in range(n):
                    if a == b:
                        continue
                    client, server = self.nodes[a], self.nodes[b]
                    frames = list(server.rep.serve_sync(client.rep.sync_request()))
                    for frame in frames:
                        if not client.rep.handle_sync_frame(_addr(b), frame, 0.0):
                            break
                    client.rep.sync_finished(_addr(b))
                    self._apply(client)
            after = [database_digest(x.store.conn) + repr(_book(x)) for x in self.nodes]
            if after == before:
                break
        else:
            return ["sync never went quiet"]
        return convergence_problems(self)


def _book(node: _Node) -> Any:
    return _canon(node.store.bookie.actors)


def _dump_queries(conn: Any) -> list[tuple[bytes, str]]:
    """A query per table returning its rows in a total order (every node has the same tables)."""
    out = []
    for (t,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    ).fetchall():
        width = len(conn.execute(f'PRAGMA table_info("{t}")').fetchall())
        order = ", ".join(str(k) for k in range(1, width + 1))
        out.append((t.encode(), f'SELECT * FROM "{t}" ORDER BY {order}'))
    return out


# -- invariants ----------------------------------------------------------------------------------


def _acked_changes(model: Model) -> dict[tuple[bytes, int], tuple[Cell, ...]]:
    return {
        (model.sites[node.index], v): changes for node in model.nodes for v, changes in node.acked
    }


def node_problems(model: Model, node: _Node) -> Iterator[str]:
    """The node-local safety invariants (acknowledged-kept, bookkeeping, applied-when-complete)."""
    store, name = node.store, f"node {node.index}"
    conn, me = store.conn, store.actor_id
    bookie = store.bookie
    # acknowledged-kept
    mine = bookie.actors.get(me)
    rows = {
        v
        for (v,) in conn.execute(
            "SELECT start_version FROM __corro_bookkeeping WHERE actor_id = ?", (me,)
        )
    }
    for v, _changes in node.acked:
        if mine is None or v not in mine.held or v not in rows:
            yield f"acknowledged-kept: {name} lost its own acknowledged version {v}"
    # bookkeeping: the mirror equals the tables
    loaded = Bookie()
    for actor, start, end in conn.execute(
        "SELECT actor_id, start_version, end_version FROM __corro_bookkeeping"
    ):
        loaded.get(actor).held.add(start, end)
    for actor, version, start, end, last in conn.execute(
        "SELECT site_id, version, start_seq, end_seq, last_seq FROM __corro_seq_bookkeeping"
    ):
        b = loaded.get(actor)
        if version not in b.partials:
            b.partials[version] = Partial(last, 0)
        b.partials[version].seqs.add(start, end)
    actors = sorted(set(bookie.actors) | set(loaded.actors))
    for actor in actors:
        a = model._name(actor)
        mem, disk = bookie.actors.get(actor), loaded.actors.get(actor)
        mem_held = mem.held if mem else RangeSet()
        disk_held = disk.held if disk else RangeSet()
        if mem_held != disk_held:
            yield (
                f"bookkeeping: {name} holds {a} {mem_held.ranges()} in memory, "
                f"{disk_held.ranges()} in its tables"
            )
        mem_p = {v: (p.last_seq, p.seqs.ranges()) for v, p in (mem.partials if mem else {}).items()}
        disk_p = {
            v: (p.last_seq, p.seqs.ranges()) for v, p in (disk.partials if disk else {}).items()
        }
        if mem_p != disk_p:
            yield f"bookkeeping: {name} has partials of {a} {mem_p} in memory, {disk_p} in tables"
        if mem is None:
            continue
        for v, p in mem.partials.items():
            if v in mem.held:
                yield f"bookkeeping: {name} holds {a}.v{v} and also has it partial"
            if p.complete:
                yield f"bookkeeping: {name} has {a}.v{v} complete but not applied"
        gaps = {
            (s, e)
            for s, e in conn.execute(
                'SELECT start, "end" FROM __corro_bookkeeping_gaps WHERE actor_id = ?', (actor,)
            )
        }
        if gaps != set(mem.gaps().ranges()):
            derived = mem.gaps().ranges()
            yield f"bookkeeping: {name} records gaps {sorted(gaps)} of {a}, derives {derived}"
    for actor, version, seq in conn.execute(
        "SELECT actor_id, version, seq FROM __corro_buffered_changes"
    ):
        owner = bookie.actors.get(actor)
        partial = owner.partials.get(version) if owner else None
        if partial is None or seq not in partial.seqs:
            yield (
                f"bookkeeping: {name} buffers seq {seq} of {model._name(actor)}.v{version}, "
                "not a recorded seq of a partial version"
            )
    # applied-when-complete
    current = {(c.table, c.pk, c.cid): c for c in crdt.changes_since(conn, 0)}
    acked = _acked_changes(model)
    cells: dict[tuple[str, bytes, str], list[Cell]] = {}
    for changes in acked.values():
        for c in changes:
            cells.setdefault(c[:3], []).append(c)
    with_data = {
        (actor, v)
        for actor, v in conn.execute(
            "SELECT actor_id, start_version FROM __corro_bookkeeping "
            "WHERE db_version IS NOT NULL AND start_version = end_version"
        )
    }
    for (actor, v), changes in acked.items():
        if (actor, v) not in with_data:
            continue
        for c in changes:
            _table, pk, cid, col_version, cl, seq = c
            here = current.get(c[:3])
            if here is not None and (here.col_version, here.cl) >= (col_version, cl):
                continue
            if any(o is not c and o[3] >= col_version for o in cells[c[:3]]):
                continue  # superseded where it was served from: it may be left out
            yield (
                f"applied-when-complete: {name} holds {model._name(actor)}.v{v} but its change "
                f"{cid} of {pk!r} (seq {seq}) is not in its database"
            )
    for b_actor, b in bookie.actors.items():
        for v in b.partials:
            for row in conn.execute(
                'SELECT "table", pk, cid, col_version, val FROM __corro_buffered_changes '
                "WHERE actor_id = ? AND version = ?",
                (b_actor, v),
            ):
                here = current.get((row[0], row[1], row[2]))
                if (
                    here is not None
                    and here.site_id == b_actor
                    and (here.col_version, here.val) == (row[3], row[4])
                ):
                    yield (
                        f"applied-when-complete: {name} has a change of partial "
                        f"{model._name(b_actor)}.v{v} in its database"
                    )


def transition_problems(model: Model, before: State, after: State) -> Iterator[str]:
    """heads-grow: no head decreases, no held version is forgotten."""
    for i, (b, a) in enumerate(zip(before.nodes, after.nodes, strict=True)):
        if b is a:
            continue
        old, new = b.view.held(), a.view.held()
        for actor, (head, held) in old.items():
            nh, nheld = new.get(actor, (0, RangeSet()))
            if nh < head:
                who = model._name(actor)
                yield f"heads-grow: node {i}'s head of {who} went from {head} to {nh}"
            lost = held.difference(nheld)
            if lost:
                yield f"heads-grow: node {i} forgot {model._name(actor)} versions {lost.ranges()}"


def convergence_problems(model: Model) -> list[str]:
    out: list[str] = []
    acked = _acked_changes(model)
    digests = []
    for node in model.nodes:
        name = f"node {node.index}"
        bookie = node.store.bookie
        if bookie.gap_count():
            gaps = {model._name(a): b.gaps().ranges() for a, b in bookie.actors.items() if b.gaps()}
            out.append(f"converges: {name} still has gaps {gaps}")
        for a, b in bookie.actors.items():
            if b.partials:
                who = model._name(a)
                out.append(
                    f"converges: {name} still has partial {who} versions {sorted(b.partials)}"
                )
        for actor, v in acked:
            if not bookie.holds(actor, v):
                out.append(f"converges: {name} never got {model._name(actor)}.v{v}")
        out.extend(f"converges (after heal) {p}" for p in node_problems(model, node))
        digests.append(database_digest(node.store.conn))
    if len(set(digests)) > 1:
        out.append(f"converges: databases differ after heal ({', '.join(d[:8] for d in digests)})")
    return out


# -- exploration ---------------------------------------------------------------------------------


@dataclass
class ExploreResult:
    states: int = 0  # distinct states reached
    transitions: int = 0  # actions run
    depth: int = 0  # the deepest level explored
    end_states: int = 0  # states whose liveness was checked
    node_states: int = 0  # distinct single-node states
    elapsed: float = 0.0
    complete: bool = False  # every reachable state was explored (no bound cut the search)
    violation: ExploreViolation | None = None
    levels: list[int] = field(default_factory=list)  # new states per depth

    @property
    def states_per_s(self) -> float:
        return self.states / self.elapsed if self.elapsed else 0.0

    def summary(self) -> str:
        verdict = "no violation" if self.violation is None else self.violation.invariant
        bound = "exhaustive" if self.complete else "bounded"
        return (
            f"{self.states} states ({self.node_states} node states), {self.transitions} "
            f"transitions, depth {self.depth}, {self.end_states} liveness checks, "
            f"{self.elapsed:.1f}s ({self.states_per_s:.0f} states/s), {bound}: {verdict}"
        )


def explore(
    config: ExploreConfig | None = None, *, progress: Callable[[ExploreResult], None] | None = None
) -> ExploreResult:
    """Breadth-first search of every interleaving of ``config``; stops at the first violation
    (``result.violation``, with a shortest trace)."""
    config = config or ExploreConfig()
    t0 = time.perf_counter()
    result = ExploreResult()
    with tempfile.TemporaryDirectory(prefix="corrosion-explore-") as tmp:
        model = Model(config, tmp)
        try:
            _search(model, config, result, progress)
        finally:
            model.close()
        result.node_states = len(model._interned)
    result.elapsed = time.perf_counter() - t0
    return result


def _search(
    model: Model,
    config: ExploreConfig,
    result: ExploreResult,
    progress: Callable[[ExploreResult], None] | None,
) -> None:
    init = model.snapshot()
    # digest -> (parent digest, action): the BFS tree, for shortest traces
    parents: dict[bytes, tuple[bytes | None, Action | None]] = {init.digest: (None, None)}
    frontier: deque[tuple[State, int]] = deque([(init, 0)])
    result.states = 1
    result.levels = [1]

    def trace_of(d: bytes) -> list[Action]:
        out: list[Action] = []
        while True:
            parent, action = parents[d]
            if parent is None or action is None:
                return out[::-1]
            out.append(action)
            d = parent

    def fail(digest: bytes, problems: Sequence[str]) -> None:
        invariant = problems[0].split(":", 1)[0]
        result.violation = ExploreViolation(invariant, "; ".join(problems), trace_of(digest))

    def load(state: State, digest: bytes) -> None:
        if config.mode == "snapshot":
            model.restore(state)
            return
        model.restore(init)  # stateless: re-run the path from the initial state
        for action in trace_of(digest):
            model.step(action)

    if init.problems:
        fail(init.digest, init.problems)
        return
    started = last_report = time.perf_counter()
    while frontier:
        state, depth = frontier.popleft()
        if config.max_depth is not None and depth >= config.max_depth:
            continue
        load(state, state.digest)
        actions = model.actions()
        for action in actions:
            load(state, state.digest)
            try:
                model.step(action)
            except Exception as exc:  # noqa: BLE001 — the core raised: a bug, with its trace
                _fail_at(result, [_raised(action, exc)], [*trace_of(state.digest), action])
                return
            result.transitions += 1
            child = model.snapshot()
            problems = list(transition_problems(model, state, child))
            if child.digest in parents:
                if problems:
                    _fail_at(result, problems, trace_of(state.digest) + [action])
                    return
                continue
            parents[child.digest] = (state.digest, action)
            result.states += 1
            if len(result.levels) <= depth + 1:
                result.levels.append(0)
            result.levels[depth + 1] += 1
            result.depth = max(result.depth, depth + 1)
            problems += child.problems
            if problems:
                fail(child.digest, problems)
                return
            if config.liveness == "all" or model.is_end():
                result.end_states += 1
                try:
                    problems = model.heal()
                except Exception as exc:  # noqa: BLE001 — the core raised while healing
                    problems = [_raised(("heal",), exc)]
                if problems:
                    fail(child.digest, problems)
                    return
            frontier.append((child, depth + 1))
            if config.max_states is not None and result.states >= config.max_states:
                return
        if progress is not None and time.perf_counter() - last_report > 5:
            last_report = time.perf_counter()
            result.elapsed = last_report - started
            result.node_states = len(model._interned)
            progress(result)
    result.complete = config.max_depth is None or result.depth < config.max_depth


def _fail_at(result: ExploreResult, problems: Sequence[str], trace: list[Action]) -> None:
    invariant = problems[0].split(":", 1)[0]
    result.violation = ExploreViolation(invariant, "; ".join(problems), trace)


def replay(
    trace: Sequence[Action], config: ExploreConfig | None = None, *, liveness: bool = True
) -> None:
    """Run ``trace`` from the initial state, checking every invariant after each action (and,
    with ``liveness``, convergence after the last); raise :class:`ExploreViolation` at the
    first failure."""
    config = config or ExploreConfig()
    with tempfile.TemporaryDirectory(prefix="corrosion-replay-") as tmp:
        model = Model(config, tmp)
        try:
            state = model.snapshot()
            for k, action in enumerate(trace):
                try:
                    model.step(action)
                except NotEnabled:
                    raise
                except Exception as exc:
                    raise ExploreViolation(
                        "no-exception", _raised(action, exc), trace[: k + 1]
                    ) from exc
                child = model.snapshot()
                problems = list(transition_problems(model, state, child))
                problems += child.problems
                if problems:
                    _raise(problems, trace[: k + 1])
                state = child
            if liveness:
                try:
                    problems = model.heal()
                except Exception as exc:
                    raise ExploreViolation("no-exception", _raised(("heal",), exc), trace) from exc
                if problems:
                    _raise(problems, trace)
        finally:
            model.close()


def _raised(action: Action, exc: Exception) -> str:
    return f"no-exception: {action!r} raised {type(exc).__name__}: {exc}"


def _raise(problems: Sequence[str], trace: Sequence[Action]) -> None:
    raise ExploreViolation(problems[0].split(":", 1)[0], "; ".join(problems), trace)
