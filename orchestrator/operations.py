"""The machine operations as FSM step lists (what flyd registers), and what each step does.

Every step is idempotent: it looks at the machine document and the driver's view of the instance
and does only what is missing, because a step runs again when the orchestrator died before its
COMPLETE was logged. Steps change the machine document by *staging* a change (``ctx.stage``):
the engine writes it in the same transaction as the step's COMPLETE, through
:meth:`.documents.Documents.commit_staged`; that wakes waiters, and the service then watches
started machines and marks them for publishing.

Operations, their steps, and the state each promises:

* create: prepare, mark_starting*, create_instance*, start_instance*, mark_started* → started
  (created with ``skip_launch``)
* start: mark_starting, prepare, create_instance, start_instance, mark_started → started
* stop: mark_stopping, stop_instance, mark_stopped → stopped
* restart: mark_restarting, stop_instance, create_instance, start_instance, mark_started → started
* update: mark_updating, stop_instance, destroy_instance, apply_config, prepare,
  create_instance*, start_instance*, mark_started* → started (created with ``skip_launch``)
* destroy: mark_destroying, kill_instance, destroy_instance, release_network, mark_destroyed →
  destroyed, then the database is archived
* cordon / uncordon: set_cordon → the flag
* exit (internal, from the exit watcher): record_exit → the restart policy's decision: stopped,
  or ``starting`` with a restart scheduled after its backoff (``restart_at`` in the document)
* relaunch (internal, from :mod:`.restarts` once the backoff is over): check_relaunch,
  create_instance†, start_instance†, mark_started† → started

(* skipped with ``skip_launch``; † skipped when the scheduled restart is stale: a stop,
restart, update or destroy ran first.) An exit run logged before restarts had a backoff has the
launch steps too, and still launches at once when resumed. Finalizers settle
the state after a halt: a failed start leaves the machine ``failed``; a failed stop or destroy
leaves it ``started`` or ``stopped`` as the driver reports.
"""

from __future__ import annotations

import dataclasses
import logging
import signal as _signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio

from . import machine as m
from .clock import Clock
from .drivers.base import Driver, DriverError, ExitStatus, InstanceState, parse_signal
from .engine import Backoff, Engine, StepContext
from .errors import UnrecoverableError
from .network import MachineNetwork, NetworkError
from .restart import RestartDecision, decide_restart, next_streak
from .volumes import Volumes

Step = Callable[[StepContext], Awaitable[Mapping[str, Any] | None]]

log = logging.getLogger(__name__)

START_RETRIES = 5  # ~3 s of backoff, then the machine is marked failed
STOP_RETRIES = 10  # ~20 s of backoff


def target_state(action: str, request: Mapping[str, Any]) -> str | None:
    """The state an accepted run of ``action`` promises (None: it does not change the state)."""
    if action in ("create", "update"):
        return m.CREATED if request.get("skip_launch") else m.STARTED
    return {
        "start": m.STARTED,
        "restart": m.STARTED,
        "stop": m.STOPPED,
        "destroy": m.DESTROYED,
    }.get(action)


def describe_exit(exit_: ExitStatus) -> str:
    """How the main process ended, for an operator: ``exited with code 3``, ``was killed by
    signal 15 (SIGTERM)``."""
    if exit_.oom_killed:
        return f"was killed by the OOM killer (signal {exit_.signal or int(_signal.SIGKILL)})"
    if exit_.signal is not None:
        try:
            name = f" ({_signal.Signals(exit_.signal).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {exit_.signal}{name}"
    if exit_.exit_code is not None:
        return f"exited with code {exit_.exit_code}"
    return "exited with an unknown status (its supervisor lost track)"


def _ran(doc: Mapping[str, Any], exit_: ExitStatus, now: float) -> float:
    """How long the boot that exited ran: from its ``started_at`` to the exit's time as the
    driver saw it (an exit noticed late, after the service was down, still ran only that
    long), or to ``now`` when the driver's time is missing or on another clock."""
    started = doc.get("started_at")
    if started is None:
        return 0.0
    end = exit_.exited_at if started <= exit_.exited_at <= now else now
    return max(0.0, end - started)


def _unless(flag: str, step: Step) -> Step:
    async def guarded(ctx: StepContext) -> Mapping[str, Any] | None:
        if ctx.request.get(flag) or ctx.response.get(flag):
            return None
        return await step(ctx)

    return guarded


def _only_if(flag: str, step: Step) -> Step:
    async def guarded(ctx: StepContext) -> Mapping[str, Any] | None:
        if not ctx.response.get(flag):
            return None
        return await step(ctx)

    return guarded


class StepHost(Protocol):
    """What the steps need from the service that runs them: its driver, its clock, and the
    current machine documents (read only: steps change a document by staging)."""

    @property
    def driver(self) -> Driver: ...

    @property
    def clock(self) -> Clock: ...

    def doc(self, machine_id: str) -> dict[str, Any]: ...

    @property
    def restart_backoff(self) -> Backoff:
        """The delays before automatic restarts (:func:`.restart.default_restart_backoff`)."""
        ...

    @property
    def volumes(self) -> Volumes:
        """The worker's volume directories (``config.mounts``)."""
        ...

    @property
    def network(self) -> MachineNetwork | None:
        """The machines' own network namespaces, or None: the host's network."""
        ...


class MachineOperations:
    """Step functions bound to one service; ``register`` installs every operation."""

    def __init__(self, svc: StepHost) -> None:
        self.svc = svc

    # --- helpers ------------------------------------------------------------------------------

    async def _drv(self, call: Awaitable[Any]) -> Any:
        """Driver errors that retrying cannot fix halt the run."""
        try:
            return await call
        except DriverError as e:
            if not e.transient:
                raise UnrecoverableError(str(e)) from e
            raise

    def _doc(self, ctx: StepContext) -> dict[str, Any]:
        return self.svc.doc(ctx.machine_id)

    def _set(self, ctx: StepContext, state: str, event: tuple[str, str] | None = None,
             *, event_request: Mapping[str, Any] | None = None,
             **fields: Any) -> None:  # fmt: skip
        """Stage a state change: it is written with the step's COMPLETE, in one transaction.
        ``event_request`` becomes the event's ``request`` (Fly's shape for an exit's details)."""
        now = self.svc.clock.now()

        def change(doc: dict[str, Any]) -> None:
            doc["state"] = state
            doc.pop("restart_at", None)  # any state a step sets supersedes a scheduled restart
            doc.update(fields)
            if event is not None:
                source = "flyd" if ctx.action in ("exit", "relaunch") else "user"
                m.add_event(doc, event[0], event[1], now=now, source=source,
                            **(event_request or {}))  # fmt: skip

        ctx.stage(change)

    # --- steps --------------------------------------------------------------------------------

    async def prepare(self, ctx: StepContext) -> None:
        await self._drv(self.svc.driver.prepare(m.instance_spec(self._doc(ctx))))

    async def mark_starting(self, ctx: StepContext) -> None:
        extra: dict[str, Any] = {}
        if ctx.action in ("start", "create"):
            extra = {"restarts": 0, "restart_streak": 0}
        self._set(ctx, m.STARTING, ("start", m.STARTING), **extra)

    async def mark_restarting(self, ctx: StepContext) -> None:
        self._set(ctx, m.RESTARTING, ("restart", m.RESTARTING), restarts=0, restart_streak=0)

    async def create_instance(self, ctx: StepContext) -> None:
        doc = self._doc(ctx)
        driver, iid = self.svc.driver, doc["instance_id"]
        status = await self._drv(driver.status(iid))
        if status.state is InstanceState.EXITED:  # a stopped machine starts from a clean image
            await self._drv(driver.destroy(iid))
            status = await self._drv(driver.status(iid))
        if status.state is InstanceState.ABSENT:
            spec = m.instance_spec(doc)
            if self.svc.network is not None:
                try:
                    net = await self.svc.network.attach(ctx.machine_id)
                except NetworkError as e:
                    raise DriverError(f"machine network: {e}") from e  # transient: retried
                spec = dataclasses.replace(spec, netns=net.netns_path, address=net.address)
            mounts = doc["config"].get("mounts")
            if mounts:
                pairs = await anyio.to_thread.run_sync(self.svc.volumes.attach, doc["app"], mounts)
                spec = dataclasses.replace(spec, mounts=pairs)
            await self._drv(driver.create(spec))

    async def start_instance(self, ctx: StepContext) -> None:
        iid = self._doc(ctx)["instance_id"]
        try:
            await self.svc.driver.start(iid)
            return
        except DriverError as e:
            error = e
        status = await self._drv(self.svc.driver.status(iid))
        if status.state is InstanceState.CREATED:  # a real failure to start
            if not error.transient:
                raise UnrecoverableError(str(error)) from error
            raise error
        if status.state is InstanceState.ABSENT:
            raise UnrecoverableError(f"instance {iid} disappeared before it was started")
        # running: started by the attempt that crashed; exited: the watcher reports the exit

    async def mark_started(self, ctx: StepContext) -> None:
        iid = self._doc(ctx)["instance_id"]
        status = await self._drv(self.svc.driver.status(iid))
        fields: dict[str, Any] = {"boot": ctx.run_id, "started_at": self.svc.clock.now()}
        if status.address:
            fields["private_ip"] = status.address
        kind = "restart" if ctx.action in ("restart", "exit", "relaunch") else "start"
        self._set(ctx, m.STARTED, (kind, m.STARTED), **fields)  # the service then watches it

    def _stop_args(self, ctx: StepContext) -> tuple[int, float]:
        cfg = self._doc(ctx)["config"].get("stop_config", {})
        sig = ctx.request.get("signal") or parse_signal(cfg.get("signal"))
        timeout = ctx.request.get("timeout")
        if timeout is None:
            timeout = cfg.get("timeout", m.DEFAULT_STOP_TIMEOUT)
        return int(sig), float(timeout)

    async def mark_stopping(self, ctx: StepContext) -> Mapping[str, Any] | None:
        state = self._doc(ctx)["state"]
        if state in (m.STOPPED, m.CREATED, m.FAILED):
            return {"noop": True}  # it exited (or never ran) while the stop waited its turn
        self._set(ctx, m.STOPPING, ("stop", m.STOPPING))
        return None

    async def stop_instance(self, ctx: StepContext) -> Mapping[str, Any] | None:
        iid = self._doc(ctx)["instance_id"]
        driver = self.svc.driver
        status = await self._drv(driver.status(iid))
        if status.state is InstanceState.RUNNING:
            sig, timeout = self._stop_args(ctx)
            exit_ = await self._drv(driver.stop(iid, signal=sig, timeout=timeout))
            return {"exit": exit_.to_dict()}
        if status.state is InstanceState.CREATED:
            await self._drv(driver.destroy(iid))
        elif status.state is InstanceState.EXITED and status.exit is not None:
            return {"exit": status.exit.to_dict()}
        return None

    async def mark_stopped(self, ctx: StepContext) -> None:
        exit_ = ctx.response.get("exit")
        details = {"exit_event": exit_} if exit_ is not None else None
        self._set(ctx, m.STOPPED, ("exit", m.STOPPED), event_request=details, last_exit=exit_)

    async def mark_updating(self, ctx: StepContext) -> None:
        self._set(ctx, m.UPDATING, ("update", m.UPDATING), restarts=0, restart_streak=0)

    async def destroy_instance(self, ctx: StepContext) -> None:
        await self._drv(self.svc.driver.destroy(self._doc(ctx)["instance_id"]))

    async def apply_config(self, ctx: StepContext) -> None:
        config, iid = ctx.request["config"], ctx.request["instance_id"]

        def change(doc: dict[str, Any]) -> None:
            doc["config"] = config
            doc["instance_id"] = iid

        ctx.stage(change)

    async def mark_destroying(self, ctx: StepContext) -> None:
        self._set(ctx, m.DESTROYING, ("destroy", m.DESTROYING))

    async def kill_instance(self, ctx: StepContext) -> Mapping[str, Any] | None:
        iid = self._doc(ctx)["instance_id"]
        status = await self._drv(self.svc.driver.status(iid))
        if status.state is not InstanceState.RUNNING:
            return None
        if ctx.request.get("force"):
            sig, timeout = int(_signal.SIGKILL), 10.0
        else:
            sig, timeout = self._stop_args(ctx)
        exit_ = await self._drv(self.svc.driver.stop(iid, signal=sig, timeout=timeout))
        return {"exit": exit_.to_dict()}

    async def release_network(self, ctx: StepContext) -> None:
        if self.svc.network is not None:
            try:
                await self.svc.network.release(ctx.machine_id)
            except NetworkError as e:
                raise DriverError(f"machine network: {e}") from e

    async def release_volumes(self, ctx: StepContext) -> None:
        doc = self._doc(ctx)
        mounts = doc["config"].get("mounts")
        if mounts:
            await anyio.to_thread.run_sync(self.svc.volumes.release, doc["app"], mounts)

    async def mark_destroyed(self, ctx: StepContext) -> None:
        self._set(ctx, m.DESTROYED, ("destroy", m.DESTROYED))

    async def set_cordon(self, ctx: StepContext) -> None:
        cordoned = ctx.action == "cordon"
        now = self.svc.clock.now()

        def change(doc: dict[str, Any]) -> None:
            doc["cordoned"] = cordoned
            m.add_event(doc, ctx.action, "ok", now=now, source="user")

        ctx.stage(change)

    async def record_exit(self, ctx: StepContext) -> Mapping[str, Any]:
        doc = self._doc(ctx)
        req = ctx.request
        if doc["state"] != m.STARTED or (doc["instance_id"], doc.get("boot")) != (
            req["instance_id"],
            req["boot"],
        ):
            # the machine moved on: a stop, restart, update or destroy ahead of this run ended
            # that boot (and saw its exit), or an earlier exit run restarted it
            log.debug("machine %s: exit of boot %s ignored: the machine is %s, boot %s",
                      ctx.machine_id, req["boot"], doc["state"], doc.get("boot"))  # fmt: skip
            return {"stale": True}
        exit_ = ExitStatus.from_dict(req["exit"])
        policy = doc["config"].get("restart", {})
        decision = decide_restart(policy, exit_, doc.get("restarts", 0))
        restart = decision.restart
        auto_destroy = not restart and bool(doc["config"].get("auto_destroy"))
        now = self.svc.clock.now()
        streak = next_streak(doc.get("restart_streak", 0), _ran(doc, exit_, now))
        delay = self.svc.restart_backoff.delay(streak) if restart else 0.0
        if restart:
            decision = decision.delayed(delay)
        self._log_exit(ctx, doc, exit_, decision, auto_destroy=auto_destroy, delay=delay)

        def change(d: dict[str, Any]) -> None:
            d["last_exit"] = exit_.to_dict()
            m.add_event(d, "exit", m.STARTING if restart else m.STOPPED, now=now,
                        exit_event=exit_.to_dict())  # fmt: skip
            if restart:  # the relaunch run :mod:`.restarts` starts at restart_at launches it
                d["state"] = m.STARTING
                d["restarts"] = d.get("restarts", 0) + 1
                d["restart_streak"] = streak
                d["restart_at"] = now + delay
            else:
                d["state"] = m.STOPPED

        ctx.stage(change)
        out: dict[str, Any] = {"restart": restart, "auto_destroy": auto_destroy}
        if restart:
            out["restart_at"] = now + delay
        return out

    async def check_relaunch(self, ctx: StepContext) -> Mapping[str, Any]:
        """Whether the restart this run was started for is still wanted: the machine is still
        ``starting`` for that very ``restart_at`` (a stop, restart, update or destroy that ran
        first cleared it; a twin relaunch already launched it)."""
        doc = self._doc(ctx)
        at = ctx.request["restart_at"]
        if doc["state"] != m.STARTING or doc.get("restart_at") != at:
            log.debug("machine %s: restart scheduled at %s skipped: the machine is %s",
                      ctx.machine_id, at, doc["state"])  # fmt: skip
            return {"stale": True}
        return {"restart": True}

    @staticmethod
    def _log_exit(
        ctx: StepContext,
        doc: Mapping[str, Any],
        exit_: ExitStatus,
        decision: RestartDecision,
        *,
        auto_destroy: bool,
        delay: float = 0.0,
    ) -> None:
        """One INFO line per exit the restart policy decides on: the machine, how it ended,
        what happens next (a resumed ``record_exit`` that had not logged its COMPLETE says it
        again)."""
        what = f"machine {ctx.machine_id} of app {doc['app']} {describe_exit(exit_)}"
        if decision.restart:
            line = f"{what} ({decision.reason})"
        else:
            after = "stopped, then destroyed (auto_destroy)" if auto_destroy else "stopped"
            line = f"{what}: {decision.reason}, {after}"
        fields = {
            "machine_id": ctx.machine_id, "app": doc["app"], "run_id": ctx.run_id,
            "instance_id": doc["instance_id"], "exit_code": exit_.exit_code,
            "signal": exit_.signal, "oom_killed": exit_.oom_killed,
            "restart": decision.restart,
            "restarts": doc.get("restarts", 0) + int(decision.restart),
            "restart_delay": delay,
        }  # fmt: skip
        log.info("%s", line, extra={"fields": fields})

    # --- finalizers ---------------------------------------------------------------------------

    async def settle_start(self, ctx: StepContext) -> None:
        """After a launch: failed if it halted (unless the instance runs after all)."""
        doc = self._doc(ctx)
        if ctx.error is None:
            if ctx.request.get("skip_launch") and doc["state"] != m.CREATED:
                self._set(ctx, m.CREATED, ("launch", m.CREATED))
            return
        if ctx.response.get("stale"):
            return
        status = await self.svc.driver.status(doc["instance_id"])
        now = self.svc.clock.now()
        if status.state is InstanceState.RUNNING:
            self._set(ctx, m.STARTED, ("start", m.STARTED), boot=ctx.run_id, started_at=now)
            return

        def change(d: dict[str, Any]) -> None:
            d["state"] = m.FAILED
            d.pop("restart_at", None)
            m.add_event(d, "launch", m.FAILED, now=now, error=ctx.error.message)  # type: ignore[union-attr]

        ctx.stage(change)

    async def settle_stop(self, ctx: StepContext) -> None:
        """After a halted stop or destroy: the state the driver actually reports."""
        if ctx.error is None:
            return
        doc = self._doc(ctx)
        status = await self.svc.driver.status(doc["instance_id"])
        running = status.state is InstanceState.RUNNING
        state = m.STARTED if running else m.STOPPED
        if doc["state"] != state:
            self._set(ctx, state, ("settle", state))

    # --- registration -------------------------------------------------------------------------

    def register(self, engine: Engine) -> None:
        skip = "skip_launch"
        launch = [
            ("create_instance", self.create_instance),
            ("start_instance", self.start_instance),
            ("mark_started", self.mark_started),
        ]
        engine.register(
            "create",
            [("prepare", self.prepare), ("mark_starting", _unless(skip, self.mark_starting))]
            + [(n, _unless(skip, f)) for n, f in launch],
            finalizers=[("settle", self.settle_start)],
            max_retries=START_RETRIES,
        )
        engine.register(
            "start",
            [("mark_starting", self.mark_starting), ("prepare", self.prepare), *launch],
            finalizers=[("settle", self.settle_start)],
            max_retries=START_RETRIES,
        )
        engine.register(
            "stop",
            [
                ("mark_stopping", self.mark_stopping),
                ("stop_instance", _unless("noop", self.stop_instance)),
                ("mark_stopped", _unless("noop", self.mark_stopped)),
            ],
            finalizers=[("settle", self.settle_stop)],
            max_retries=STOP_RETRIES,
        )
        engine.register(
            "restart",
            [("mark_restarting", self.mark_restarting), ("stop_instance", self.stop_instance),
             *launch],
            finalizers=[("settle", self.settle_start)],
            max_retries=START_RETRIES,
        )  # fmt: skip
        engine.register(
            "update",
            [
                ("mark_updating", self.mark_updating),
                ("stop_instance", self.stop_instance),
                ("destroy_instance", self.destroy_instance),
                ("apply_config", self.apply_config),
                ("prepare", self.prepare),
            ]
            + [(n, _unless(skip, f)) for n, f in launch],
            finalizers=[("settle", self.settle_start)],
            max_retries=START_RETRIES,
        )
        engine.register(
            "destroy",
            [
                ("mark_destroying", self.mark_destroying),
                ("kill_instance", self.kill_instance),
                ("destroy_instance", self.destroy_instance),
                ("release_network", self.release_network),
                ("release_volumes", self.release_volumes),
                ("mark_destroyed", self.mark_destroyed),
            ],
            finalizers=[("settle", self.settle_stop)],
            max_retries=STOP_RETRIES,
        )
        engine.register("cordon", [("set_cordon", self.set_cordon)])
        engine.register("uncordon", [("set_cordon", self.set_cordon)])
        engine.register(
            "exit",
            [("record_exit", self.record_exit)]
            + [(n, _unless("restart_at", _only_if("restart", f))) for n, f in launch],
            finalizers=[("settle", self.settle_start)],
            max_retries=START_RETRIES,
        )
        engine.register(
            "relaunch",
            [("check_relaunch", self.check_relaunch)]
            + [(n, _only_if("restart", f)) for n, f in launch],
            finalizers=[("settle", self.settle_start)],
            max_retries=START_RETRIES,
        )
