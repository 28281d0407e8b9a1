"""The durable FSM engine (flyd's model): operations are named step lists, progress is a log.

Theory of operation
-------------------
An *operation* (``register("start", [("mark_starting", f), ("boot", g), ...])``) is a fixed list of
named async steps plus finalizers. ``start(machine_id, action, request)`` writes the run's START
(input and step names) to the machine's step log and returns its run id; the run then executes in
the background.

Rules, and where they are enforced:

* **Log before moving on.** A step's COMPLETE (with the accumulated response) is appended after the
  step returns and before the next step begins (``_run_step``). Steps therefore run *at least once*:
  a crash between a step's side effect and its COMPLETE re-runs that step, and only that step.
* **Resume is a checklist, not a replay.** On ``__aenter__`` every run without FINISH is rebuilt
  from its events (``MachineLog.active_runs``) and continues at its first step without COMPLETE.
  Its steps see ``ctx.is_restart = True`` and must be idempotent. A step name the code no longer
  registers is a no-op, so runs started by an older release still finish.
* **One active run per (machine, action)**, checked in the START transaction
  (``MachineLog.start_run``); ``queue=True`` lets a run wait behind the active one instead.
  Runs of one machine execute one at a time in START order (``_drain``), so steps of different
  operations on a machine never interleave.
* **Errors retry** with exponential backoff on the injected clock (``Backoff``: 100 ms doubling to
  5 s), forever unless the operation sets ``max_retries``. An ERROR event is logged when the error
  text changes, and on every failure toward a ``max_retries`` limit (the count is what a resumed
  run goes on from). :class:`AbortError` / :class:`UnrecoverableError`, exhausted retries and
  :meth:`cancel` *halt* the run: CANCEL is appended, remaining steps are skipped, finalizers run
  with the run's error, then FINISH.
* **Finalizers** are logged like steps (``finally:<name>``), retried on error, and run exactly as
  far as they got before a crash.
* **Traced like superfly/fsm** (:mod:`.tracing`): ``start`` opens an ``accept`` span in the
  caller's context and saves its context with START; each process executing the run opens a run
  span under it (``fsm.resumed`` after a restart), and each step attempt a span under that, current
  while the step runs and until its COMPLETE is written, failed with the step's error.

The engine never reads the wall clock or sleeps on its own: ``clock`` is injected, ids come from an
injected :class:`IdFactory`, and with ``offload=False`` storage calls run inline (the simulator).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any

import anyio
import anyio.abc
from opentelemetry import trace
from opentelemetry.trace import Span

from . import tracing
from .clock import Clock, SystemClock, wait_until
from .errors import (
    EngineClosedError,
    HaltError,
    UnknownActionError,
    UnknownMachineError,
    UnknownRunError,
)
from .ids import IdFactory
from .steplog import EventKind, MachineLog, RunRecord, RunState, RunStatus
from .store import MachineStore

log = logging.getLogger(__name__)

StepFn = Callable[["StepContext"], Awaitable[Mapping[str, Any] | None]]
Commit = Callable[[Mapping[str, Any] | None], Awaitable[None]]
DocCommitter = Callable[[str, list[Callable[[dict[str, Any]], object]], Commit], Awaitable[None]]
FINALLY = "finally:"


# --- public data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn


@dataclass(frozen=True)
class Operation:
    """A registered action: its ordered steps, its finalizers, its retry limit."""

    action: str
    steps: tuple[Step, ...]
    finalizers: tuple[Step, ...] = ()
    max_retries: int | None = None

    def step(self, name: str) -> Step | None:
        for s in self.steps:
            if s.name == name:
                return s
        return None

    def finalizer(self, name: str) -> Step | None:
        for s in self.finalizers:
            if s.name == name:
                return s
        return None


@dataclass(frozen=True)
class RunError:
    """Why a run halted: ``kind`` is abort, unrecoverable, retries_exhausted or cancelled."""

    kind: str
    message: str
    step: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunError:
        return cls(str(d.get("kind", "halt")), str(d.get("message", "")), d.get("step"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "step": self.step}


@dataclass
class StepContext:
    """What a step (or finalizer) is told. ``response`` is a copy of the accumulated response;
    a step returns a mapping of keys to merge into it (or None)."""

    run_id: str
    machine_id: str
    action: str
    step: str
    request: Mapping[str, Any]
    response: dict[str, Any]
    is_restart: bool
    retry_count: int
    clock: Clock
    error: RunError | None = None
    staged: list[Callable[[dict[str, Any]], object]] = field(default_factory=list)

    def stage(self, change: Callable[[dict[str, Any]], object]) -> None:
        """Change the machine document together with this step's COMPLETE (one transaction):
        ``change`` mutates the current document when the step has returned (the engine's
        ``doc_committer`` decides what "current" is; by default the stored one). Dropped if
        the step raises."""
        self.staged.append(change)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    machine_id: str
    action: str
    status: RunStatus
    response: Mapping[str, Any]
    error: RunError | None

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.SUCCEEDED


@dataclass(frozen=True)
class RunInfo:
    """A live run as :meth:`Engine.list_runs` reports it."""

    run_id: str
    machine_id: str
    action: str
    state: str  # "queued" (waiting behind another run of the machine) or "running"
    step: str | None
    retry_count: int
    created_at: float
    resumed: bool
    request: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Backoff:
    """Exponential backoff: ``initial * multiplier**(retry-1)`` capped at ``maximum`` seconds,
    optionally scaled by a random factor in ``[1 - jitter, 1]`` from the injected RNG."""

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def delay(self, retry: int) -> float:
        base = min(self.maximum, self.initial * self.multiplier ** max(0, retry - 1))
        if self.jitter:
            base *= 1.0 - self.jitter * self.rng.random()
        return base


class EngineObserver:
    """Hooks for tracing and checkers (the crash tests and the simulator); all no-ops here."""

    def run_started(self, info: RunInfo) -> None: ...

    def step_started(self, info: RunInfo, step: str, is_restart: bool, retry: int) -> None: ...

    def step_completed(self, info: RunInfo, step: str) -> None: ...

    def step_failed(self, info: RunInfo, step: str, error: BaseException, retry: int) -> None: ...

    def step_halted(self, info: RunInfo, step: str, kind: str) -> None:
        """The step raised a ``HaltError`` of ``kind`` (abort, unrecoverable, ...)."""

    def run_finished(self, result: RunResult) -> None: ...


def _run_fields(machine_id: str, run_id: str, action: str) -> dict[str, Any]:
    return {"run_id": run_id, "machine_id": machine_id, "action": action}


def _span_fields(machine_id: str, run_id: str, action: str) -> dict[str, Any]:
    return {"machine.id": machine_id, "fsm.run_id": run_id, "fsm.action": action}


def _log_finished(result: RunResult) -> None:
    fields = _run_fields(result.machine_id, result.run_id, result.action)
    fields["status"] = result.status.value
    what = f"run {result.run_id} {result.status.value}: {result.action} on {result.machine_id}"
    if result.error is None:
        log.info("%s", what, extra={"fields": fields})
        return
    fields["error"] = result.error.to_dict()
    level = logging.INFO if result.status is RunStatus.CANCELLED else logging.WARNING
    step = f" (step {result.error.step})" if result.error.step else ""
    log.log(level, "%s: %s%s", what, result.error.message, step, extra={"fields": fields})


# --- the engine ---------------------------------------------------------------------------------


@dataclass
class _Live:
    machine_id: str
    state: RunState
    resumed: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    result: RunResult | None = None
    scope: anyio.CancelScope | None = None
    step: str | None = None
    retry: int = 0
    running: bool = False
    finalizing: bool = False
    span: Span = trace.INVALID_SPAN  # the run's span in this process

    def info(self) -> RunInfo:
        r = self.state.record
        return RunInfo(
            run_id=r.run_id,
            machine_id=self.machine_id,
            action=r.action,
            state="running" if self.running else "queued",
            step=self.step,
            retry_count=self.retry,
            created_at=r.created_at,
            resumed=self.resumed,
            request=MappingProxyType(dict(r.request)),
        )


class Engine:
    """Runs registered operations durably over a :class:`MachineStore`.

    Use as ``async with Engine(store, ...) as engine:``; entering resumes unfinished runs, leaving
    stops executing (runs are *not* cancelled in the log: they resume on the next start).
    """

    def __init__(
        self,
        store: MachineStore,
        *,
        clock: Clock | None = None,
        ids: IdFactory | None = None,
        backoff: Backoff | None = None,
        offload: bool = True,
        observer: EngineObserver | None = None,
        finished_cache: int = 10_000,
        doc_committer: DocCommitter | None = None,
    ) -> None:
        self.store = store
        self.clock = clock if clock is not None else SystemClock()
        self.ids = ids if ids is not None else IdFactory(self.clock)
        self.backoff = backoff if backoff is not None else Backoff()
        self.observer = observer if observer is not None else EngineObserver()
        self._offload = offload
        self._doc_committer = doc_committer
        self._ops: dict[str, Operation] = {}
        # actions whose resumed runs found no operation and ran as retired (see register)
        self._ran_retired: set[str] = set()
        self._live: dict[str, _Live] = {}
        self._queues: dict[str, deque[_Live]] = {}
        self._finished: OrderedDict[str, RunResult] = OrderedDict()
        self._finishing: dict[str, int] = {}
        self._finished_cap = finished_cache
        self._finish_hooks: list[Callable[[RunResult], Awaitable[None]]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._closing = False

    # --- registration -------------------------------------------------------------------------

    def register(
        self,
        action: str,
        steps: Sequence[Step | tuple[str, StepFn]],
        *,
        finalizers: Sequence[Step | tuple[str, StepFn]] = (),
        max_retries: int | None = None,
    ) -> Operation:
        """Register an operation; step names must be unique within it. Register every
        operation before entering the engine: a run resumed at start whose action has no
        operation finishes as retired (its steps no-ops), and registering that action later is
        refused."""

        def norm(items: Iterable[Step | tuple[str, StepFn]]) -> tuple[Step, ...]:
            out = tuple(i if isinstance(i, Step) else Step(i[0], i[1]) for i in items)
            names = [s.name for s in out]
            if len(set(names)) != len(names):
                raise ValueError(f"operation {action!r}: duplicate step names in {names}")
            for s in out:
                if not s.name or s.name.startswith(FINALLY):
                    raise ValueError(f"operation {action!r}: invalid step name {s.name!r}")
            return out

        if not steps:
            raise ValueError(f"operation {action!r} needs at least one step")
        if action in self._ran_retired:
            raise ValueError(
                f"operation {action!r} registered after the engine started: runs of it that it "
                "resumed found no operation and finished as retired; register every operation "
                "before entering the engine"
            )
        op = Operation(action, norm(steps), norm(finalizers), max_retries)
        self._ops[action] = op
        return op

    def operation(self, action: str) -> Operation:
        try:
            return self._ops[action]
        except KeyError:
            raise UnknownActionError(f"unknown action {action!r}") from None

    def on_finish(self, hook: Callable[[RunResult], Awaitable[None]]) -> None:
        """Call ``hook`` after each run's FINISH, before that machine's next run starts.

        Hooks run from ``__aenter__`` on: a run it resumes can finish before it returns, so a
        hook must not rely on anything its owner sets once the engine is entered. They are not
        durable: a crash, or the engine stopping, between a run's FINISH and its hooks skips
        them (the run stays finished), so their owner must redo a hook's effect from the log on
        its next start."""
        self._finish_hooks.append(hook)

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._closing = False
        try:
            await self.resume()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closing = True
        assert self._tg is not None and self._stack is not None
        self._tg.cancel_scope.cancel()
        stack, self._stack = self._stack, None
        try:
            return await stack.__aexit__(exc_type, exc, tb)
        finally:
            for live in self._live.values():  # they resume, under the same trace, next start
                live.span.set_attribute("fsm.suspended", True)
                live.span.end()
            self._tg = None
            self._live.clear()
            self._queues.clear()

    async def resume(self) -> int:
        """Schedule every unfinished run found on disk; returns how many."""
        count = 0
        for machine_id in await self._io(self.store.machine_ids):
            log_ = self.store.log(machine_id)
            for state in await self._io(log_.active_runs):
                if state.run_id in self._live:
                    continue
                self._enqueue(machine_id, state, resumed=True)
                count += 1
        return count

    # --- public operations --------------------------------------------------------------------

    async def start(
        self,
        machine_id: str,
        action: str,
        request: Mapping[str, Any] | None = None,
        *,
        queue: bool = False,
        doc: Mapping[str, Any] | None = None,
    ) -> str:
        """Log a new run's START and schedule it; returns the run id.

        Raises AlreadyRunningError when ``action`` already has an active run on the machine
        (unless ``queue``). ``doc`` replaces the machine document in the START transaction.
        """
        if self._tg is None or self._closing:
            raise EngineClosedError("the engine is not running")
        op = self.operation(action)
        req = dict(request or {})
        try:
            json.dumps(req)
        except (TypeError, ValueError) as e:
            raise ValueError(f"run request must be JSON-serializable: {e}") from None
        run_id = self.ids.ulid()
        with tracing.tracer().start_as_current_span(
            f"machine.{action}.accept", attributes=_span_fields(machine_id, run_id, action)
        ):
            record = RunRecord(
                run_id=run_id,
                action=action,
                steps=tuple(s.name for s in op.steps),
                finalizers=tuple(s.name for s in op.finalizers),
                request=req,
                created_at=self.clock.now(),
                trace=tracing.current_carrier(),
            )
            log_ = self.store.log(machine_id)
            seq = await self._io(log_.start_run, record, exclusive=not queue, doc=doc)
        if self._tg is None or self._closing:
            # the engine stopped while the START was being written: the run is in the log, and
            # the next engine on this store resumes it like any run a stop interrupted
            raise EngineClosedError(
                f"the engine stopped while run {record.run_id} ({action}) was being started; "
                "it is logged and resumes when the engine starts again"
            )
        self._enqueue(machine_id, RunState(record=record, seq=seq), resumed=False)
        return record.run_id

    def list_runs(self, machine_id: str | None = None) -> list[RunInfo]:
        """Live runs (running or queued), in START order per machine."""
        out: list[RunInfo] = []
        for mid in sorted(self._queues):
            if machine_id is None or mid == machine_id:
                out.extend(live.info() for live in self._queues[mid])
        return out

    def active_action(self, machine_id: str, action: str) -> str | None:
        """The run id of the oldest live ``action`` run on the machine, if any."""
        for live in self._queues.get(machine_id, ()):
            if live.state.action == action and not live.done.is_set():
                return live.state.run_id
        return None

    def busy(self, machine_id: str) -> bool:
        """Whether the machine has live runs, or a finished run whose finish hooks still run."""
        return bool(self._queues.get(machine_id)) or machine_id in self._finishing

    async def wait(
        self, run_id: str, *, machine_id: str | None = None, timeout: float | None = None
    ) -> RunResult:
        """Wait for a run to finish and return its result. A finished run is looked up in the
        engine's memory, or in ``machine_id``'s log. Raises TimeoutError after ``timeout``."""
        live = self._live.get(run_id)
        if live is not None:
            if timeout is None:
                await live.done.wait()
            elif not await wait_until(self.clock, live.done.wait, timeout):
                raise TimeoutError(f"run {run_id} still running after {timeout} s")
            assert live.result is not None
            return live.result
        cached = self._finished.get(run_id)
        if cached is not None:
            return cached
        if machine_id is not None:
            try:
                state = await self._io(self.store.log(machine_id).get_run, run_id)
            except UnknownMachineError:
                state = None
            if state is not None and state.status is not RunStatus.ACTIVE:
                return self._result(machine_id, state)
        raise UnknownRunError(f"run {run_id} not found")

    async def cancel(self, run_id: str, reason: str = "cancelled") -> bool:
        """Halt a live run: CANCEL is logged now, the step in flight is cancelled, remaining
        steps are skipped and finalizers run. False if the run is not live or already halting."""
        live = self._live.get(run_id)
        if live is None or live.done.is_set() or live.finalizing or live.state.halt is not None:
            return False
        halt = RunError("cancelled", reason, live.step).to_dict()
        live.state.halt = halt
        log_ = self.store.log(live.machine_id)
        await self._io(
            log_.append, run_id, EventKind.CANCEL, step=live.step, payload=halt, at=self.clock.now()
        )
        if live.scope is not None:
            live.scope.cancel()
        return True

    # --- execution ----------------------------------------------------------------------------

    async def _io(self, fn, *args, **kwargs):
        if self._offload:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
        return fn(*args, **kwargs)

    def _enqueue(self, machine_id: str, state: RunState, *, resumed: bool) -> None:
        live = _Live(machine_id=machine_id, state=state, resumed=resumed)
        attrs = _span_fields(machine_id, state.run_id, state.action)
        live.span = tracing.tracer().start_span(
            f"machine.{state.action}",
            context=tracing.context_from(state.record.trace),
            attributes={**attrs, "fsm.resumed": resumed},
        )
        self._live[state.run_id] = live
        queue = self._queues.get(machine_id)
        if queue is None:
            queue = self._queues[machine_id] = deque()
            assert self._tg is not None
            # runs carry their own trace context: the task holds none of its starter's
            self._tg.start_soon(tracing.detached, self._drain, machine_id, name=f"fsm:{machine_id}")
        queue.append(live)
        self.observer.run_started(live.info())

    async def _drain(self, machine_id: str) -> None:
        queue = self._queues[machine_id]
        try:
            while queue:
                live = queue[0]
                attempt = 0
                while True:
                    try:
                        await self._execute(live)
                        break
                    except Exception as e:  # storage failure: reload from disk and go again
                        attempt += 1
                        log.exception("run %s on %s: engine error", live.state.run_id, machine_id)
                        await self.clock.sleep(self.backoff.delay(attempt))
                        fresh = await self._io(
                            self.store.log(machine_id).get_run, live.state.run_id
                        )
                        if fresh is None:
                            raise RuntimeError(f"run {live.state.run_id} vanished") from e
                        live.state, live.resumed = fresh, True
                        if fresh.status is not RunStatus.ACTIVE:
                            self._complete(live, fresh)
                            break
                queue.popleft()
                self._finishing[machine_id] = self._finishing.get(machine_id, 0) + 1
                try:
                    for hook in self._finish_hooks:
                        assert live.result is not None
                        try:
                            # a run the hook starts (an auto-destroy) joins this run's trace
                            with trace.use_span(live.span, record_exception=False,
                                                set_status_on_exception=False):  # fmt: skip
                                await hook(live.result)
                        except Exception:
                            log.exception("finish hook failed for run %s", live.state.run_id)
                        except anyio.get_cancelled_exc_class():
                            log.debug("finish hooks of run %s interrupted: the engine is "
                                      "stopping", live.state.run_id)  # fmt: skip
                            raise
                finally:
                    self._finishing[machine_id] -= 1
                    if not self._finishing[machine_id]:
                        del self._finishing[machine_id]
        finally:
            if not queue:
                self._queues.pop(machine_id, None)

    async def _execute(self, live: _Live) -> None:
        state = live.state
        record = state.record
        op = self._ops.get(record.action)
        log_ = self.store.log(live.machine_id)
        live.running = True
        if op is None:
            self._ran_retired.add(record.action)
            log.warning("run %s: action %r is not registered; its steps finish as retired "
                        "(no-ops)", record.run_id, record.action)  # fmt: skip
        log.info(
            "run %s started: %s on %s%s",
            record.run_id,
            record.action,
            live.machine_id,
            " (resumed)" if live.resumed else "",
            extra={"fields": _run_fields(live.machine_id, record.run_id, record.action)},
        )
        for name in record.steps:
            if state.halt is not None:
                break
            if name in state.completed:
                continue
            step = op.step(name) if op is not None else None
            await self._run_step(live, log_, op, name, step.fn if step else None, None)
        live.finalizing = True
        error = RunError.from_dict(state.halt) if state.halt is not None else None
        for name in record.finalizers:
            key = FINALLY + name
            if key in state.completed:
                continue
            fin = op.finalizer(name) if op is not None else None
            await self._run_step(live, log_, op, key, fin.fn if fin else None, error)
        if error is None:
            status = RunStatus.SUCCEEDED
        elif error.kind == "cancelled":
            status = RunStatus.CANCELLED
        else:
            status = RunStatus.FAILED
        await self._io(
            log_.finish,
            record.run_id,
            status,
            error=None if error is None else error.to_dict(),
            response=state.response,
            at=self.clock.now(),
        )
        state.status = status
        self._complete(live, state)

    def _complete(self, live: _Live, state: RunState) -> None:
        live.result = self._result(live.machine_id, state)
        _log_finished(live.result)
        live.span.set_attribute("fsm.status", state.status.value)
        if live.result.error is not None:
            live.span.set_attribute("fsm.error_kind", live.result.error.kind)
            if state.status is RunStatus.FAILED:
                tracing.failed(live.span, live.result.error.message)
        live.span.end()
        self._live.pop(state.run_id, None)
        self._finished[state.run_id] = live.result
        while len(self._finished) > self._finished_cap:
            self._finished.popitem(last=False)
        live.done.set()
        self.observer.run_finished(live.result)

    @staticmethod
    def _result(machine_id: str, state: RunState) -> RunResult:
        return RunResult(
            run_id=state.run_id,
            machine_id=machine_id,
            action=state.action,
            status=state.status,
            response=MappingProxyType(dict(state.response)),
            error=RunError.from_dict(state.halt) if state.halt is not None else None,
        )

    async def _commit_from_log(self, machine_id: str, changes, commit: Commit) -> None:
        """Default committer: apply staged changes to the document as stored."""
        doc = await self._io(self.store.log(machine_id).read_doc) or {}
        for change in changes:
            change(doc)
        await commit(doc)

    async def _halt(
        self, state: RunState, log_: MachineLog, error: RunError, *, retry_count: int = 0
    ) -> None:
        """Halt the run: remember why and log CANCEL (its remaining steps are skipped)."""
        halt = error.to_dict()
        state.halt = halt
        await self._io(
            log_.append,
            state.record.run_id,
            EventKind.CANCEL,
            step=error.step,
            payload=halt,
            retry_count=retry_count,
            at=self.clock.now(),
        )

    @contextlib.contextmanager
    def _step_span(self, live: _Live, name: str, retry: int) -> Iterator[Span]:
        """One attempt's span, current while the step runs and its COMPLETE is written."""
        record = live.state.record
        attrs = {
            **_span_fields(live.machine_id, record.run_id, record.action),
            "fsm.step": name,
            "fsm.attempt": retry + 1,
            "fsm.retry_count": retry,
            "fsm.restart": live.resumed,
        }
        span = tracing.tracer().start_span(
            f"machine.{record.action}.{name}",
            context=trace.set_span_in_context(live.span),
            attributes=attrs,
        )
        with trace.use_span(
            span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ):
            try:
                yield span
            except anyio.get_cancelled_exc_class():
                span.set_attribute("fsm.interrupted", True)  # the engine is stopping
                raise

    async def _run_step(
        self,
        live: _Live,
        log_: MachineLog,
        op: Operation | None,
        name: str,
        fn: StepFn | None,
        error: RunError | None,
    ) -> None:
        """Run one step (or finalizer) until it completes or the run halts."""
        state = live.state
        record = state.record
        is_finalizer = name.startswith(FINALLY)
        retry = state.retries.get(name, 0)
        last_text: str | None = None
        delay = 0.0
        while True:
            if delay:  # the backoff after a failed attempt, outside its span
                await self.clock.sleep(delay)
            if not is_finalizer and state.halt is not None:
                return
            live.step, live.retry = name, retry
            info = live.info()
            self.observer.step_started(info, name, live.resumed, retry)
            with self._step_span(live, name, retry) as span:
                out: Mapping[str, Any] | None = None
                failure: BaseException | None = None
                ctx: StepContext | None = None
                if fn is not None:
                    ctx = StepContext(
                        run_id=record.run_id,
                        machine_id=live.machine_id,
                        action=record.action,
                        step=name[len(FINALLY) :] if is_finalizer else name,
                        request=MappingProxyType(dict(record.request)),
                        response=dict(state.response),
                        is_restart=live.resumed,
                        retry_count=retry,
                        clock=self.clock,
                        error=error,
                    )
                    try:
                        with anyio.CancelScope() as scope:
                            live.scope = scope
                            out = await fn(ctx)
                            if out is not None and not isinstance(out, Mapping):
                                raise TypeError(
                                    f"step {name} returned {type(out).__name__}, "
                                    "expected a mapping or None"
                                )
                        if scope.cancelled_caught:
                            span.set_attribute("fsm.cancelled", True)
                            return  # cancel() already logged CANCEL
                    except HaltError as e:
                        span.set_attribute("fsm.error_kind", e.kind)
                        tracing.failed(span, e)
                        if is_finalizer:
                            log.warning("finalizer %s of run %s halted: %s", name, record.run_id, e)
                        else:
                            self.observer.step_halted(info, name, e.kind)
                            await self._halt(state, log_, RunError(e.kind, str(e), name))
                            return
                    except Exception as e:  # noqa: BLE001 — a step is user code: any error fails it
                        failure = e
                    finally:
                        live.scope = None
                if failure is not None:
                    tracing.failed(span, failure)
                    retry += 1
                    self.observer.step_failed(info, name, failure, retry)
                    text = f"{type(failure).__name__}: {failure}"
                    log.debug(
                        "run %s: step %s failed (try %d): %s", record.run_id, name, retry, text
                    )
                    limit = op.max_retries if op is not None else None
                    counted = not is_finalizer and limit is not None
                    if counted and retry > limit:  # type: ignore[operator]  # counted: limit set
                        error = RunError(
                            "retries_exhausted",
                            f"{name} failed {retry} times; last: {text}",
                            name,
                        )
                        await self._halt(state, log_, error, retry_count=retry)
                        return
                    # retries toward a limit are each logged (at most max_retries), or a
                    # restart would count them from the last change of error text again
                    if text != last_text or counted:
                        await self._io(
                            log_.append,
                            record.run_id,
                            EventKind.ERROR,
                            step=name,
                            payload={"message": text},
                            retry_count=retry,
                            at=self.clock.now(),
                        )
                        last_text = text
                    state.retries[name] = retry
                    delay = self.backoff.delay(retry)
                    continue
                response = dict(state.response)
                if out:
                    response.update(out)

                async def commit(doc: Mapping[str, Any] | None, response=response) -> None:
                    await self._io(
                        log_.append,
                        record.run_id,
                        EventKind.COMPLETE,
                        step=name,
                        payload=response,
                        at=self.clock.now(),
                        doc=doc,
                    )

                if ctx is not None and ctx.staged:
                    committer = self._doc_committer or self._commit_from_log
                    await committer(live.machine_id, ctx.staged, commit)
                else:
                    await commit(None)
                state.response = response
                state.completed.append(name)
                self.observer.step_completed(info, name)
                return
