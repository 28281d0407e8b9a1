"""Hosting an orchestrator worker (flyd) on a simulated node, beside that node's agent.

:class:`OrchestratorCore` is a :class:`~simulations.node.Core` (channel ``"orchestrator"``) that
runs the real ``orchestrator.service.Orchestrator`` - engine, operations, exit watchers, publish
queue - as async tasks in the world's :class:`~simulations.aio.VirtualLoop`, on a
:class:`~simulations.aio.SimClock`, with ``offload=False`` and ids from the node's seeded stream.
Its machines directory is in the node's disk, so the per-machine step logs survive crashes.

Two kinds of death, as on a real worker:

* **process kill** (:meth:`OrchestratorCore.kill`): the orchestrator process dies - its tasks are
  cancelled at their current await, in-flight API calls die with them, nothing else runs - while
  the host keeps going: the ``FakeDriver``'s instances survive (VMs outlive flyd) and so does the
  agent. :meth:`OrchestratorCore.revive` starts a new process on the same directory; the engine
  resumes every unfinished run. A kill can also be armed to happen *inside* the process at its
  k-th kill point (a step starting, or a driver call before or after its effect: see
  :class:`KillPoints`), which is how "killed after the side effect, before COMPLETE" happens.
* **node crash** (``world.crash``): the whole host goes; the process is killed, the driver and its
  instances are lost (a reboot), the agent's core is rebuilt from its database.
* **power cut** (``simulations.orch_power_cuts``): a node crash on a lying disk. The step logs
  are opened through the node's faulty VFS (``disk.values["vfs"]``, beside the agent's store);
  when the power goes, even inside a write, :meth:`OrchestratorCore.power_lost` kills the
  process there: the write and whatever the process does after it never happen (a task that
  goes on until its next await stops at the next step, run end, driver call or archive put).

The orchestrator writes its machines' rows through :class:`SimPublisher`: a local transaction on
the sibling agent core, which replicates it over the simulated network like any write.

What it emits (``port.publish``, so the trace digests it and checkers see it): :class:`OrchEvent`
for every process start (up), death (down) or unexpected failure (error), run start and
finish, step start and completion (its COMPLETE is on disk), and API call outcome (op). A dead
process emits nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel

from corrosion.core.statements import parse_statements
from orchestrator.archive import ArchiveStore, DirectoryArchive
from orchestrator.drivers import FakeDriver
from orchestrator.drivers.base import ExitStatus, InstanceSpec, InstanceState, InstanceStatus
from orchestrator.engine import Backoff, EngineObserver, RunInfo, RunResult
from orchestrator.errors import OrchestratorError
from orchestrator.operations import target_state
from orchestrator.service import Orchestrator

from .agent_core import AGENT, AgentCore
from .aio import SimClock, VirtualLoop
from .node import Core, CoreSpec, Port, SimNode

__all__ = [
    "ORCH",
    "KillPoints",
    "OrchEvent",
    "OrchSettings",
    "OrchestratorCore",
    "SimPublisher",
    "orchestrator",
    "orchestrator_of",
]

ORCH = "orchestrator"
APP = "app"


@dataclass(frozen=True)
class OrchSettings:
    """How a worker's driver behaves (delays are virtual seconds)."""

    latency: float = 0.05
    """Every driver call takes this long, so runs span virtual time and kills land mid-run."""
    stop_delay: float = 0.2
    """How long an instance takes to react to its stop signal (slow stops)."""
    backoff: Backoff | None = None
    """The engine's and the publisher's retry backoff (default: 100 ms doubling to 5 s)."""
    restart_delay: float | None = 1.0
    """A killed process is started again after this long, as systemd would (None: only
    :meth:`OrchestratorCore.revive` starts it)."""


@dataclass(frozen=True)
class OrchEvent:
    """Something an orchestrator process did, published to checkers and the trace. ``kind``:
    up, down, error, run_started, run_finished, step_started, step_completed, op."""

    kind: str
    worker: str
    proc: str
    """The process: ``b<node boot>p<process number within the boot>``."""
    run_id: str = ""
    machine_id: str = ""
    action: str = ""
    step: str = ""
    detail: str = ""
    target: str = ""
    """For run_started: the state the run promises (``operations.target_state``), if any."""
    error: str = ""
    """For run_finished: why the run halted (``RunError.message``), if it did."""


class ProcessKilled(BaseException):
    """Raised at a kill point: the task that hit it stops right there (``except Exception``
    handlers do not catch it, as nothing survives SIGKILL); the rest of the process is
    cancelled at its current await."""


class KillPoints:
    """A countdown of kill points; the process dies when it reaches zero.

    Points are counted at each step start (the previous step's COMPLETE is on disk, this step
    never begins) and around each mutating driver call: before the call (the effect never
    happens) and after it (the effect happened, the step's COMPLETE is never logged)."""

    def __init__(self) -> None:
        self.left: int | None = None

    def arm(self, k: int) -> None:
        self.left = max(1, k)

    def disarm(self) -> None:
        self.left = None

    def hit(self) -> bool:
        if self.left is None:
            return False
        self.left -= 1
        if self.left <= 0:
            self.left = None
            return True
        return False


class _Process:
    """One life of the orchestrator process on a node."""

    def __init__(self, boot: int, gen: int) -> None:
        self.gen = gen
        self.pid = f"b{boot}p{gen}"
        self.orch: Orchestrator | None = None
        self.task: asyncio.Task[Any] | None = None
        self.ops: dict[int, asyncio.Task[Any]] = {}
        self.alive = True
        self.ready = False
        self.why = ""

    def check_alive(self, where: str) -> None:
        """Stop the calling task if the process is dead (its power went in this event, and
        the task ran on to here before its next await)."""
        if not self.alive:
            raise ProcessKilled(f"dead ({self.why}) at {where}")


class _Observer(EngineObserver):
    def __init__(self, core: OrchestratorCore, proc: _Process) -> None:
        self.core = core
        self.proc = proc

    def _emit(
        self, kind: str, run_id: str, machine_id: str, action: str, step: str = "", detail: str = ""
    ) -> None:
        self.core._emit(
            OrchEvent(
                kind, self.core.worker, self.proc.pid, run_id, machine_id, action, step, detail
            )
        )

    def run_started(self, info: RunInfo) -> None:
        if not self.proc.alive:  # a START written after the power went: never acknowledged
            return  # (not raised: the create would discard the machine's file, outside the VFS)
        self.core._emit(
            OrchEvent(
                "run_started",
                self.core.worker,
                self.proc.pid,
                info.run_id,
                info.machine_id,
                info.action,
                detail="resumed" if info.resumed else "",
                target=target_state(info.action, info.request) or "",
            )
        )

    def step_started(self, info: RunInfo, step: str, is_restart: bool, retry: int) -> None:
        self.proc.check_alive(f"step {info.action}/{step}")
        self._emit(
            "step_started",
            info.run_id,
            info.machine_id,
            info.action,
            step,
            f"retry={retry}{' restart' if is_restart else ''}",
        )
        if self.core.kill_points.hit():
            self.core._kill_from_inside(self.proc, f"before step {info.action}/{step}")

    def step_completed(self, info: RunInfo, step: str) -> None:
        # alive: the COMPLETE was written with the power on (acknowledged by the log)
        self.proc.check_alive(f"step {info.action}/{step} completed")
        self._emit("step_completed", info.run_id, info.machine_id, info.action, step)

    def run_finished(self, result: RunResult) -> None:
        self.proc.check_alive(f"run {result.run_id} finished")
        c = self.core
        c._emit(
            OrchEvent(
                "run_finished",
                c.worker,
                self.proc.pid,
                result.run_id,
                result.machine_id,
                result.action,
                detail=result.status.value,
                error=result.error.message if result.error is not None else "",
            )
        )


class _KillableDriver:
    """The node's ``FakeDriver`` as one process sees it: kill points around mutating calls."""

    name = "fake"

    def __init__(self, core: OrchestratorCore, proc: _Process) -> None:
        self._core = core
        self._proc = proc
        self._inner = core.driver

    async def _point(self, where: str) -> None:
        self._proc.check_alive(where)
        if self._core.kill_points.hit():
            self._core._kill_from_inside(self._proc, where)

    async def prepare(self, spec: InstanceSpec) -> None:
        await self._inner.prepare(spec)

    async def create(self, spec: InstanceSpec) -> None:
        await self._point(f"before driver create {spec.instance_id}")
        await self._inner.create(spec)
        await self._point(f"after driver create {spec.instance_id}")

    async def start(self, instance_id: str) -> None:
        await self._point(f"before driver start {instance_id}")
        await self._inner.start(instance_id)
        await self._point(f"after driver start {instance_id}")

    async def signal(self, instance_id: str, sig: int) -> None:
        self._proc.check_alive(f"driver signal {instance_id}")
        await self._inner.signal(instance_id, sig)

    async def stop(self, instance_id: str, **kwargs: Any) -> ExitStatus:
        await self._point(f"before driver stop {instance_id}")
        out = await self._inner.stop(instance_id, **kwargs)
        await self._point(f"after driver stop {instance_id}")
        return out

    async def wait(self, instance_id: str) -> ExitStatus:
        return await self._inner.wait(instance_id)

    async def destroy(self, instance_id: str) -> None:
        await self._point(f"before driver destroy {instance_id}")
        await self._inner.destroy(instance_id)
        await self._point(f"after driver destroy {instance_id}")

    async def status(self, instance_id: str) -> InstanceStatus:
        return await self._inner.status(instance_id)

    async def aclose(self) -> None:
        return None


class _KillableArchive:
    """The machines' archive as one process sees it: a dead process archives nothing (a put
    is a durable write outside the step logs' VFS, then the machine's files go)."""

    def __init__(self, inner: ArchiveStore, proc: _Process) -> None:
        self._inner = inner
        self._proc = proc

    def put(self, key: str, data: bytes) -> None:
        self._proc.check_alive(f"archive put {key}")
        self._inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self._inner.get(key)

    def list_keys(self) -> list[str]:
        return self._inner.list_keys()


class SimPublisher:
    """``orchestrator.publish.Publisher`` writing through the sibling agent core: one local
    transaction, replicated by the agent. Fails (the queue retries) while the agent is away."""

    def __init__(self, core: OrchestratorCore) -> None:
        self.core = core
        self.calls = 0

    async def execute(self, statements: Sequence[Any]) -> Any:
        await anyio.lowlevel.checkpoint()
        core = self.core
        if core.port.world.now < core.agent_outage_until:
            raise ConnectionError("agent unavailable (injected outage)")
        agent = core.port.node.core_of(AGENT, AgentCore) if core.port.node.up else None
        if agent is None:
            raise ConnectionError("no agent on this node")
        self.calls += 1
        return agent.execute(parse_statements(list(statements)), core.port.now)


class OrchestratorCore(Core):
    """An orchestrator worker on a node; see the module docstring."""

    name = ORCH

    def __init__(self, port: Port, vloop: VirtualLoop, settings: OrchSettings) -> None:
        super().__init__(port)
        self.vloop = vloop
        self.settings = settings
        self.worker = port.node.name
        self.clock = SimClock(port.world, vloop)
        self.driver = FakeDriver(self.clock, latency=settings.latency)
        self.driver.stop_delay = settings.stop_delay
        self.kill_points = KillPoints()
        self.agent_outage_until = 0.0
        self.publisher = SimPublisher(self)
        self.proc: _Process | None = None
        self._gen = 0
        self._op_seq = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def orch(self) -> Orchestrator | None:
        """The live process's orchestrator, once it finished starting."""
        p = self.proc
        return p.orch if p is not None and p.alive and p.ready else None

    @property
    def up(self) -> bool:
        return self.orch is not None

    def start(self, now: float) -> None:
        self.revive()

    def stop(self) -> None:
        self.kill("node crash")
        self.vloop.drain()  # a process its power cut killed unwinds now

    def power_lost(self) -> None:
        """The node's power went (maybe inside one of this process's writes): the process is
        dead from here on. Its tasks unwind when the world crashes the node, after this event;
        one running now stops at its next await or guard (``_Process.check_alive``)."""
        proc = self.proc
        if proc is not None and proc.alive:
            self._cancel(proc, "power cut", revive=False)

    def revive(self) -> None:
        """Start a new orchestrator process (if none is alive on a live node)."""
        if not self.port.node.up or self.port.node.boot != self.port.boot:
            return
        if self.proc is not None and self.proc.alive:
            return
        if self.proc is not None and self.proc.task is not None and not self.proc.task.done():
            raise RuntimeError(f"{self.worker}: the previous orchestrator process is still running")
        self._gen += 1
        proc = _Process(self.port.boot, self._gen)
        self.proc = proc
        proc.task = self.vloop.spawn(self._main(proc), f"{self.worker}.orch{proc.pid}")
        self.vloop.drain()

    def kill(self, why: str = "killed") -> None:
        """Kill the live process at its current await (from outside the loop)."""
        proc = self.proc
        if proc is None or not proc.alive:
            return
        self._cancel(proc, why)
        self.vloop.drain()

    def _kill_from_inside(self, proc: _Process, where: str) -> None:
        """A kill point fired in one of the process's tasks: that task stops here (raises
        :class:`ProcessKilled`), the others at their current await."""
        if proc.alive:
            self._cancel(proc, f"kill point {where}")
        raise ProcessKilled(where)

    def _cancel(self, proc: _Process, why: str, *, revive: bool = True) -> None:
        """Kill ``proc``: no new API calls reach it, its tasks are cancelled; ``down`` is
        published once its main task has unwound (nothing of it runs after that)."""
        proc.alive = False
        proc.why = why
        for _, task in sorted(proc.ops.items()):
            task.cancel()
        if proc.task is not None:
            proc.task.cancel()
        delay = self.settings.restart_delay
        node = self.port.node
        if revive and delay is not None and node.up and node.boot == self.port.boot:
            self.port.world.sched.after(delay, self._auto_revive, proc.gen)

    def _auto_revive(self, gen: int) -> None:
        if self.proc is not None and self.proc.gen == gen and not self.proc.alive:
            self.revive()

    async def _main(self, proc: _Process) -> None:
        port = self.port
        machines = port.disk.path / "machines"
        vfs = port.disk.values.get("vfs")  # a lying disk (simulations.orch_power_cuts)
        orch = Orchestrator(
            machines_path=machines,
            archive=_KillableArchive(DirectoryArchive(machines / "archive"), proc),
            vfs=vfs and vfs.name,
            driver=_KillableDriver(self, proc),
            worker=self.worker,
            clock=self.clock,
            rng=port.rng(f".proc{proc.gen}"),
            publisher=self.publisher,
            offload=False,
            observer=_Observer(self, proc),
            backoff=self.settings.backoff,
        )
        try:
            async with orch:
                proc.check_alive("start-up")  # the power went while it loaded its machines
                proc.orch, proc.ready = orch, True
                self._emit(
                    OrchEvent("up", self.worker, proc.pid, detail=f"{len(orch.machine_ids())}")
                )
                await self.vloop.future()  # until killed
        except BaseException as e:
            if proc.alive:  # it died on its own: a bug the checkers report
                proc.alive = False
                text = f"{type(e).__name__}: {e}"
                self._emit(OrchEvent("error", self.worker, proc.pid, detail=text))
            else:
                self._emit(OrchEvent("down", self.worker, proc.pid, detail=proc.why))
            if not isinstance(e, Exception | ProcessKilled | BaseExceptionGroup):
                raise

    def _emit(self, event: OrchEvent) -> None:
        self.port.publish(event)

    # -- the Machines API, as a client of this worker -----------------------------------------

    def machine_ids(self) -> list[str]:
        """This worker's machines (sorted), or [] while its process is down."""
        orch = self.orch
        return orch.machine_ids() if orch is not None else []

    def submit(self, op: str, machine_id: str = "", **kwargs: Any) -> bool:
        """Send one API call (create, start, stop, restart, destroy, cordon, uncordon) to the
        live process; its outcome is published as an ``op`` event. False if the process is down."""
        proc = self.proc
        orch = self.orch
        if proc is None or orch is None:
            return False
        self._op_seq += 1
        seq = self._op_seq
        proc.ops[seq] = self.vloop.spawn(
            self._op(proc, orch, seq, op, machine_id, kwargs), f"{self.worker}.op{seq}"
        )
        self.vloop.drain()
        return True

    async def _op(
        self,
        proc: _Process,
        orch: Orchestrator,
        seq: int,
        op: str,
        mid: str,
        kwargs: Mapping[str, Any],
    ) -> None:
        try:
            if op == "create":
                view = await orch.create_machine(APP, dict(kwargs["body"]))
                mid, outcome = view["id"], "accepted"
            else:
                fn = getattr(orch, f"{op}_machine")
                await fn(APP, mid, **kwargs)
                outcome = "accepted"
        except OrchestratorError as e:
            outcome = f"refused {type(e).__name__}"
        except ProcessKilled:
            return  # the process died under the call (its power went): no answer
        finally:
            proc.ops.pop(seq, None)
        if proc.alive:  # answered with the power on
            self._emit(
                OrchEvent("op", self.worker, proc.pid, machine_id=mid, action=op, detail=outcome)
            )

    # -- driver faults ------------------------------------------------------------------------

    def running_instances(self) -> list[str]:
        return sorted(
            i for i, inst in self.driver.instances.items() if inst.state is InstanceState.RUNNING
        )

    def driver_fault(self, kind: str, arg: int = 0, transient: bool = True) -> str:
        """Inject a driver fault: ``fail_start``/``fail_stop``/``fail_create`` (the next ``arg``
        calls fail), ``oom``/``crash`` (a running instance, picked by ``arg``, exits on its own),
        ``sigterm`` (one ignores SIGTERM: its stop waits for the timeout, then SIGKILL), ``slow``
        (stops take ``arg`` tenths of a second). Returns what was done, for the trace."""
        d = self.driver
        if kind.startswith("fail_"):
            op = kind[5:]
            d.fail_next(op, max(1, arg), transient=transient)
            what = f"{kind} x{max(1, arg)}{'' if transient else ' permanent'}"
        elif kind in ("oom", "crash", "sigterm"):
            running = self.running_instances()
            if not running:
                return f"{kind}: no running instance"
            iid = running[arg % len(running)]
            if kind == "oom":
                d.oom(iid)
            elif kind == "crash":
                d.crash(iid, 1 + arg % 3)
            else:
                d.ignore_sigterm(iid)
            what = f"{kind} {iid}"
        elif kind == "slow":
            d.stop_delay = arg / 10
            what = f"stop_delay {d.stop_delay:g}s"
        else:
            raise ValueError(f"unknown driver fault {kind!r}")
        self.port.world.trace.note(self.port.now, "driver-fault", self.worker, what)
        self.vloop.drain()  # an exit wakes the watcher
        return what


def orchestrator(vloop: VirtualLoop, settings: OrchSettings | None = None) -> CoreSpec:
    """A spec hosting :class:`OrchestratorCore` (after the node's agent core)."""
    settings = settings or OrchSettings()

    def build(port: Port) -> OrchestratorCore:
        return OrchestratorCore(port, vloop, settings)

    return build


def orchestrator_of(node: SimNode) -> OrchestratorCore | None:
    return node.core_of(ORCH, OrchestratorCore) if node.up else None
