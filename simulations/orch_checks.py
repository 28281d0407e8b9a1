"""Invariants of orchestrator workers in a simulated world (issue 6's three checkers).

* :class:`OneActiveRun` (safety, every event): at most one run per (machine, action) is
  executing at any moment, across every process that ever ran on the worker. The engine's rule
  is stronger - runs of one machine execute one at a time, queued runs wait - so a run starting
  a step while another run of the same machine is mid-way is reported too, as is any step started
  by a process after it was killed (a zombie would execute a run its successor resumed). A
  periodic audit also reads each live engine's ``list_runs``.
* :class:`StepsOnce` (safety, every event): a step whose COMPLETE the log acknowledged
  (``step_completed``) never starts again, a run reported finished never resumes, and a run that
  succeeded leaves its machine in the state it promised (``operations.target_state``). Only the
  step a kill or power cut interrupted before its COMPLETE runs again (told ``is_restart``); the
  engine marks no step as safe to redo once complete, so none is exempt.
* :class:`RunsFinish` (liveness): after heal and quiet every accepted run has finished, no
  engine holds a live run, no step log has an unfinished run, and no machine is left in a
  transitional state (starting, stopping, ...); a machine left started has a running instance
  (an exit nobody handled leaves it started with nothing running).
* :class:`PublishedRows` (liveness): every live node's replica of the ``machines`` table equals
  the union of every worker's truth - the row ``orchestrator.publish.machine_row`` makes of each
  of its current machine documents - and holds nothing else.

They read orchestrator processes through ``OrchestratorCore`` and see their events
(:class:`~simulations.orch_core.OrchEvent`) through the world's event hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator import machine as m
from orchestrator.drivers import InstanceState
from orchestrator.publish import COLUMNS, MACHINES_TABLE, machine_row

from .agent_core import agent_of
from .checkers import Checker, SettlingChecker
from .orch_core import OrchEvent, orchestrator_of

if TYPE_CHECKING:
    from .node import SimNode
    from .world import World

__all__ = ["OneActiveRun", "PublishedRows", "RunsFinish", "StepsOnce", "orchestrator_checkers"]

STABLE = (m.CREATED, m.STARTED, m.STOPPED, m.FAILED, m.DESTROYED)


class OneActiveRun(Checker):
    name = "orch-one-active-run"

    def __init__(self, audit_every: float = 1.0) -> None:
        self.audit_every = audit_every
        # (worker, machine) -> (run id, action, process) of the run executing steps
        self.executing: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.dead: dict[tuple[str, str], None] = {}

    def attach(self, world: World) -> None:
        self.world = world
        world.event_hooks.append(self._on_event)
        world.every(self.audit_every, lambda now: self._audit(world))

    def _on_event(self, node: SimNode, channel: str, event: Any) -> None:
        if type(event) is not OrchEvent:
            return
        world = self.world
        e = event
        if e.kind == "down":
            self.dead[(e.worker, e.proc)] = None
            for key, (_, _, proc) in list(self.executing.items()):
                if key[0] == e.worker and proc == e.proc:
                    del self.executing[key]
            return
        if e.kind not in ("step_started", "run_finished", "run_started"):
            return
        if (e.worker, e.proc) in self.dead:
            world.fail(
                self.name,
                f"{e.worker} process {e.proc} was killed but its run "
                f"{e.run_id} ({e.action} on {e.machine_id}) went on: {e.kind} {e.step}",
            )
            return
        key = (e.worker, e.machine_id)
        if e.kind == "run_finished":
            held = self.executing.get(key)
            if held is not None and held[0] == e.run_id:
                del self.executing[key]
            return
        if e.kind != "step_started":
            return
        held = self.executing.get(key)
        if held is None or held[0] == e.run_id:
            self.executing[key] = (e.run_id, e.action, e.proc)
            return
        other, action, _ = held
        if action == e.action:
            world.fail(
                self.name,
                f"two active {e.action} runs of machine {e.machine_id} on "
                f"{e.worker}: {other} and {e.run_id} (step {e.step})",
            )
        else:
            world.fail(
                self.name,
                f"runs of machine {e.machine_id} on {e.worker} interleave: "
                f"{action} {other} is executing when {e.action} {e.run_id} starts "
                f"step {e.step}",
            )

    def _audit(self, world: World) -> None:
        for node in world.nodes:
            core = orchestrator_of(node)
            orch = core.orch if core is not None else None
            if orch is None or orch.engine is None:
                continue
            seen: dict[tuple[str, str], str] = {}
            for run in orch.engine.list_runs():
                if run.state != "running":
                    continue
                key = (run.machine_id, run.action)
                if key in seen:
                    world.fail(
                        self.name,
                        f"{node.name}'s engine lists two running {run.action} "
                        f"runs of {run.machine_id}: {seen[key]} and {run.run_id}",
                    )
                seen[key] = run.run_id


class StepsOnce(Checker):
    name = "orch-steps-once"

    def __init__(self) -> None:
        # (worker, run id) -> (machine, action, promised state) of every run a live process
        # accepted or resumed; the steps the log acknowledged complete; the finished runs
        self.runs: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.completed: dict[tuple[str, str], dict[str, None]] = {}
        self.finished: dict[tuple[str, str], str] = {}
        self.redone = 0

    def attach(self, world: World) -> None:
        self.world = world
        world.event_hooks.append(self._on_event)

    def _on_event(self, node: SimNode, channel: str, event: Any) -> None:
        if type(event) is not OrchEvent:
            return
        e = event
        key = (e.worker, e.run_id)
        if e.kind == "step_completed":
            self.completed.setdefault(key, {})[e.step] = None
        elif e.kind == "step_started":
            if e.step in self.completed.get(key, {}):
                self.redone += 1
                self.world.fail(
                    self.name,
                    f"{e.worker} process {e.proc} starts step {e.step} of {e.action} run "
                    f"{e.run_id} on {e.machine_id} again ({e.detail}): its COMPLETE was "
                    "acknowledged",
                )
        elif e.kind == "run_started":
            if key in self.finished:
                self.world.fail(
                    self.name,
                    f"{e.worker} process {e.proc} resumes {e.action} run {e.run_id} on "
                    f"{e.machine_id}, which finished ({self.finished[key]})",
                )
            self.runs.setdefault(key, (e.machine_id, e.action, e.target))
        elif e.kind == "run_finished":
            self.finished[key] = e.detail
            target = self.runs.get(key, ("", "", ""))[2]
            if e.detail == "succeeded" and target:
                core = orchestrator_of(node)
                orch = core.orch if core is not None else None
                doc = orch.docs.find(e.machine_id) if orch is not None else None
                state = m.DESTROYED if doc is None else doc["state"]
                if state != target:
                    self.world.fail(
                        self.name,
                        f"{e.action} run {e.run_id} on {e.machine_id} ({e.worker}) succeeded "
                        f"but left the machine {state}, not {target} as it promised",
                    )


class RunsFinish(SettlingChecker):
    name = "orch-runs-finish"

    def __init__(self, deadline: float = 180.0) -> None:
        super().__init__(deadline)
        self.pending: dict[str, tuple[str, str, str]] = {}  # run id -> (worker, machine, action)

    def attach(self, world: World) -> None:
        world.event_hooks.append(self._on_event)

    def _on_event(self, node: SimNode, channel: str, event: Any) -> None:
        if type(event) is not OrchEvent:
            return
        if event.kind == "run_started":
            self.pending[event.run_id] = (event.worker, event.machine_id, event.action)
        elif event.kind == "run_finished":
            self.pending.pop(event.run_id, None)

    def problems(self, world: World) -> list[str]:
        out = []
        for node in world.nodes:
            core = orchestrator_of(node)
            orch = core.orch if core is not None else None
            if core is None or orch is None or orch.engine is None or orch.store is None:
                out.append(f"{node.name}: no orchestrator process")
                continue
            live = orch.engine.list_runs()
            if live:
                r = live[0]
                out.append(
                    f"{node.name}: {len(live)} live run(s), e.g. {r.action} {r.run_id} "
                    f"on {r.machine_id} at {r.step} (retry {r.retry_count})"
                )
            for mid in orch.machine_ids():
                if orch.engine.busy(mid):
                    out.append(f"{node.name}: machine {mid} is busy")
                active = orch.store.log(mid).active_runs()
                if active:
                    out.append(
                        f"{node.name}: machine {mid}'s step log has {len(active)} "
                        f"unfinished run(s), e.g. {active[0].action} {active[0].run_id}"
                    )
                doc = orch.doc(mid)
                state = doc["state"]
                if state not in STABLE:
                    out.append(f"{node.name}: machine {mid} is left {state}")
                inst = core.driver.instances.get(doc["instance_id"])
                running = inst is not None and inst.state is InstanceState.RUNNING
                if state == m.STARTED and not running:
                    what = "absent" if inst is None else inst.state.value
                    out.append(
                        f"{node.name}: machine {mid} is started but its instance "
                        f"{doc['instance_id']} is {what} (an exit was lost)"
                    )
        for run_id, (worker, mid, action) in sorted(self.pending.items()):
            out.append(f"run {run_id} ({action} on {mid}, {worker}) never finished")
        return out


class PublishedRows(SettlingChecker):
    name = "orch-published-rows"

    def __init__(self, deadline: float = 180.0) -> None:
        super().__init__(deadline)

    @staticmethod
    def truth(world: World) -> dict[str, tuple[Any, ...]] | None:
        """Every worker's machines as rows (None while some worker's process is down)."""
        out: dict[str, tuple[Any, ...]] = {}
        for node in world.nodes:
            core = orchestrator_of(node)
            orch = core.orch if core is not None else None
            if orch is None:
                return None
            for mid in orch.machine_ids():
                doc = orch.published_doc(mid)  # with its database's schema status
                if doc is not None:
                    row = machine_row(doc)
                    out[mid] = tuple(row[c] for c in COLUMNS)
        return out

    @staticmethod
    def replica(node: SimNode) -> dict[str, tuple[Any, ...]] | None:
        agent = agent_of(node)
        if agent is None:
            return None
        cols = ", ".join(COLUMNS)
        rows = agent.conn.execute(f"SELECT {cols} FROM {MACHINES_TABLE} ORDER BY id")
        return {r[0]: tuple(r) for r in rows}

    def problems(self, world: World) -> list[str]:
        truth = self.truth(world)
        if truth is None:
            return ["some worker has no orchestrator process"]
        out = []
        for node in world.nodes:
            rows = self.replica(node)
            if rows is None:
                out.append(f"{node.name}: no agent")
                continue
            if rows == truth:
                continue
            missing = sorted(k for k in truth if k not in rows)
            extra = sorted(k for k in rows if k not in truth)
            stale = sorted(k for k in truth if k in rows and rows[k] != truth[k])
            detail = []
            if missing:
                detail.append(f"missing {missing[:3]}")
            if extra:
                detail.append(f"extra {extra[:3]}")
            for k in stale[:2]:
                diff = [
                    f"{c}={rows[k][i]!r} (truth {truth[k][i]!r})"
                    for i, c in enumerate(COLUMNS)
                    if rows[k][i] != truth[k][i]
                ]
                detail.append(f"stale {k}: {', '.join(diff)}")
            out.append(
                f"{node.name}'s replica differs from the workers' truth: " + "; ".join(detail)
            )
        return out


def orchestrator_checkers(deadline: float = 180.0) -> list[Checker]:
    return [OneActiveRun(), StepsOnce(), RunsFinish(deadline), PublishedRows(deadline)]
