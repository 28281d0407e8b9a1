"""Power cuts in a world of orchestrator workers: step logs and agent stores on a lying disk.

:func:`orch_power_cut_run` takes :func:`~simulations.orch_world.orchestrator_world` (each node an
agent plus an orchestrator worker publishing its machines into the replicated ``machines``
table) and gives every node the faulty disk of :class:`~simulations.power_cuts.PowerCuts`: the
agent's store and the worker's step logs are opened through the node's
:class:`~simulations.faulty_vfs.FaultyVFS`. While the ``Workload`` creates, starts, stops and
destroys machines (with process kills, kill points, partitions and agent outages), the power of
one node at a time is cut, between events or a seeded number of writes into whatever the node
writes next (a START, a step's COMPLETE with its document, a FINISH, a publish into the agent's
store, an apply of a peer's changes). The worker dies at that write
(``OrchestratorCore.power_lost``), the node crashes after the event, its files are rewritten as
the disk holds them (unsynced writes lost or torn), and it restarts a little later: the agent
from its store, the worker from its step logs, resuming every unfinished run.

Checked after every restart, on that node (violations under ``power-cut``):

- the agent's store: ``integrity_check``, bookkeeping equal to its tables, own versions
  ``1..head`` (``power_cuts.store_problems``);
- every step log: ``integrity_check``; each run's events numbered ``0..n`` from its START, a
  FINISH last and exactly when the run is closed, no step COMPLETE twice, no event without its
  run, the machine's document there; no log left unreadable;
- nothing the logs acknowledged is gone: every run a live process accepted and every step whose
  COMPLETE returned with the power on is still in its machine's log (or compacted into its
  history, or the machine was destroyed and archived).

At every event (``orch_checks.StepsOnce``): no step reported complete starts again, no finished
run resumes, a succeeded run leaves its machine in the state it promised; and a run fails only
because the reboot took the instance it was to start (:data:`LOST_INSTANCE`). After the faults stop
and the network heals, the liveness checkers must settle: every accepted run finished
(``RunsFinish``), every replica of ``machines`` equal to the workers' truth
(``PublishedRows``) and the agents' databases byte-equal (``CrdtConvergence``, ordered dumps).
``orch_power_cut_run(seed)`` replays a seed.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import apsw

from orchestrator.steplog_schema import FAILED
from orchestrator.store import SUFFIX, archive_key

from .checkers import run_liveness
from .node import SimNode
from .orch_checks import StepsOnce
from .orch_core import OrchEvent, OrchSettings, orchestrator_of
from .orch_world import BASE_LINK, OrchStats, Workload, orchestrator_world, recover
from .power_cuts import CHECK, CutLog, PowerCuts
from .world import World

__all__ = ["FAULTS", "OrchPowerCutRun", "orch_power_cut_run"]

FAULTS = ("kill", "killpoint", "partition", "outage")
"""The workload's other faults (node crashes are the power cuts; driver faults would make runs
fail for reasons of their own)."""
LOST_INSTANCE = re.compile(r"instance \S+ disappeared")
"""The one reason a run may fail here: a power cut is a host reboot, and the ``FakeDriver``'s
instances do not survive it (a restart or exit run then finds none to start)."""


@dataclass
class OrchPowerCutRun(CutLog):
    """What :func:`orch_power_cut_run` did."""

    counts: dict[str, int] = field(default_factory=dict)  # OrchStats: runs, steps, processes
    logs_checked: int = 0  # step logs checked (after restarts and at the end)
    redone: int = 0  # completed steps started again (violations)
    digest: str = ""  # the world's trace digest (same seed, same digest)

    @property
    def steplog_losses(self) -> int:
        """Cuts that took unsynced step-log writes away (or tore one): the recoveries a step
        log had to survive."""
        n = 0
        for line in self.log:
            notes = line.split(" crashed: ", 1)[1].split("; ") if " crashed: " in line else []
            n += any(_lost_writes(note) for note in notes if ".sqlite" in note)
        return n

    @property
    def resumed(self) -> int:
        """Runs a restarted process resumed from its step log."""
        return self.counts.get("run resumed", 0)

    def describe(self) -> str:
        c = self.counts
        return "\n".join(
            [
                f"orchestrator power-cut run seed {self.seed}: {self.cuts} cuts "
                f"({self.mid_operation} mid-operation, {self.torn} torn files), "
                f"{c.get('run_started', 0)} runs started ({self.resumed} resumed), "
                f"{c.get('step_completed', 0)} steps completed, {self.logs_checked} step logs "
                f"checked, {self.steplog_losses} cuts took step-log writes",
                *(f"  {line}" for line in self.log[-40:]),
            ]
        )


def _lost_writes(note: str) -> bool:
    """Whether a recovery note (``FaultyVFS.recover``) says writes were lost or torn."""
    m = re.search(r"kept (\d+) of (\d+)", note)
    return "torn" in note or (m is not None and m[1] != m[2])


@contextmanager
def _read(path: Path, vfs: str) -> Iterator[apsw.Connection]:
    """A connection to a step log through the node's faulty VFS (so that anything SQLite
    writes on it, such as a checkpoint at close, is on the disk's books too)."""
    conn = apsw.Connection(str(path), vfs=vfs)
    try:
        yield conn
    finally:
        conn.close()


def steplog_problems(conn: apsw.Connection) -> list[str]:
    """What is inconsistent in one step log: its runs against their events, its document."""
    out = []
    ok = conn.execute("PRAGMA integrity_check").fetchall()
    if ok != [("ok",)]:
        return [f"integrity_check says {ok}"]
    runs = conn.execute("SELECT seq, run_id, status FROM runs ORDER BY seq").fetchall()
    for seq, run_id, status in runs:
        events = conn.execute(
            "SELECT seq, kind, step FROM events WHERE run_seq = ? ORDER BY seq", (seq,)
        ).fetchall()
        kinds = [k for _, k, _ in events]
        if [s for s, _, _ in events] != list(range(len(events))) or kinds[:1] != ["start"]:
            out.append(f"run {run_id}'s events are {kinds} numbered {[s for s, _, _ in events]}")
        if (status != "active") != (kinds[-1:] == ["finish"]) or kinds.count("finish") > 1:
            out.append(f"run {run_id} is {status} with events {kinds}")
        steps = [st for _, k, st in events if k == "complete"]
        if len(steps) != len(set(steps)):
            out.append(f"run {run_id} completes a step twice: {steps}")
    orphans = conn.execute(
        "SELECT DISTINCT run_seq FROM events WHERE run_seq NOT IN (SELECT seq FROM runs)"
    ).fetchall()
    if orphans:
        out.append(f"events of runs that do not exist: {orphans}")
    if runs and not conn.execute("SELECT 1 FROM machine WHERE id = 1").fetchall():
        out.append("it has runs but no machine document")
    return out


def completed_steps(conn: apsw.Connection) -> dict[str, set[str]]:
    """Every run a step log holds (compacted into its history or not), with the steps it
    records complete."""
    out: dict[str, set[str]] = {}
    for run_id, events in conn.execute("SELECT run_id, events FROM history"):
        # a compacted run's events: [kind, step, retry_count, at] each
        out[str(run_id)] = {e[1] for e in json.loads(str(events)) if e[0] == "complete"}
    for (run_id,) in conn.execute("SELECT run_id FROM runs"):
        out[str(run_id)] = set()
    for run_id, step in conn.execute(
        "SELECT r.run_id, e.step FROM events e JOIN runs r ON r.seq = e.run_seq "
        "WHERE e.kind = 'complete'"
    ):
        out[str(run_id)].add(str(step))
    return out


def _steplog(name: str) -> bool:
    """A step log's file (``<machine>.sqlite`` and its ``-wal``), not the agent's store."""
    return ".sqlite" in name


class _Disks(PowerCuts):
    """The power cuts of an orchestrator world, and the step-log checks after a restart."""

    def __init__(self, world: World, run: OrchPowerCutRun, rng: random.Random) -> None:
        super().__init__(world, run, rng, on_cut=self._power_lost)
        self.run: OrchPowerCutRun = run
        (self.ledger,) = [c for c in world.checkers if type(c) is StepsOnce]
        world.event_hooks.append(self._on_event)

    def _on_event(self, node: SimNode, channel: str, e: object) -> None:
        """A run fails here only when the reboot took its instance (no driver faults)."""
        if type(e) is not OrchEvent or e.kind != "run_finished" or e.detail != "failed":
            return
        if not LOST_INSTANCE.search(e.error):
            self.world.fail(
                CHECK, f"{e.action} run {e.run_id} on {e.machine_id} ({e.worker}) failed: {e.error}"
            )

    @staticmethod
    def _power_lost(node: SimNode) -> None:
        core = orchestrator_of(node)
        if core is not None:
            core.power_lost()

    def problems(self, node: SimNode) -> list[str]:
        out = super().problems(node)
        core = orchestrator_of(node)
        orch = core.orch if core is not None else None
        if orch is None or orch.store is None:
            return [*out, "its orchestrator did not start again"]
        store = orch.store
        vfs = self.vfs[node.index].name
        for mid, status in sorted(store.schema_statuses().items()):
            if status.state == FAILED:
                out.append(f"step log of {mid} unreadable: {status.error}")
        logged: dict[str, dict[str, set[str]]] = {}  # machine -> its runs -> steps completed
        for mid in store.machine_ids():
            self.run.logs_checked += 1
            with _read(store.path / f"{mid}{SUFFIX}", vfs) as conn:
                out += [f"step log of {mid}: {p}" for p in steplog_problems(conn)]
                logged[mid] = completed_steps(conn)
        archived = set(store.archive_store.list_keys())
        for (worker, run_id), (mid, action, _) in sorted(self.ledger.runs.items()):
            if worker != node.name:
                continue
            if mid not in logged:
                if archive_key(mid) not in archived:
                    out.append(f"{action} run {run_id}'s machine {mid} is gone (not archived)")
                continue
            steps = logged[mid].get(run_id)
            if steps is None:
                out.append(f"accepted {action} run {run_id} on {mid} is not in its step log")
                continue
            lost = sorted(set(self.ledger.completed.get((worker, run_id), {})) - steps)
            if lost:
                out.append(f"{action} run {run_id} on {mid} lost acknowledged COMPLETEs {lost}")
        return out


def orch_power_cut_run(
    seed: int,
    *,
    nodes: int = 3,
    duration: float = 30.0,
    cut_interval: float = 2.5,
    settings: OrchSettings | None = None,
) -> OrchPowerCutRun:
    """One seeded scenario (see the module docstring): ``duration`` seconds of operations and
    faults, a power cut every ``cut_interval`` seconds on average; raises ``SimulationFailure``
    (with the seed and this run's log) if anything broke."""
    run = OrchPowerCutRun(seed, "FULL")
    world = orchestrator_world(seed, nodes, settings=settings)
    world.repro = f"simulations.orch_power_cuts.orch_power_cut_run({seed}, nodes={nodes})"
    rng = world.streams("orch.power")
    disks = _Disks(world, run, rng)
    stats = OrchStats()
    stats.attach(world)
    logger = logging.getLogger("orchestrator")
    level = logger.level
    logger.setLevel(logging.ERROR)  # publish retries while an agent is down: one line each
    try:
        warm = nodes * 0.05 + 2.0
        end = warm + duration
        Workload(world, faults=FAULTS).schedule(warm, end)
        t = warm
        while True:
            t += rng.expovariate(1.0 / cut_interval)
            if t >= end:
                break
            node = world.nodes[rng.randrange(nodes)]
            u = rng.random()
            if u < 0.3:
                world.at(t, disks.cut, node, None)
            elif u < 0.65:  # inside whatever the node writes next: mostly its agent's applies
                world.at(t, disks.cut, node, rng.randint(0, 40))
            else:  # inside the worker's next step-log writes
                world.at(t, disks.cut, node, rng.randint(0, 12), _steplog, "step-log")
        world.run_until(end)
        disks.clear_faults()
        world.run_for(2.5)  # the last node whose power went restarts
        disks.restart_all()
        run.counts = stats.counts
        world.config_text = run.describe()
        world.check(final=False)
        recover(world)
        run_liveness(world, link=BASE_LINK)
        for node in world.nodes:  # and every node's logs and store once more, at the end
            for problem in disks.problems(node):
                world.fail(CHECK, f"at the end, {node.name}: {problem}")
        run.counts = stats.counts
        world.config_text = run.describe()
        world.check(final=True)
    finally:
        logger.setLevel(level)
        run.redone = disks.ledger.redone
        run.digest = world.digest()
        world.close()
    return run
