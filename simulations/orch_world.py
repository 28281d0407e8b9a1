"""Worlds of orchestrator workers, and a seeded workload of machine operations and faults.

:func:`orchestrator_world` gives every node an agent (replication + swim, ``agent_core``) and an
orchestrator worker (``orch_core``) publishing its machines into the replicated ``machines``
table, with the SWIM checkers, CRDT convergence and the three orchestrator checkers
(``orch_checks``). :class:`Workload` schedules random API calls (create, start, stop, restart,
destroy, cordon, uncordon) and faults (process kills from outside or at a kill point inside,
node crashes, partitions, driver faults, agent outages) from named streams of the seed;
:func:`run_orchestrator` runs one seeded scenario through its safety and liveness phases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.publish import MACHINES_SCHEMA
from swim import Config

from .agent_core import agent_world
from .aio import VirtualLoop
from .checkers import Checker, run_liveness
from .network import LinkModel
from .orch_checks import orchestrator_checkers
from .orch_core import OrchEvent, OrchSettings, orchestrator, orchestrator_of
from .scenarios import PRESETS
from .world import World

__all__ = ["LoopHealth", "OrchStats", "Workload", "orchestrator_world", "run_orchestrator"]

BASE_LINK = PRESETS["lan"][1]
OPS = ("create", "start", "stop", "restart", "destroy", "cordon", "uncordon")
OP_WEIGHTS = (3.0, 2.0, 2.0, 1.0, 1.5, 0.5, 0.5)
DRIVER_FAULTS = ("fail_start", "fail_create", "fail_stop", "oom", "crash", "sigterm", "slow")
POLICIES = ("no", "always", "on-failure")
SHM = "/dev/shm"
"""Step logs are written with synchronous=FULL; in memory-backed files their fsyncs cost
nothing, which halves a run's wall time. The crash model does not need real durability: a
killed process is cancelled in place, so what it committed is what a restart reads."""


class LoopHealth(Checker):
    """Async code must not die of an unexpected exception (an orchestrator process that fails
    to start, a task whose exception nobody retrieved)."""

    name = "orch-loop"

    def __init__(self, vloop: VirtualLoop) -> None:
        self.vloop = vloop
        self._seen = 0

    def attach(self, world: World) -> None:
        world.event_hooks.append(
            lambda node, channel, e: (
                world.fail(self.name, f"{e.worker} process {e.proc} died: {e.detail}")
                if type(e) is OrchEvent and e.kind == "error"
                else None
            )
        )

    def check(self, world: World, final: bool) -> None:
        for err in self.vloop.errors[self._seen :]:
            world.fail(self.name, err)
        self._seen = len(self.vloop.errors)


@dataclass
class OrchStats:
    """Counts of what the orchestrators did in a run (for summaries)."""

    counts: dict[str, int] = field(default_factory=dict)

    def attach(self, world: World) -> None:
        world.event_hooks.append(self._on_event)

    def _on_event(self, node: Any, channel: str, e: Any) -> None:
        if type(e) is not OrchEvent:
            return
        key = e.kind
        if e.kind == "op":
            key = f"op {e.action} {e.detail.split()[0]}"
        elif e.kind == "run_finished":
            key = f"run {e.detail}"
        elif e.kind == "run_started" and e.detail == "resumed":
            key = "run resumed"
        self.counts[key] = self.counts.get(key, 0) + 1


def orchestrator_world(
    seed: int,
    n: int = 3,
    *,
    settings: OrchSettings | None = None,
    link: LinkModel | None = None,
    deadline: float = 180.0,
) -> World:
    """``n`` nodes, each an agent plus an orchestrator worker, with every checker attached."""
    vloop = VirtualLoop()
    world = agent_world(
        seed,
        n,
        swim_config=Config.lan(push_pull_interval=10.0),
        schema=MACHINES_SCHEMA,
        link=link or BASE_LINK,
        deadline=deadline,
        extra=[orchestrator(vloop, settings)],
        files_dir=SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK) else None,
    )
    world.on_close(vloop.close)
    for c in orchestrator_checkers(deadline):
        world.add_checker(c)
    world.add_checker(LoopHealth(vloop))
    return world


def machine_body(rng: Any) -> dict[str, Any]:
    """A create request: busybox, a restart policy, a short stop timeout, maybe skip_launch."""
    config = {
        "image": "busybox",
        "init": {"cmd": ["sleep", "inf"]},
        "restart": {"policy": rng.choice(POLICIES), "max_retries": rng.randint(1, 3)},
        "stop_config": {"signal": "SIGTERM", "timeout": f"{rng.randint(1, 4)}s"},
    }
    return {"config": config, "skip_launch": rng.random() < 0.2}


class Workload:
    """Random operations and faults, drawn from the ``orch.ops`` and ``orch.faults`` streams.

    ``op_interval`` / ``fault_interval``: mean seconds between API calls / faults.
    ``max_machines``: a worker with that many machines gets no more creates."""

    def __init__(
        self,
        world: World,
        *,
        op_interval: float = 0.6,
        fault_interval: float = 4.0,
        max_machines: int = 6,
        faults: tuple[str, ...] = ("kill", "killpoint", "crash", "partition", "driver", "outage"),
    ) -> None:
        self.world = world
        self.ops_rng = world.streams("orch.ops")
        self.fault_rng = world.streams("orch.faults")
        self.op_interval = op_interval
        self.fault_interval = fault_interval
        self.max_machines = max_machines
        self.faults = faults

    def schedule(self, start: float, end: float) -> None:
        """Schedule calls and faults in ``[start, end)``."""
        t = start
        while True:
            t += self.ops_rng.expovariate(1.0 / self.op_interval)
            if t >= end:
                break
            self.world.at(t, self.random_op)
        t = start
        while self.faults:
            t += self.fault_rng.expovariate(1.0 / self.fault_interval)
            if t >= end:
                break
            self.world.at(t, self.random_fault)

    # -- operations ---------------------------------------------------------------------------

    def random_op(self) -> None:
        rng = self.ops_rng
        node = self.world.nodes[rng.randrange(len(self.world.nodes))]
        op = rng.choices(OPS, OP_WEIGHTS)[0]
        self.op(node.index, op, rng.randrange(1 << 30), rng.random() < 0.5)

    def op(self, index: int, op: str, pick: int, flag: bool) -> str:
        """One API call on node ``index``'s worker; ``pick`` chooses the machine, ``flag`` is
        ``force`` for destroy. Returns a description (for hypothesis' step log)."""
        node = self.world.nodes[index % len(self.world.nodes)]
        core = orchestrator_of(node)
        if core is None or not core.up:
            return f"{op} on {node.name}: worker down"
        mids = core.machine_ids()
        if op == "create" or not mids:
            if len(mids) >= self.max_machines:
                op = "destroy"
            else:
                body = machine_body(self.ops_rng)
                core.submit("create", body=body)
                return f"create on {node.name}"
        mid = mids[pick % len(mids)]
        kwargs: dict[str, Any] = {"force": flag} if op == "destroy" else {}
        core.submit(op, mid, **kwargs)
        return f"{op} {mid} on {node.name}"

    # -- faults -------------------------------------------------------------------------------

    def random_fault(self) -> None:
        rng = self.fault_rng
        kind = rng.choice(self.faults)
        self.fault(kind, rng.randrange(1 << 30), rng.random())

    def fault(self, kind: str, pick: int, u: float) -> str:
        """Inject one fault; ``pick`` and ``u`` (in [0, 1)) choose its target and size."""
        world = self.world
        nodes = world.nodes
        node = nodes[pick % len(nodes)]
        core = orchestrator_of(node)
        if kind == "kill":
            if core is None or not core.up:
                return f"kill {node.name}: nothing to kill"
            core.kill("killed by the workload")
            return f"kill {node.name}'s orchestrator"
        if kind == "killpoint":
            if core is None:
                return f"killpoint {node.name}: node down"
            k = 1 + pick % 12
            core.kill_points.arm(k)
            return f"kill {node.name}'s orchestrator at its {k}th kill point"
        if kind == "crash":
            live = world.live_nodes()
            if not node.up or len(live) <= max(1, len(nodes) // 2):
                return f"crash {node.name}: skipped"
            world.crash(node)
            world.at(world.now + 1.0 + 9.0 * u, world.restart, node)
            return f"crash {node.name} for {1 + 9 * u:.1f}s"
        if kind == "partition":
            if u < 0.5:
                pid = world.partition([[node]], label="isolate")
                what = f"isolate {node.name}"
            else:
                k = 1 + pick % (len(nodes) - 1)
                pid = world.partition([nodes[:k], nodes[k:]], symmetric=u < 0.8)
                what = f"split first {k}"
            world.at(world.now + 2.0 + 13.0 * u, world.heal, pid)
            return what
        if kind == "driver":
            if core is None:
                return f"driver fault {node.name}: node down"
            fk = DRIVER_FAULTS[pick % len(DRIVER_FAULTS)]
            arg = 1 + (pick >> 4) % 3 if fk != "slow" else int(30 * u)
            return core.driver_fault(fk, arg, transient=u < 0.8)
        if kind == "outage":
            if core is None:
                return f"outage {node.name}: node down"
            core.agent_outage_until = world.now + 1.0 + 4.0 * u
            world.trace.note(world.now, "agent-outage", node.name, core.agent_outage_until)
            return f"agent outage on {node.name} for {1 + 4 * u:.1f}s"
        raise ValueError(f"unknown fault {kind!r}")


def recover(world: World) -> None:
    """Before the liveness phase: boot crashed nodes, revive killed processes, disarm kills,
    end agent outages (partitions and clogs are healed by ``run_liveness``)."""
    for node in world.nodes:
        if not node.up:
            world.restart(node)
        core = orchestrator_of(node)
        if core is not None:
            core.kill_points.disarm()
            core.agent_outage_until = 0.0
            core.revive()


def run_orchestrator(
    seed: int,
    n: int = 3,
    duration: float = 40.0,
    *,
    settings: OrchSettings | None = None,
    workload: Callable[[World], Workload] | None = None,
    check: bool = True,
) -> tuple[World, OrchStats]:
    """One seeded scenario: a warm-up, ``duration`` seconds of operations and faults, recovery,
    the liveness phase, every check. The caller closes the world."""
    world = orchestrator_world(seed, n, settings=settings)
    world.repro = f"simulations.orch_world.run_orchestrator({seed}, n={n}, duration={duration})"
    stats = OrchStats()
    stats.attach(world)
    try:
        load = workload(world) if workload is not None else Workload(world)
        warm = n * 0.05 + 2.0
        load.schedule(warm, warm + duration)
        world.run_until(warm + duration)
        if check:
            world.check(final=False)
        recover(world)
        run_liveness(world, link=BASE_LINK)
        if check:
            world.check(final=True)
    except BaseException:
        world.close()
        raise
    return world, stats
