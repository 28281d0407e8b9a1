"""Power cuts in a world of agents: nodes crash through the fault-injecting VFS.

:func:`power_cut_run` gives every node of an ``agent_core.agent_world`` a lying disk: its store
is opened through its own :class:`~simulations.faulty_vfs.FaultyVFS` (with the ``synchronous``
setting asked for). While clients write on random nodes (fresh keys, sometimes transactions of
many chunks) over a lossy network, the power of one node at a time is cut, either between
events or after a seeded number of writes into the next operation (a commit, an apply, a sync:
whatever the node does next). From the cut on, the node sends nothing (``SimNode.halted``); at
the end of that event the world crashes it, its files are rewritten as the disk holds them
(what was not synced lost, or torn), and a little later it restarts from them. After every
restart, on that node:

- the store opens and SQLite's ``integrity_check`` passes;
- the bookkeeping agrees with the data: memory with the tables
  (``agent_checks.bookkeeping_problems``), its own versions exactly ``1..head``, the rows of each
  of them there, and no row of a local write it does not book;
- with ``synchronous = FULL`` (the agent's) every write acknowledged to a client (``execute``
  returned before the cut) is there; with ``NORMAL`` the losses are counted.

Then the faults stop, every node is up, and the world's liveness checkers must settle: byte-equal
databases, no partial or missing version, bookkeeping in step (also after every event, as
everywhere in ``agent_world``). Violations carry the seed: ``power_cut_run(seed)`` replays it.

:class:`PowerCuts` is the part any world of agents can reuse (``simulations.orch_power_cuts``
gives it orchestrator workers whose step logs share the node's lying disk): one faulty VFS per
node in ``disk.values["vfs"]``, one cut at a time, the crash after the event, the recovery, the
restart and the checks of the agent's store after it (:meth:`PowerCuts.problems`, which a world
extends with its own).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import apsw

from .agent_checks import bookkeeping_problems
from .agent_core import AgentCore, agent_of, agent_world
from .checkers import run_liveness
from .faulty_vfs import FaultyVFS
from .network import LinkModel
from .node import SimNode
from .scenarios import PRESETS
from .world import World

__all__ = ["CutLog", "PowerCutRun", "PowerCuts", "power_cut_run", "store_problems"]

BASE_LINK = PRESETS["lan"][1]
CHECK = "power-cut"


@dataclass
class CutLog:
    """What the power cuts of a run did (for reports and tests)."""

    seed: int
    synchronous: str  # the agent's store's setting
    cuts: int = 0  # power cuts that took effect
    mid_operation: int = 0  # of those, in the middle of an operation
    torn: int = 0  # files rewritten with a torn write
    injected: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


@dataclass
class PowerCutRun(CutLog):
    """What :func:`power_cut_run` did."""

    acked: int = 0  # local writes acknowledged to a client
    lost_acked: int = 0  # acknowledged writes a cut took away

    def describe(self) -> str:
        return "\n".join(
            [
                f"power-cut run seed {self.seed}, synchronous = {self.synchronous}: "
                f"{self.cuts} cuts ({self.mid_operation} mid-operation, {self.torn} torn "
                f"files), {self.acked} writes acknowledged, {self.lost_acked} of them lost",
                *(f"  {line}" for line in self.log[-40:]),
            ]
        )


def store_problems(node: SimNode, core: AgentCore) -> list[str]:
    """What is wrong with an agent's store after a restart: SQLite's ``integrity_check``, the
    bookkeeping against the tables, its own versions not exactly ``1..head``."""
    store = core.store
    out = []
    ok = store.conn.execute("PRAGMA integrity_check").fetchall()
    if ok != [("ok",)]:
        out.append(f"integrity_check says {ok}")
    out += bookkeeping_problems(node.name, store, {}, available={})
    head = store.bookie.head(store.actor_id)
    own = store.bookie.actors.get(store.actor_id)
    held = own.held.ranges() if own is not None else []
    if held != ([(1, head)] if head else []):
        out.append(f"it books its own versions {held}")
    return out


class PowerCuts:
    """The world's lying disks, one power cut at a time, and the checks after a restart.

    Every node gets a :class:`FaultyVFS` in ``disk.values["vfs"]`` (what the node's cores open
    their databases through: the agent's store, an orchestrator's step logs) and the agent's
    ``synchronous`` setting. ``on_cut``: also called with the node when its power goes (a core
    that must stop at once: ``orch_core.OrchestratorCore.power_lost``)."""

    def __init__(
        self,
        world: World,
        run: CutLog,
        rng: random.Random,
        on_cut: Callable[[SimNode], object] | None = None,
    ) -> None:
        self.world = world
        self.run = run
        self.rng = rng
        self.on_cut = on_cut
        self.vfs: dict[int, FaultyVFS] = {}
        self._mid: set[int] = set()  # nodes whose armed cut is to come inside an operation
        for node in world.nodes:
            vfs = FaultyVFS(f"sim-{run.seed}-{node.name}-{id(self)}", world.streams.fresh(
                f"disk.{node.name}"))  # fmt: skip
            vfs.on_cut = lambda node=node: self._halt(node)
            node.disk.values["vfs"] = vfs
            node.disk.values["synchronous"] = run.synchronous
            self.vfs[node.index] = vfs
        world.on_close(self._unregister)
        world.after_each_event(self._crash_halted)

    def _unregister(self) -> None:
        self.run.injected = [i for v in self.vfs.values() for i in v.injected]
        for vfs in self.vfs.values():
            vfs.unregister()

    def _halt(self, node: SimNode) -> None:
        node.halted = True
        if self.on_cut is not None:
            self.on_cut(node)

    def armed(self) -> bool:
        """A cut is armed or a node is down: one power fault at a time."""
        return any(v.cut_armed for v in self.vfs.values()) or any(
            not n.up or n.halted for n in self.world.nodes
        )

    def cut(
        self,
        node: SimNode,
        after_writes: int | None,
        only: Callable[[str], bool] | None = None,
        what: str = "",
    ) -> None:
        """Cut ``node``'s power now (between events), or after ``after_writes`` more writes
        (inside whatever it does then; with ``only``, writes to the files it accepts, named
        ``what`` in the log); nothing if another power fault is under way."""
        if not node.up or self.armed():
            return
        vfs = self.vfs[node.index]
        if after_writes is None:
            self.run.log.append(f"t={self.world.now:.2f}s cut the power of {node.name}")
            vfs.cut_power()
            self._crash_halted()
        else:
            self.run.log.append(
                f"t={self.world.now:.2f}s the power of {node.name} goes after {after_writes} "
                f"more {what + ' ' if what else ''}writes"
            )
            vfs.cut_power_after(after_writes, only)
            self._mid.add(node.index)

    def clear_faults(self) -> None:
        for vfs in self.vfs.values():
            vfs.clear_faults()

    def _crash_halted(self) -> None:
        world = self.world
        for node in world.nodes:
            if not node.halted:
                continue
            vfs = self.vfs[node.index]
            world.crash(node)
            node.halted = False
            lost = vfs.recover()
            self.run.cuts += 1
            self.run.mid_operation += int(node.index in self._mid)
            self._mid.discard(node.index)
            self.run.torn += sum("torn" in line for line in lost)
            self.run.log.append(f"t={world.now:.2f}s {node.name} crashed: {'; '.join(lost)}")
            world.at(world.now + self.rng.uniform(0.3, 2.0), self.restart, node)

    def restart(self, node: SimNode) -> None:
        world = self.world
        try:
            world.restart(node)
        except apsw.Error as exc:
            world.fail(CHECK, f"{node.name} cannot reopen its store after a power cut: {exc}")
            return
        self.run.log.append(f"t={world.now:.2f}s {node.name} restarted")
        for problem in self.problems(node):
            world.fail(CHECK, f"after {node.name}'s restart: {problem}")

    def restart_all(self) -> None:
        """Boot every node that is down (the faults are over)."""
        for node in self.world.nodes:
            if not node.up:
                self.restart(node)

    def problems(self, node: SimNode) -> list[str]:
        """What is wrong with ``node`` just after its restart (a world adds its own checks)."""
        core = agent_of(node)
        if core is None:
            return [f"{node.name} has no agent after its restart"]
        return store_problems(node, core)


class _Disks(PowerCuts):
    """The agent world's power cuts, and the writes acknowledged on each node."""

    def __init__(self, world: World, run: PowerCutRun, rng: random.Random) -> None:
        super().__init__(world, run, rng)
        self.run: PowerCutRun = run
        self.acked: dict[int, dict[int, list[str]]] = {n.index: {} for n in world.nodes}
        self.inflight: dict[int, tuple[int, list[str]]] = {}  # cut inside this write

    def problems(self, node: SimNode) -> list[str]:
        out = super().problems(node)
        core = agent_of(node)
        if core is None:
            return out
        store = core.store
        head = store.bookie.head(store.actor_id)
        acked = self.acked[node.index]
        known = dict(acked)
        inflight = self.inflight.pop(node.index, None)
        if inflight is not None:
            known[inflight[0]] = inflight[1]
        keys = {k for (k,) in store.conn.execute("SELECT k FROM kv WHERE k LIKE 'p%'")}
        for version, written in sorted(known.items()):
            if version <= head and not set(written) <= keys:
                out.append(f"it books its version {version} but lacks its rows")
            if version > head and set(written) & keys:
                out.append(f"it holds rows of its version {version} but does not book it")
        lost = sorted(v for v in acked if v > head)
        if lost:
            self.run.lost_acked += len(lost)
            if self.run.synchronous.upper() == "FULL":
                out.append(f"acknowledged versions {lost} lost under synchronous = FULL")
        # what survived is what it holds now (a lost version's number is reused: forget it)
        self.acked[node.index] = {v: k for v, k in known.items() if v <= head}
        return out

    def write(self, n: int) -> None:
        """A client's write of fresh keys on a random live node (acknowledged if the node's
        power holds until ``execute`` returns)."""
        world = self.world
        live = [x for x in world.nodes if x.up and not x.halted]
        if not live:
            return
        node = live[self.rng.randrange(len(live))]
        core = agent_of(node)
        assert core is not None
        rows = self.rng.choice((1, 1, 3, 60))
        keys = [f"p{node.index}.{n}.{i}" for i in range(rows)]
        sql = "INSERT INTO kv (k, v) VALUES (?, ?)"
        version = core.execute([(sql, (k, k * 12)) for k in keys], world.now)
        if version is None:
            return
        if node.halted:  # the power went inside this write: never acknowledged
            self.inflight[node.index] = (version, keys)
            return
        self.acked[node.index][version] = keys
        self.run.acked += 1


def power_cut_run(
    seed: int,
    *,
    nodes: int = 3,
    synchronous: str = "FULL",
    writes: int = 60,
    check_convergence: bool = True,
    files_dir: str | None = None,
) -> PowerCutRun:
    """Build and run one seeded scenario (see the module docstring); raises
    ``SimulationFailure`` (with the seed and this run's log) if anything broke.
    ``check_convergence``: False skips the liveness phase (``NORMAL`` loses acknowledged
    versions that peers hold, and does not converge: ``docs/simulations.md``)."""
    rng = random.Random(seed)
    run = PowerCutRun(seed, synchronous)
    link = LinkModel(BASE_LINK.delay, loss=rng.choice([0.0, 0.05, 0.15]))
    world = agent_world(seed, nodes, link=link, files_dir=files_dir)
    world.repro = f"simulations.power_cuts.power_cut_run({seed}, synchronous={synchronous!r})"
    disks = _Disks(world, run, rng)
    try:
        world.run_until(2.0)
        for n in range(writes):
            if rng.random() < 0.15:
                node = world.nodes[rng.randrange(nodes)]
                disks.cut(node, None if rng.random() < 0.3 else rng.randint(0, 30))
            disks.write(n)
            world.run_for(rng.uniform(0.01, 0.4))
            world.config_text = run.describe()
        disks.clear_faults()
        world.run_for(2.5)  # the last crashed node restarts
        disks.restart_all()
        world.config_text = run.describe()
        if check_convergence:
            run_liveness(world, link=BASE_LINK)
            world.check()
        else:
            world.check(final=False)
    finally:
        world.close()
    return run
