"""Prometheus metrics of the orchestrator, in the shapes of superfly/fsm's.

superfly/fsm exports ``fsm_action_count`` / ``fsm_action_duration_seconds`` (a run, labelled
``action, resource, status, kind``) and ``fsm_transition_count`` /
``fsm_transition_duration_seconds`` (a step attempt, labelled ``action, state, resource,
status``; ``state`` is the step's name), with counters not ending in ``_total`` and the same
buckets; they are exported here under those names and labels so dashboards written for flyd's
library read them. What fsm does not export has ``orch_`` names: runs started, step retries,
active runs, machines by state and driver call latencies.

Counts are kept by an :class:`~.engine.EngineObserver` and a timing wrapper around the driver,
on the event loop, with the orchestrator's injected clock; the gauges (active runs, machines by
state) are read at scrape time. ``families()`` returns the families in the form
``corrosion.surfaces.metrics.render`` prints: the agent's ``/metrics`` includes them when it hosts
the orchestrator (``corrosion.runtime.extensions``), and an application embedding an
``Orchestrator`` alone serves them with ``corrosion.surfaces.metrics.start_families``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from corrosion.runtime.extensions import MetricFamily
from corrosion.runtime.telemetry import BUCKETS, Histogram
from corrosion.surfaces.metrics import histogram_samples

from .clock import Clock
from .documents import Documents
from .drivers.base import ExitStatus, InstanceSpec, InstanceStatus
from .engine import Engine, EngineObserver, RunInfo, RunResult
from .migrations import Migrations


class Orchestrator(Protocol):
    """What the gauges read of ``service.Orchestrator`` (not imported: it imports this)."""

    engine: Engine | None
    docs: Documents
    migrations: Migrations | None


# superfly/fsm's buckets (seconds) for actions and transitions
FSM_BUCKETS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 30, 60, 150, 300, 600, 1200)
RESOURCE = "machine"  # fsm's ``resource`` label: the kind of thing the runs act on

# counters named as fsm names them (without ``_total``)
FSM_FAMILIES: dict[str, str] = {
    "fsm_action_count": "counter",
    "fsm_action_duration_seconds": "histogram",
    "fsm_transition_count": "counter",
    "fsm_transition_duration_seconds": "histogram",
}
_STATUS = {"succeeded": "ok", "failed": "failed", "cancelled": "cancelled"}


class OrchestratorMetrics(EngineObserver):
    """Counts runs, step attempts and driver calls as they happen; passes every engine event
    on to ``inner`` (the observer the orchestrator was given, if any)."""

    def __init__(self, clock: Clock, inner: EngineObserver | None = None) -> None:
        self.clock = clock
        self.inner = inner
        self.runs_started: Counter[tuple[str, bool]] = Counter()  # (action, resumed)
        self.actions: Counter[tuple[str, str, str]] = Counter()  # (action, status, kind)
        self.action_seconds: dict[tuple[str, str, str], Histogram] = {}
        self.transitions: Counter[tuple[str, str, str]] = Counter()  # (action, step, status)
        self.transition_seconds: dict[tuple[str, str, str], Histogram] = {}
        self.retries: Counter[tuple[str, str]] = Counter()  # (action, step)
        self.driver_seconds: dict[tuple[str, str], Histogram] = {}  # (call, outcome)
        self._created: dict[str, float] = {}  # run id -> when it was created
        self._step_began: dict[str, float] = {}  # run id -> when its current attempt began

    # --- the engine's events --------------------------------------------------------------

    def run_started(self, info: RunInfo) -> None:
        self.runs_started[(info.action, info.resumed)] += 1
        self._created[info.run_id] = info.created_at
        if self.inner is not None:
            self.inner.run_started(info)

    def step_started(self, info: RunInfo, step: str, is_restart: bool, retry: int) -> None:
        self._step_began[info.run_id] = self.clock.now()
        if self.inner is not None:
            self.inner.step_started(info, step, is_restart, retry)

    def step_completed(self, info: RunInfo, step: str) -> None:
        self._transition(info, step, "ok")
        if self.inner is not None:
            self.inner.step_completed(info, step)

    def step_failed(self, info: RunInfo, step: str, error: BaseException, retry: int) -> None:
        self._transition(info, step, "error")
        self.retries[(info.action, step)] += 1
        if self.inner is not None:
            self.inner.step_failed(info, step, error, retry)

    def step_halted(self, info: RunInfo, step: str, kind: str) -> None:
        self._transition(info, step, kind)
        halted = getattr(self.inner, "step_halted", None)  # an observer from before this hook
        if halted is not None:
            halted(info, step, kind)

    def run_finished(self, result: RunResult) -> None:
        status = _STATUS.get(result.status.value, result.status.value)
        kind = result.error.kind if result.error is not None else ""
        key = (result.action, status, kind)
        self.actions[key] += 1
        created = self._created.pop(result.run_id, None)
        self._step_began.pop(result.run_id, None)
        if created is not None:
            seconds = max(0.0, self.clock.now() - created)
            self.action_seconds.setdefault(key, Histogram(FSM_BUCKETS)).observe(seconds)
        if self.inner is not None:
            self.inner.run_finished(result)

    def _transition(self, info: RunInfo, step: str, status: str) -> None:
        key = (info.action, step, status)
        self.transitions[key] += 1
        began = self._step_began.pop(info.run_id, None)
        if began is not None:
            seconds = max(0.0, self.clock.now() - began)
            self.transition_seconds.setdefault(key, Histogram(FSM_BUCKETS)).observe(seconds)

    def driver_call(self, call: str, outcome: str, seconds: float) -> None:
        key = (call, outcome)
        self.driver_seconds.setdefault(key, Histogram(BUCKETS)).observe(max(0.0, seconds))

    # --- scraping -------------------------------------------------------------------------

    def families(self, orch: Orchestrator | None = None) -> list[MetricFamily]:
        """Every family; the gauges of ``orch`` (active runs, machines by state) when given."""
        fams: list[MetricFamily] = [
            ("fsm_action_count", "counter", "Runs finished, by action, status and error kind.",
             [(_labels(a, s, k), float(n)) for (a, s, k), n in sorted(self.actions.items())]),
            ("fsm_action_duration_seconds", "histogram",
             "Seconds from a run's creation to its end, by action, status and error kind.",
             _histograms(self.action_seconds, lambda key: _labels(*key))),
            ("fsm_transition_count", "counter",
             "Step attempts, by action, step (state) and status (ok, error, or the halt kind).",
             [({"action": a, "state": st, "resource": RESOURCE, "status": s}, float(n))
              for (a, st, s), n in sorted(self.transitions.items())]),
            ("fsm_transition_duration_seconds", "histogram",
             "Seconds one step attempt took, by action, step (state) and status.",
             _histograms(self.transition_seconds, lambda key: {
                 "action": key[0], "state": key[1], "resource": RESOURCE, "status": key[2]})),
            ("orch_runs_started_total", "counter",
             "Runs started, by action; resumed=true: resumed after a restart of the worker.",
             [({"action": a, "resumed": str(r).lower()}, float(n))
              for (a, r), n in sorted(self.runs_started.items())]),
            ("orch_step_retries_total", "counter", "Step attempts that failed and were retried "
             "(or exhausted the retries), by action and step.",
             [({"action": a, "step": st}, float(n))
              for (a, st), n in sorted(self.retries.items())]),
            ("orch_driver_call_duration_seconds", "histogram",
             "Seconds a driver call took, by call and outcome (ok or error).",
             _histograms(self.driver_seconds, lambda key: {"call": key[0], "outcome": key[1]})),
        ]  # fmt: skip
        if orch is not None:
            fams += _gauges(orch)
        return fams


def _labels(action: str, status: str, kind: str) -> dict[str, str]:
    return {"action": action, "resource": RESOURCE, "status": status, "kind": kind}


def _histograms(by_key: dict[Any, Histogram], labels: Callable[[Any], dict[str, str]]) -> list[Any]:
    return [s for key in sorted(by_key) for s in histogram_samples(by_key[key], labels(key))]


def _gauges(orch: Orchestrator) -> list[MetricFamily]:
    active: Counter[tuple[str, str]] = Counter()
    if orch.engine is not None:
        for info in orch.engine.list_runs():
            active[(info.action, info.state)] += 1
    states: Counter[str] = Counter()
    for mid in orch.docs.ids():
        doc = orch.docs.find(mid)
        if doc is not None:
            states[str(doc.get("state"))] += 1
    fams: list[MetricFamily] = []
    mig = orch.migrations
    if mig is not None:
        fams += [
            ("orch_machine_db_schema", "gauge", "Machines by the schema version and state "
             "(current, pending, migration_failed) of their own database (step log).",
             [({"version": str(v), "state": st}, float(n))
              for (v, st), n in sorted(mig.counts().items())]),
            ("orch_machine_db_migrations_total", "counter", "Step-log migrations since start, "
             "by result (ok, or failed: the database was left as it was).",
             [({"result": "ok"}, float(mig.migrated)), ({"result": "failed"}, float(mig.failed))]),
        ]  # fmt: skip
    return fams + [
        ("orch_runs_active", "gauge", "Runs not finished, by action and state (queued, running).",
         [({"action": a, "state": s}, float(n)) for (a, s), n in sorted(active.items())]),
        ("orch_machines", "gauge", "Machines of this worker, by state.",
         [({"state": s}, float(n)) for s, n in sorted(states.items())]),
    ]  # fmt: skip


class TimedDriver:
    """A driver whose calls are timed into ``metrics`` (``wait``, which lasts as long as the
    machine runs, is not); every other attribute is the wrapped driver's, read and written
    through, so code holding the orchestrator's driver still configures the real one."""

    def __init__(self, inner: Any, metrics: OrchestratorMetrics) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_metrics", metrics)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_inner"), name, value)

    async def _timed(self, call: str, *args: Any, **kwargs: Any) -> Any:
        metrics: OrchestratorMetrics = object.__getattribute__(self, "_metrics")
        fn = getattr(object.__getattribute__(self, "_inner"), call)
        began = metrics.clock.now()
        outcome = "error"
        try:
            result = await fn(*args, **kwargs)
            outcome = "ok"
            return result
        finally:
            metrics.driver_call(call, outcome, metrics.clock.now() - began)

    async def prepare(self, spec: InstanceSpec) -> None:
        await self._timed("prepare", spec)

    async def create(self, spec: InstanceSpec) -> None:
        await self._timed("create", spec)

    async def start(self, instance_id: str) -> None:
        await self._timed("start", instance_id)

    async def signal(self, instance_id: str, sig: int) -> None:
        await self._timed("signal", instance_id, sig)

    async def stop(self, instance_id: str, *args: Any, **kwargs: Any) -> ExitStatus:
        result: ExitStatus = await self._timed("stop", instance_id, *args, **kwargs)
        return result

    async def destroy(self, instance_id: str) -> None:
        await self._timed("destroy", instance_id)

    async def status(self, instance_id: str) -> InstanceStatus:
        result: InstanceStatus = await self._timed("status", instance_id)
        return result
