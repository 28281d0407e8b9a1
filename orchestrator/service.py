"""The machine service (flyd's role): machines of one worker, their operations, their truth.

This is the library surface the Machines API calls. It owns a machines directory (one database
per machine), a driver, the FSM engine with the operations of :mod:`.operations`, the exit
watchers that feed the restart policy (:mod:`.exits`), the timers that start the restarts it
schedules after their backoff (:mod:`.restarts`), and a publish queue writing each
machine's row into the replicated ``machines`` table through a :class:`Publisher`. The machine
documents (:mod:`.documents`), leases (:mod:`.leases`), metadata (:mod:`.metadata`) and waits
(:mod:`.waiting`) are parts it is composed of; their public calls are its own.

Rules enforced here:

* **Validate first, change nothing on refusal.** Configs, lease nonces and transitions are
  checked before anything is written; a refused request leaves no trace.
* **Transitions are checked against the projected state** — the state promised by the last
  operation already accepted for the machine, or its current state when none is pending — so a
  client may queue "start, then stop" without waiting. Accepted operations run one at a time per
  machine in the order they were accepted (the engine's per-machine queue). Asking for an
  operation whose identical twin is still pending answers AlreadyRunningError with its run id.
* **One writer per document.** Steps and API calls change a machine's document only through
  :class:`~.documents.Documents`, which serializes writers per machine, persists, then
  publishes.
* **Leases.** While a lease is held, mutating calls must present its nonce.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import apsw
from anyio.abc import TaskGroup

from . import machine as m
from .archive import ArchiveStore
from .checks import NetworkProbe, Probe
from .clock import Clock, SystemClock
from .documents import Documents, check_app
from .drivers.base import Driver, DriverError, Operable, UnknownInstanceError, parse_signal
from .engine import Backoff, Engine, EngineObserver, RunResult
from .errors import (
    AlreadyRunningError,
    EngineClosedError,
    InvalidRequestError,
    InvalidTransitionError,
    NotFoundError,
    NotSupportedError,
    UnknownRunError,
)
from .exits import ExitWatchers
from .health import HealthChecks
from .ids import IdFactory
from .leases import Leases, parse_ttl
from .metadata import Metadata
from .metrics import OrchestratorMetrics, TimedDriver
from .migrations import DEFAULT_RATE, Migrations
from .network import MachineNetwork, NetworkError
from .operations import MachineOperations, target_state
from .publish import Publisher, PublishQueue
from .restart import default_restart_backoff
from .restarts import RestartTimers
from .steplog import MachineLog
from .steplog_schema import CURRENT_TARGET, MigrationFailedError, SchemaTarget
from .store import MachineStore
from .volumes import Volumes, check_unshared
from .waiting import Waiter

log = logging.getLogger(__name__)

DEFAULT_KEEP_RUNS = 50
MAX_LOG_LINES = 10_000
MAX_EXEC_TIMEOUT = 600.0


class Orchestrator:
    """flyd for one worker. Use as ``async with Orchestrator(...) as orch:``."""

    def __init__(
        self,
        *,
        machines_path: str | Path,
        driver: Driver,
        archive: ArchiveStore | None = None,
        worker: str = "local",
        region: str = "local",
        clock: Clock | None = None,
        rng: random.Random | None = None,
        publisher: Publisher | None = None,
        offload: bool = True,
        observer: EngineObserver | None = None,
        backoff: Backoff | None = None,
        probe: Probe | None = None,
        network: MachineNetwork | None = None,
        keep_runs: int = DEFAULT_KEEP_RUNS,
        volumes_path: str | Path | None = None,
        migration_rate: float = DEFAULT_RATE,
        schema_target: SchemaTarget = CURRENT_TARGET,
        vfs: str | None = None,
        restart_backoff: Backoff | None = None,
    ) -> None:
        """``restart_backoff``: the delays before automatic restarts (default 100 ms doubling
        to one minute, see :mod:`.restart`). ``keep_runs``: finished runs kept replayable in
        each machine's step log; older ones are compacted into its history (see
        ``MachineLog.compact``). ``volumes_path``: where
        ``config.mounts`` volumes live (default ``<machines_path>/_volumes``).
        ``migration_rate``: step logs of an older schema migrated per second in the background
        (0: only lazily, on their next write; see :mod:`.migrations`). ``schema_target``: the
        step-log schema to migrate to (tests and benches rehearse a later release with it).
        ``vfs``: the SQLite VFS the step logs are opened through (the storage-fault tests' lying
        disk)."""
        if not migration_rate >= 0:
            raise ValueError("migration_rate must be a number >= 0")
        self.migration_rate = migration_rate
        self.schema_target = schema_target
        self.migrations: Migrations | None = None
        self.vfs = vfs
        if keep_runs < 1:
            raise ValueError("keep_runs must be at least 1")
        self.keep_runs = keep_runs
        self.machines_path = Path(machines_path)
        self.volumes = Volumes(volumes_path or self.machines_path / "_volumes")
        self.network = network  # None: machines share the host's network
        self.archive = archive
        self.worker = worker
        self.region = region
        self.clock = clock if clock is not None else SystemClock()
        self.ids = IdFactory(self.clock, rng)
        self.publisher = publisher
        self._offload = offload
        # Prometheus counts (orchestrator.metrics): the engine's events, the driver's calls
        self.metrics = OrchestratorMetrics(self.clock, observer)
        self._observer = self.metrics
        self.driver = TimedDriver(driver, self.metrics)
        self._backoff = backoff
        self.restart_backoff = restart_backoff or default_restart_backoff()
        self.store: MachineStore | None = None
        self.engine: Engine | None = None
        self.publish_queue: PublishQueue | None = None
        self.exits: ExitWatchers | None = None
        self.restarts: RestartTimers | None = None
        self.health: HealthChecks | None = None
        self._probe = probe
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        # the parts, one concept each; their public calls are the service's
        self.docs = Documents(self.clock, write=self._write_doc, on_change=self._on_change)
        self.leases = Leases(self.docs, self.clock, self.ids)
        self.metadata = Metadata(self.docs, self.leases)
        self.waiter = Waiter(self.docs, self.clock, self._archived)
        self.machine_ids = self.docs.ids
        self.doc = self.docs.get
        self.update = self.docs.update
        self.acquire_lease = self.leases.acquire
        self.get_lease = self.leases.get
        self.release_lease = self.leases.release
        self.get_metadata = self.metadata.get
        self.set_metadata = self.metadata.set
        self.delete_metadata = self.metadata.delete
        self.wait_machine = self.waiter.wait_machine

    # --- lifecycle ----------------------------------------------------------------------------

    async def _io(self, fn, *args, **kwargs):
        if self._offload:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        return fn(*args, **kwargs)

    async def __aenter__(self) -> Orchestrator:
        # everything in memory is rebuilt from disk (the object may be entered again)
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self.store = await self._io(
                MachineStore,
                self.machines_path,
                self.archive,
                target=self.schema_target,
                vfs=self.vfs,
            )
            stack.callback(self.store.close)
            self.migrations = Migrations(
                self.store, rate=self.migration_rate, io=self._io, on_change=self._republish,
                processes=self._offload,
            )  # fmt: skip
            stack.push_async_callback(self.driver.aclose)
            owed_destroys = await self._load()
            self.migrations.install()
            if self.network is not None:  # the bridge, then debris of destroyed machines goes
                await self.network.setup()
                await self.network.reconcile(self.docs.ids())
            engine = Engine(
                self.store,
                clock=self.clock,
                ids=self.ids,
                backoff=self._backoff,
                offload=self._offload,
                observer=self._observer,
                doc_committer=self.docs.commit_staged,
            )
            MachineOperations(self).register(engine)
            # bound to this engine: runs it resumes can finish before self.engine is set
            engine.on_finish(functools.partial(self._on_finish, engine))
            probe = self._probe
            if probe is None:
                network = NetworkProbe()
                stack.push_async_callback(network.aclose)
                probe = network
            tg = await stack.enter_async_context(anyio.create_task_group())
            self.exits = ExitWatchers(self.docs, self.driver, self.clock, engine, tg)
            self.restarts = RestartTimers(self.docs, self.clock, engine, tg, engine.backoff)
            self.health = HealthChecks(self.docs, self.clock, tg, probe)
            self._tg = tg
            self.engine = await stack.enter_async_context(engine)
            # unwinding runs this first: watchers and the publisher stop before the engine does
            stack.callback(tg.cancel_scope.cancel)
            if self.publisher is not None:
                self.publish_queue = PublishQueue(
                    self.publisher,
                    worker=self.worker,
                    lookup=self.published_doc,
                    live_ids=self.docs.ids,
                    clock=self.clock,
                    backoff=self._backoff,
                )
                tg.start_soon(self.publish_queue.run, name="publish")
            tg.start_soon(self.migrations.run, name="migrations")
            for mid in self.docs.ids():
                self.watch(mid)
            for mid in owed_destroys:
                log.info("machine %s exited with auto_destroy and was not destroyed before the "
                         "service stopped: destroying it now", mid)  # fmt: skip
                await self.engine.start(mid, "destroy", {"force": True}, queue=True)
        except BaseException:
            await stack.__aexit__(None, None, None)
            self.exits = self.restarts = self.health = self._tg = None
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            await stack.__aexit__(None, None, None)
        finally:
            self.engine = None
            self.exits = self.restarts = self.health = self._tg = None
        running = [
            mid for mid in self.docs.ids() if (self.docs.find(mid) or {}).get("state") == m.STARTED
        ]
        if running:  # as under flyd: stopping the service does not stop the machines
            log.info(
                "orchestrator stopped; %d machine(s) keep running, adopted at its next start",
                len(running),
                extra={"fields": {"machines": running}},
            )

    async def _load(self) -> list[str]:
        """Read every machine's document; finish the bookkeeping a crash may have interrupted:
        drop databases of creates that never logged START, archive destroyed machines (what
        ``_on_finish`` does after a destroy), and return the machines whose auto-destroy is
        owed (an exit run asked for it, and the service stopped before starting it)."""
        assert self.store is not None
        store = self.store
        docs: dict[str, dict[str, Any]] = {}
        gone: dict[str, str] = {}
        owed: list[str] = []
        for mid in await self._io(store.machine_ids):
            log_ = store.log(mid)
            try:
                doc = await self._io(log_.read_doc)
                active = await self._io(log_.active_runs)
                # an auto-destroy is only ever owed to a stopped machine that asks for them
                owes_destroy = (
                    not active
                    and doc is not None
                    and doc["state"] == m.STOPPED
                    and bool(doc["config"].get("auto_destroy"))
                    and await self._io(_newest_asks_auto_destroy, log_)
                )
            except (apsw.Error, MigrationFailedError) as e:
                # damaged, or too old to read and its migration failed: left as it is, reported
                # (ERROR log, metric), and skipped so the other machines are served
                store.mark_unreadable(mid, e)
                continue
            if doc is None:
                if not active:
                    await self._io(store.discard, mid)
                continue
            if doc["state"] == m.DESTROYED and not active:
                await self._io(log_.compact, self.keep_runs)  # the archive holds a small log
                await self._io(store.archive, mid)
                gone[mid] = doc["app"]
                continue
            if owes_destroy:
                owed.append(mid)
            docs[mid] = doc
        self.docs.reset(docs, gone)
        return owed

    # --- documents: persistence and what follows a change -------------------------------------

    async def _write_doc(self, machine_id: str, doc: dict[str, Any]) -> None:
        assert self.store is not None
        await self._io(self.store.log(machine_id).write_doc, doc, at=doc["updated_at"])

    def _on_change(self, machine_id: str) -> None:
        if self.publish_queue is not None:
            self.publish_queue.mark(machine_id)
        if self.migrations is not None:
            self.migrations.install()  # a write may have migrated its database (lazily)
        self.watch(machine_id)  # a no-op unless started and not yet watched

    def _republish(self, machine_id: str) -> None:
        if self.publish_queue is not None:
            self.publish_queue.mark(machine_id)

    def published_doc(self, machine_id: str) -> dict[str, Any] | None:
        """The machine's document with its database's schema, as the publisher writes it."""
        doc = self.docs.find(machine_id)
        if doc is None:
            return None
        return {**doc, "db_schema": self.schema_of(machine_id)}

    def schema_of(self, machine_id: str) -> dict[str, Any]:
        """The schema of the machine's step log: version, hash, state (current, pending,
        migration_failed) and the failure's reason."""
        status = None if self.migrations is None else self.migrations.status(machine_id)
        if status is None:
            return {"version": 0, "hash": "", "state": "", "error": ""}
        return status.as_dict()

    def _view(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        return {**m.public_view(doc), "db_schema": self.schema_of(doc["id"])}

    def _archived(self, machine_id: str) -> bool:
        assert self.store is not None
        return self.store.is_archived(machine_id)

    # --- exits and the end of a run -----------------------------------------------------------

    def watch(self, machine_id: str) -> None:
        """Watch the machine's running instance (its exit becomes an ``exit`` run), run its
        health checks while it is started, and its scheduled restart while one is due."""
        if self.exits is not None:
            self.exits.watch(machine_id)
        if self.restarts is not None:
            self.restarts.sync(machine_id)
        if self.health is not None:
            self.health.sync(machine_id)

    async def _on_finish(self, engine: Engine, result: RunResult) -> None:
        """The engine's finish hook: start an exited machine's auto-destroy; compact the log,
        and archive a destroyed machine's database.

        It is given its engine because it runs from the engine's start on: runs resumed there
        can finish before ``__aenter__`` has set ``self.engine``. Its effects are not written
        with the run's FINISH, so a crash (or a stop) between the two skips them; ``_load``
        redoes them from the log on the next start (archives a destroyed machine, returns an
        owed auto-destroy)."""
        mid = result.machine_id
        doc = self.docs.find(mid)
        if doc is None:
            return
        assert self.store is not None
        if _asks_auto_destroy(result.action, result.response):
            try:
                await engine.start(mid, "destroy", {"force": True}, queue=True)
            except EngineClosedError:
                log.info("auto-destroy of machine %s deferred: the service is stopping, its "
                         "next start destroys it", mid)  # fmt: skip
            return
        # a crash before this line leaves one more finished run, compacted after the next
        await self._io(self.store.log(mid).compact, self.keep_runs)
        if doc["state"] == m.DESTROYED and not engine.list_runs(mid):
            await self._io(self.store.archive, mid)
            self.docs.retire(mid)

    # --- submitting operations ----------------------------------------------------------------

    def projected_state(self, machine_id: str) -> str:
        """The state the machine will be in once the accepted operations have run. A machine
        the restart policy is restarting (``starting`` with a restart scheduled, or an exit run
        in flight) counts as started: its launch ends started (or failed, which a stop or
        destroy queued after it accepts too), so a crash-looping machine can be stopped or
        destroyed at any moment, not only in the instants it is started."""
        assert self.engine is not None
        doc = self.doc(machine_id)
        state = doc["state"]
        runs = self.engine.list_runs(machine_id)
        if state == m.STARTING and (
            doc.get("restart_at") is not None or (runs and runs[0].action == "exit")
        ):
            state = m.STARTED
        for run in runs:
            target = target_state(run.action, run.request)
            if target is not None:
                state = target
        return state

    async def _submit(
        self,
        app: str,
        machine_id: str,
        action: str,
        request: dict[str, Any],
        nonce: str | None,
        *,
        check: Callable[[str, Mapping[str, Any]], None] | None = None,
        queue: bool = False,
    ) -> tuple[str, str]:
        """Validate and accept an operation; returns (run id, state before it).

        One live run per (machine, action): while one runs or waits its turn, another is
        refused with the run id (``AlreadyRunningError``), unless ``queue`` asks to run it
        after. Runs of different actions always queue, each validated against the state the
        runs ahead of it promise."""
        assert self.engine is not None
        async with self.docs.request_lock(machine_id):
            doc = self.docs.in_app(app, machine_id)
            self.leases.check(doc, nonce)
            projected = self.projected_state(machine_id)
            pending = self.engine.active_action(machine_id, action)
            if pending is not None and not queue:
                raise AlreadyRunningError(machine_id, action, pending)
            allowed = m.ALLOWED_FROM[action]
            if projected not in allowed:
                now = "is" if projected == doc["state"] else "will be"
                raise InvalidTransitionError(
                    f"cannot {action} machine {machine_id}: it {now} {projected} "
                    f"({action} needs {', '.join(sorted(allowed))})"
                )
            if check is not None:
                check(projected, doc)
            run_id = await self.engine.start(machine_id, action, request, queue=True)
            return run_id, doc["state"]

    # --- machine API --------------------------------------------------------------------------

    async def create_machine(self, app: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate, create the machine's database with its document and the create run's START
        in one transaction, and return the machine (``nonce`` too when a lease was asked)."""
        assert self.engine is not None and self.store is not None
        check_app(app)
        body = _body(body, {"config", "name", "region", "skip_launch", "lease_ttl",
                            "skip_service_registration"})  # fmt: skip
        if "config" not in body:
            raise InvalidRequestError("config: required")
        config = m.validate_config(body["config"])
        skip_launch = _bool(body.get("skip_launch", False), "skip_launch")
        ssr = _bool(body.get("skip_service_registration", False), "skip_service_registration")
        region = body.get("region") or self.region
        if region != self.region:
            raise InvalidRequestError(f"region: this worker serves {self.region!r}, not {region!r}")
        mid = self.ids.machine_id()
        check_unshared(mid, config.get("mounts") or (), self.docs.of_app(app, None))
        name = body.get("name") or mid
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", name):
            raise InvalidRequestError(f"name: invalid machine name {name!r}")
        now = self.clock.now()
        doc = m.new_doc(
            machine_id=mid, app=app, name=name, region=self.region, worker=self.worker,
            instance_id=self.ids.ulid(), config=config, now=now, skip_service_registration=ssr,
        )  # fmt: skip
        nonce = None
        if body.get("lease_ttl") is not None:
            ttl = parse_ttl(body["lease_ttl"])
            nonce = self.ids.nonce()
            doc["lease"] = self.leases.new(nonce, ttl, "create", "")
        await self._check_driver(doc)
        m.add_event(doc, "launch", m.CREATED, now=now, source="user")
        early = None if skip_launch else self._attach_early(mid)
        try:
            await self._io(self.store.create, mid)
            try:
                await self.engine.start(mid, "create", {"skip_launch": skip_launch}, doc=doc)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._io(self.store.discard, mid)
                raise
        except BaseException:
            if early is not None and self.network is not None:
                with anyio.CancelScope(shield=True):
                    await early.wait()  # then nothing makes it again after the release
                    await self.network.release(mid)
            raise
        self.docs.add(mid, doc)
        view = self._view(doc)
        if nonce is not None:
            view["nonce"] = nonce
        return view

    def _attach_early(self, machine_id: str) -> anyio.Event | None:
        """Start making the machine's network namespace now, while its step log is written
        and its first steps run: ``create_instance`` then finds it made (``attach`` is
        idempotent). Its address is durable before the namespace exists, as always; a create
        that fails releases it, and a crash before START leaves an address the restart's
        reconcile releases."""
        if self.network is None or self._tg is None:
            return None
        network, done = self.network, anyio.Event()

        async def attach() -> None:
            try:
                await network.attach(machine_id)
            except NetworkError as e:  # the step tries again and reports it
                log.debug("early network attach of %s failed: %s", machine_id, e)
            finally:
                done.set()

        self._tg.start_soon(attach, name=f"attach:{machine_id}")
        return done

    async def _check_driver(self, doc: Mapping[str, Any]) -> None:
        """Ask the driver to prepare now, so a config it can never run is a 400, not a failed
        machine. Transient driver trouble is left to the run's retries. A driver that pulls
        from a registry first pins ``config.image`` to the digest its tag names now."""
        try:
            pin = getattr(self.driver, "pin_image", None)
            if pin is not None:
                doc["config"]["image"] = await pin(doc["config"]["image"])
            await self.driver.prepare(m.instance_spec(doc))
        except DriverError as e:
            if not e.transient:
                raise InvalidRequestError(f"config: {e}") from None

    def list_machines(self, app: str, *, state: str | None = None) -> list[dict[str, Any]]:
        states = state.split(",") if state else None
        return [self._view(d) for d in self.docs.of_app(app, states)]

    def get_machine(self, app: str, machine_id: str) -> dict[str, Any]:
        return self._view(self.docs.in_app(app, machine_id))

    async def start_machine(
        self, app: str, machine_id: str, *, nonce: str | None = None, queue: bool = False
    ) -> dict:
        _, previous = await self._submit(app, machine_id, "start", {}, nonce, queue=queue)
        return {"previous_state": previous}

    def _stop_request(self, signal: Any, timeout: Any) -> dict[str, Any]:
        req: dict[str, Any] = {}
        if signal not in (None, ""):
            try:
                req["signal"] = parse_signal(signal)
            except ValueError as e:
                raise InvalidRequestError(f"signal: {e}") from None
        if timeout not in (None, ""):
            req["timeout"] = m.parse_duration(timeout, "timeout")
        return req

    async def stop_machine(
        self, app: str, machine_id: str, *, signal: Any = None, timeout: Any = None,
        nonce: str | None = None, queue: bool = False,
    ) -> dict:  # fmt: skip
        request = self._stop_request(signal, timeout)
        await self._submit(app, machine_id, "stop", request, nonce, queue=queue)
        return {"ok": True}

    async def restart_machine(
        self, app: str, machine_id: str, *, signal: Any = None, timeout: Any = None,
        nonce: str | None = None, queue: bool = False,
    ) -> dict:  # fmt: skip
        request = self._stop_request(signal, timeout)
        await self._submit(app, machine_id, "restart", request, nonce, queue=queue)
        return {"ok": True}

    async def destroy_machine(
        self, app: str, machine_id: str, *, force: bool = False, nonce: str | None = None,
        queue: bool = False,
    ) -> dict:  # fmt: skip
        def check(projected: str, doc: Mapping[str, Any]) -> None:
            if projected == m.STARTED and not force:
                raise InvalidTransitionError(
                    f"machine {machine_id} is started: stop it first, or destroy with force=true"
                )

        await self._submit(
            app, machine_id, "destroy", {"force": bool(force)}, nonce, check=check, queue=queue
        )
        return {"ok": True}

    async def update_machine(
        self, app: str, machine_id: str, body: Mapping[str, Any], *, nonce: str | None = None,
        queue: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        doc = self.docs.in_app(app, machine_id)
        self.leases.check(doc, nonce)  # before preparing the new image (checked again below)
        body = _body(body, {"config", "name", "region", "skip_launch", "lease_ttl",
                            "skip_service_registration"})  # fmt: skip
        if "config" not in body:
            raise InvalidRequestError("config: required (updates replace the whole config)")
        config = m.validate_config(body["config"])
        for key in ("name", "region"):
            if body.get(key) not in (None, doc[key]):
                raise InvalidRequestError(f"{key}: cannot be changed by an update")
        skip_launch = _bool(body.get("skip_launch", False), "skip_launch")
        check_unshared(machine_id, config.get("mounts") or (), self.docs.of_app(app, None))
        new_iid = self.ids.ulid()
        await self._check_driver({**doc, "config": config, "instance_id": new_iid})
        request = {"config": config, "instance_id": new_iid, "skip_launch": skip_launch}
        await self._submit(app, machine_id, "update", request, nonce, queue=queue)
        # the machine as the update will leave it (Fly's answer), so a client can wait on the
        # new instance_id; state is still the current one
        return m.public_view({**self.doc(machine_id), "config": config, "instance_id": new_iid})

    async def cordon_machine(
        self, app: str, machine_id: str, *, nonce: str | None = None, queue: bool = False
    ) -> dict:
        await self._submit(app, machine_id, "cordon", {}, nonce, queue=queue)
        return {"ok": True}

    async def uncordon_machine(
        self, app: str, machine_id: str, *, nonce: str | None = None, queue: bool = False
    ) -> dict:
        await self._submit(app, machine_id, "uncordon", {}, nonce, queue=queue)
        return {"ok": True}

    # --- operating a started machine ----------------------------------------------------------

    def _started(self, app: str, machine_id: str) -> dict[str, Any]:
        doc = self.docs.in_app(app, machine_id)
        if doc["state"] != m.STARTED:
            raise InvalidTransitionError(f"machine {machine_id} is {doc['state']}, not started")
        return doc

    def _operable(self) -> Operable:
        if not isinstance(self.driver, Operable):
            raise NotSupportedError(f"the {self.driver.name} driver cannot exec, ps or show logs")
        return self.driver

    async def signal_machine(self, app: str, machine_id: str, signal: Any) -> dict:
        """Deliver a signal to the machine's main process (Fly's ``signal`` endpoint)."""
        try:
            sig = parse_signal(signal, default=0)
        except ValueError as e:
            raise InvalidRequestError(f"signal: {e}") from None
        if sig == 0:
            raise InvalidRequestError("signal: required (a name such as SIGUSR1, or a number)")
        doc = self._started(app, machine_id)
        await self.driver.signal(doc["instance_id"], sig)
        return {"ok": True}

    async def exec_machine(self, app: str, machine_id: str, body: Mapping[str, Any]) -> dict:
        """Run a command in the started machine: its stdout, stderr and exit code."""
        body = _body(body, {"cmd", "command", "timeout", "stdin", "container"})
        if body.get("stdin"):
            raise InvalidRequestError("stdin: not supported")
        cmd = body.get("command")
        if cmd is None and isinstance(body.get("cmd"), str):
            cmd = body["cmd"].split()
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
            raise InvalidRequestError(
                "command: required (a non-empty list of strings, or cmd as one string)"
            )
        timeout = m.parse_duration(body.get("timeout", 30), "timeout")
        if not 0 < timeout <= MAX_EXEC_TIMEOUT:
            raise InvalidRequestError(f"timeout: expected 0 to {MAX_EXEC_TIMEOUT:g} seconds")
        driver = self._operable()
        doc = self._started(app, machine_id)
        result = await driver.exec(doc["instance_id"], cmd, timeout=timeout)
        return {"stdout": result.stdout, "stderr": result.stderr,
                "exit_code": result.exit_code, "exit_signal": result.exit_signal}  # fmt: skip

    async def ps_machine(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        driver = self._operable()
        doc = self._started(app, machine_id)
        return [
            {"pid": p.pid, "host_pid": p.host_pid, "command": p.command, "rss": p.rss}
            for p in await driver.ps(doc["instance_id"])
        ]

    async def machine_logs(self, app: str, machine_id: str, lines: int) -> list[str]:
        """The last ``lines`` lines of the current instance's stdout/stderr."""
        if not 0 <= lines <= MAX_LOG_LINES:
            raise InvalidRequestError(f"lines: expected 0 to {MAX_LOG_LINES}")
        driver = self._operable()
        doc = self.docs.in_app(app, machine_id)
        try:
            return await self._io(driver.logs, doc["instance_id"], lines)
        except UnknownInstanceError:
            return []  # never started, or its instance is gone (destroyed, being replaced)

    async def machine_events(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        """Every run of the machine, oldest first, with its step events (compacted ones too)."""
        self.docs.in_app(app, machine_id)
        assert self.store is not None
        return await self._io(self.store.log(machine_id).timeline)

    # --- runs (flyd's admin view) -------------------------------------------------------------

    def list_runs(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        """The machine's live runs, oldest first."""
        self.docs.in_app(app, machine_id)
        assert self.engine is not None
        return [
            {"run_id": r.run_id, "action": r.action, "state": r.state, "step": r.step,
             "retry_count": r.retry_count, "resumed": r.resumed}
            for r in self.engine.list_runs(machine_id)
        ]  # fmt: skip

    async def wait_run(
        self, app: str, machine_id: str, run_id: str, *, timeout: float
    ) -> dict[str, Any] | None:
        """Wait for a run (live, or finished and still in the machine's log) to finish: its
        result, or None after ``timeout`` seconds."""
        self.docs.in_app(app, machine_id)
        assert self.engine is not None
        try:
            result = await self.engine.wait(run_id, machine_id=machine_id, timeout=timeout)
        except TimeoutError:
            return None
        except UnknownRunError:
            raise NotFoundError(f"machine {machine_id} has no run {run_id}") from None
        return {
            "run_id": result.run_id, "action": result.action, "status": result.status.value,
            "ok": result.ok, "response": dict(result.response),
            "error": None if result.error is None else {
                "kind": result.error.kind, "message": result.error.message,
                "step": result.error.step,
            },
        }  # fmt: skip

    async def cancel_run(self, app: str, machine_id: str, run_id: str, *,
                         nonce: str | None = None) -> None:  # fmt: skip
        """Halt a live run: remaining steps are skipped, its finalizer settles the state."""
        doc = self.docs.in_app(app, machine_id)
        self.leases.check(doc, nonce)
        assert self.engine is not None
        if run_id not in {r.run_id for r in self.engine.list_runs(machine_id)}:
            raise NotFoundError(f"machine {machine_id} has no live run {run_id}")
        if not await self.engine.cancel(run_id, "cancelled through the API"):
            raise InvalidTransitionError(f"run {run_id} is already finishing")


def _asks_auto_destroy(action: str, response: Mapping[str, Any]) -> bool:
    """Whether a finished run asks for its machine to be destroyed (an exit whose restart
    policy let the machine stop, with ``config.auto_destroy``)."""
    return action == "exit" and bool(response.get("auto_destroy"))


def _newest_asks_auto_destroy(log_: MachineLog) -> bool:
    """Whether the machine's newest run asked for an auto-destroy: then no run was started
    after it, the destroy included (a crash or a stop came between its FINISH and the finish
    hook that starts the destroy)."""
    newest = log_.history(1)
    return bool(newest) and _asks_auto_destroy(newest[0].action, newest[0].response)


def _body(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidRequestError("request body: expected a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}")
    return dict(body)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{field}: expected true or false")
    return value


__all__ = ["Orchestrator"]
