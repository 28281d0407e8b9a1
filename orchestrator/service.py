"""The machine service (flyd's role): machines of one worker, their operations, their truth.

This is the library surface the Machines API calls. It owns a machines directory (one database
per machine), a driver, the FSM engine with the operations of :mod:`.operations`, the exit
watchers that feed the restart policy, and a publish queue writing each machine's row into the
replicated ``machines`` table through a :class:`Publisher`.

Rules enforced here:

* **Validate first, change nothing on refusal.** Configs, lease nonces and transitions are
  checked before anything is written; a refused request leaves no trace.
* **Transitions are checked against the projected state** — the state promised by the last
  operation already accepted for the machine, or its current state when none is pending — so a
  client may queue "start, then stop" without waiting. Accepted operations run one at a time per
  machine in the order they were accepted (the engine's per-machine queue). Asking for an
  operation whose identical twin is still pending answers AlreadyRunningError with its run id.
* **One writer per document.** Steps and API calls change a machine's document only through
  :meth:`update`, which serializes writers per machine, persists, then publishes.
* **Leases.** While a lease is held, mutating calls must present its nonce.
"""

from __future__ import annotations

import copy
import logging
import random
import re
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from . import machine as m
from .archive import ArchiveStore
from .clock import Clock, SystemClock, wait_until
from .drivers.base import Driver, DriverError, ExitStatus, parse_signal
from .engine import Backoff, Engine, EngineObserver, RunResult
from .errors import (
    AlreadyRunningError,
    InvalidRequestError,
    InvalidTransitionError,
    LeaseError,
    NotFoundError,
    UnknownRunError,
)
from .ids import IdFactory
from .operations import MachineOperations, target_state
from .publish import Publisher, PublishQueue
from .store import MachineStore, archive_key

log = logging.getLogger(__name__)

APP_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_LEASE_TTL = 3600 * 24
MAX_WAIT = 3600.0


def _check_app(app: str) -> str:
    if not isinstance(app, str) or not APP_RE.match(app):
        raise InvalidRequestError(f"invalid app name {app!r}")
    return app


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
    ) -> None:
        self.machines_path = Path(machines_path)
        self.driver = driver
        self.archive = archive
        self.worker = worker
        self.region = region
        self.clock = clock if clock is not None else SystemClock()
        self.ids = IdFactory(self.clock, rng)
        self.publisher = publisher
        self._offload = offload
        self._observer = observer
        self._backoff = backoff
        self.store: MachineStore | None = None
        self.engine: Engine | None = None
        self.publish_queue: PublishQueue | None = None
        self._docs: dict[str, dict[str, Any]] = {}
        self._changed: dict[str, anyio.Event] = {}
        self._api_locks: dict[str, anyio.Lock] = {}
        self._doc_locks: dict[str, anyio.Lock] = {}
        self._watching: dict[str, tuple[str, str | None]] = {}
        self._gone: dict[str, str] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: AsyncExitStack | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def _io(self, fn, *args, **kwargs):
        if self._offload:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        return fn(*args, **kwargs)

    async def __aenter__(self) -> Orchestrator:
        # everything in memory is rebuilt from disk (the object may be entered again)
        for state in (self._docs, self._changed, self._watching, self._gone):
            state.clear()
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self.store = await self._io(MachineStore, self.machines_path, self.archive)
            stack.callback(self.store.close)
            stack.push_async_callback(self.driver.aclose)
            await self._load()
            engine = Engine(
                self.store,
                clock=self.clock,
                ids=self.ids,
                backoff=self._backoff,
                offload=self._offload,
                observer=self._observer,
                doc_committer=self._commit_staged,
            )
            MachineOperations(self).register(engine)
            engine.on_finish(self._on_finish)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self.engine = await stack.enter_async_context(engine)
            # unwinding runs this first: watchers and the publisher stop before the engine does
            stack.callback(self._tg.cancel_scope.cancel)
            if self.publisher is not None:
                self.publish_queue = PublishQueue(
                    self.publisher,
                    worker=self.worker,
                    lookup=self._docs.get,
                    live_ids=lambda: sorted(self._docs),
                    clock=self.clock,
                    backoff=self._backoff,
                )
                self._tg.start_soon(self.publish_queue.run, name="publish")
            for mid, doc in sorted(self._docs.items()):
                if doc["state"] == m.STARTED:
                    self.watch(mid)
        except BaseException:
            await stack.__aexit__(None, None, None)
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
            self._tg = None

    async def _load(self) -> None:
        """Read every machine's document; finish the bookkeeping a crash may have interrupted:
        drop databases of creates that never logged START, archive destroyed machines."""
        assert self.store is not None
        store = self.store
        for mid in await self._io(store.machine_ids):
            log_ = store.log(mid)
            doc = await self._io(log_.read_doc)
            active = await self._io(log_.active_runs)
            if doc is None:
                if not active:
                    await self._io(store.discard, mid)
                continue
            if doc["state"] == m.DESTROYED and not active:
                await self._io(store.archive, mid)
                self._gone[mid] = doc["app"]
                continue
            self._docs[mid] = doc

    # --- documents ----------------------------------------------------------------------------

    def machine_ids(self) -> list[str]:
        """Every machine this worker holds a document for (destroyed ones until archived)."""
        return sorted(self._docs)

    def doc(self, machine_id: str) -> dict[str, Any]:
        """The current document (a reference: do not mutate, use :meth:`update`)."""
        try:
            return self._docs[machine_id]
        except KeyError:
            raise NotFoundError(f"machine {machine_id} not found") from None

    async def update(
        self, machine_id: str, change: Callable[[dict[str, Any]], object]
    ) -> dict[str, Any]:
        """Apply ``change`` to a copy of the document, persist it, then make it current."""
        assert self.store is not None
        lock = self._doc_locks.setdefault(machine_id, anyio.Lock())
        async with lock:
            doc = copy.deepcopy(self.doc(machine_id))
            change(doc)
            doc["updated_at"] = self.clock.now()
            await self._io(self.store.log(machine_id).write_doc, doc, at=doc["updated_at"])
            self._docs[machine_id] = doc
        self._notify(machine_id)
        return doc

    async def _commit_staged(self, machine_id: str, changes, commit) -> None:
        """The engine's doc committer: apply a step's staged changes to the current document
        and write it with the step's COMPLETE, serialized with every other document writer."""
        lock = self._doc_locks.setdefault(machine_id, anyio.Lock())
        async with lock:
            doc = copy.deepcopy(self.doc(machine_id))
            for change in changes:
                change(doc)
            doc["updated_at"] = self.clock.now()
            await commit(doc)
            self._docs[machine_id] = doc
        self._notify(machine_id)

    def _notify(self, machine_id: str) -> None:
        event = self._changed.pop(machine_id, None)
        if event is not None:
            event.set()
        if self.publish_queue is not None:
            self.publish_queue.mark(machine_id)
        self.watch(machine_id)  # a no-op unless started and not yet watched

    def _get(self, app: str, machine_id: str) -> dict[str, Any]:
        _check_app(app)
        doc = self._docs.get(machine_id)
        if doc is None or doc["app"] != app:
            raise NotFoundError(f"machine {machine_id} not found in app {app}")
        return doc

    # --- exits and the restart policy ---------------------------------------------------------

    def watch(self, machine_id: str) -> None:
        """Watch the machine's running instance; its exit becomes an ``exit`` run."""
        doc = self._docs.get(machine_id)
        if doc is None or doc["state"] != m.STARTED or self._tg is None:
            return
        key = (doc["instance_id"], doc.get("boot"))
        if self._watching.get(machine_id) == key:
            return
        self._watching[machine_id] = key
        self._tg.start_soon(self._watcher, machine_id, key, name=f"watch:{machine_id}")

    async def _watcher(self, machine_id: str, key: tuple[str, str | None]) -> None:
        try:
            try:
                exit_ = await self.driver.wait(key[0])
            except DriverError:
                exit_ = ExitStatus(exited_at=self.clock.now())  # the instance vanished
        finally:
            if self._watching.get(machine_id) == key:
                del self._watching[machine_id]
        doc = self._docs.get(machine_id)
        if doc is None or doc["state"] != m.STARTED or (doc["instance_id"], doc.get("boot")) != key:
            return
        assert self.engine is not None
        for run in self.engine.list_runs(machine_id):
            if run.action in ("stop", "restart", "destroy", "update", "exit"):
                return  # that operation owns this exit
        request = {"instance_id": key[0], "boot": key[1], "exit": exit_.to_dict()}
        await self.engine.start(machine_id, "exit", request, queue=True)

    async def _on_finish(self, result: RunResult) -> None:
        mid = result.machine_id
        doc = self._docs.get(mid)
        if doc is None:
            return
        assert self.engine is not None and self.store is not None
        if result.action == "exit" and result.response.get("auto_destroy"):
            await self.engine.start(mid, "destroy", {"force": True}, queue=True)
            return
        if doc["state"] == m.DESTROYED and not self.engine.list_runs(mid):
            await self._io(self.store.archive, mid)
            self._docs.pop(mid, None)
            self._gone[mid] = doc["app"]
            self._notify(mid)

    # --- submitting operations ----------------------------------------------------------------

    def projected_state(self, machine_id: str) -> str:
        """The state the machine will be in once the accepted operations have run."""
        assert self.engine is not None
        state = self.doc(machine_id)["state"]
        for run in self.engine.list_runs(machine_id):
            target = target_state(run.action, run.request)
            if target is not None:
                state = target
        return state

    def _check_lease(self, doc: Mapping[str, Any], nonce: str | None) -> None:
        lease = m.active_lease(doc, self.clock.now())
        if lease is not None and nonce != lease["nonce"]:
            why = "a wrong nonce" if nonce else "no nonce"
            raise LeaseError(
                f"machine {doc['id']} is leased by {lease['owner']} until "
                f"{m.iso(lease['expires_at'])}; the request had {why} "
                "(send it in the fly-machine-lease-nonce header)"
            )

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
        lock = self._api_locks.setdefault(machine_id, anyio.Lock())
        async with lock:
            doc = self._get(app, machine_id)
            self._check_lease(doc, nonce)
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
        _check_app(app)
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
            ttl = _ttl(body["lease_ttl"])
            nonce = self.ids.nonce()
            doc["lease"] = self._new_lease(nonce, ttl, "create", "")
        await self._check_driver(doc)
        m.add_event(doc, "launch", m.CREATED, now=now, source="user")
        await self._io(self.store.create, mid)
        try:
            await self.engine.start(mid, "create", {"skip_launch": skip_launch}, doc=doc)
        except BaseException:
            await self._io(self.store.discard, mid)
            raise
        self._docs[mid] = doc
        self._notify(mid)
        view = m.public_view(doc)
        if nonce is not None:
            view["nonce"] = nonce
        return view

    async def _check_driver(self, doc: Mapping[str, Any]) -> None:
        """Ask the driver to prepare now, so a config it can never run is a 400, not a failed
        machine. Transient driver trouble is left to the run's retries."""
        try:
            await self.driver.prepare(m.instance_spec(doc))
        except DriverError as e:
            if not e.transient:
                raise InvalidRequestError(f"config: {e}") from None

    def list_machines(self, app: str, *, state: str | None = None) -> list[dict[str, Any]]:
        _check_app(app)
        states = set(state.split(",")) if state else None
        docs = [d for d in self._docs.values() if d["app"] == app]
        if states is not None:
            docs = [d for d in docs if d["state"] in states]
        return [m.public_view(d) for d in sorted(docs, key=lambda d: (d["created_at"], d["id"]))]

    def get_machine(self, app: str, machine_id: str) -> dict[str, Any]:
        return m.public_view(self._get(app, machine_id))

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
        doc = self._get(app, machine_id)
        self._check_lease(doc, nonce)  # before preparing the new image (checked again below)
        body = _body(body, {"config", "name", "region", "skip_launch", "lease_ttl",
                            "skip_service_registration"})  # fmt: skip
        if "config" not in body:
            raise InvalidRequestError("config: required (updates replace the whole config)")
        config = m.validate_config(body["config"])
        for key in ("name", "region"):
            if body.get(key) not in (None, doc[key]):
                raise InvalidRequestError(f"{key}: cannot be changed by an update")
        skip_launch = _bool(body.get("skip_launch", False), "skip_launch")
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

    async def wait_machine(
        self,
        app: str,
        machine_id: str,
        *,
        state: str = m.STARTED,
        timeout: float = 60.0,
        instance_id: str | None = None,
    ) -> bool:
        """Until the machine is in ``state`` (and on ``instance_id`` when given); False on
        timeout. A destroyed machine satisfies ``destroyed`` after it was archived too."""
        if state not in m.WAITABLE:
            raise InvalidRequestError(
                f"state: cannot wait for {state!r} (one of {', '.join(sorted(m.WAITABLE))})"
            )
        if not 0 < timeout <= MAX_WAIT:
            raise InvalidRequestError(f"timeout: expected seconds in (0, {int(MAX_WAIT)}]")
        _check_app(app)
        known = machine_id in self._docs or self._gone.get(machine_id) == app
        if not known and not self._archived(machine_id):
            raise NotFoundError(f"machine {machine_id} not found in app {app}")
        deadline = self.clock.now() + timeout

        def satisfied() -> bool:
            doc = self._docs.get(machine_id)
            if doc is None:
                return state == m.DESTROYED
            if doc["app"] != app:
                return False
            if instance_id is not None and doc["instance_id"] != instance_id:
                return False
            return doc["state"] == state

        while not satisfied():
            left = deadline - self.clock.now()
            if left <= 0:
                return False
            event = self._changed.setdefault(machine_id, anyio.Event())
            await wait_until(self.clock, event.wait, left)
        return True

    def _archived(self, machine_id: str) -> bool:
        assert self.store is not None
        try:
            return archive_key(machine_id) in self.store.archive_store.list_keys()
        except ValueError:
            return False

    # --- runs (flyd's admin view) -------------------------------------------------------------

    def list_runs(self, app: str, machine_id: str) -> list[dict[str, Any]]:
        """The machine's live runs, oldest first."""
        self._get(app, machine_id)
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
        self._get(app, machine_id)
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
        doc = self._get(app, machine_id)
        self._check_lease(doc, nonce)
        assert self.engine is not None
        if run_id not in {r.run_id for r in self.engine.list_runs(machine_id)}:
            raise NotFoundError(f"machine {machine_id} has no live run {run_id}")
        if not await self.engine.cancel(run_id, "cancelled through the API"):
            raise InvalidTransitionError(f"run {run_id} is already finishing")

    # --- leases -------------------------------------------------------------------------------

    def _new_lease(self, nonce: str, ttl: float, owner: str, description: str) -> dict[str, Any]:
        return {
            "nonce": nonce,
            "owner": owner,
            "description": description,
            "expires_at": self.clock.now() + ttl,
            "version": self.ids.ulid(),
        }

    async def acquire_lease(
        self, app: str, machine_id: str, *, ttl: Any = 30, description: str = "",
        owner: str = "api", nonce: str | None = None,
    ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Take the lease (or extend it when ``nonce`` is the holder's). Returns the lease view
        with its nonce and whether it is new."""
        seconds = _ttl(ttl)
        if not isinstance(description, str) or len(description) > 1024:
            raise InvalidRequestError("description: expected a string of at most 1024 characters")
        lock = self._api_locks.setdefault(machine_id, anyio.Lock())
        async with lock:
            doc = self._get(app, machine_id)
            current = m.active_lease(doc, self.clock.now())
            if current is not None and nonce != current["nonce"]:
                raise LeaseError(
                    f"lease currently held by {current['owner']} until "
                    f"{m.iso(current['expires_at'])}"
                )
            if current is not None:
                lease = dict(current, expires_at=self.clock.now() + seconds)
            else:
                lease = self._new_lease(self.ids.nonce(), seconds, owner, description)
            await self.update(machine_id, lambda d: d.__setitem__("lease", lease))
        return m.lease_view(lease, with_nonce=True), current is None

    def get_lease(self, app: str, machine_id: str) -> dict[str, Any]:
        lease = m.active_lease(self._get(app, machine_id), self.clock.now())
        if lease is None:
            raise NotFoundError(f"machine {machine_id} has no lease")
        return m.lease_view(lease, with_nonce=False)

    async def release_lease(self, app: str, machine_id: str, *, nonce: str | None) -> None:
        lock = self._api_locks.setdefault(machine_id, anyio.Lock())
        async with lock:
            doc = self._get(app, machine_id)
            lease = m.active_lease(doc, self.clock.now())
            if lease is None:
                raise NotFoundError(f"machine {machine_id} has no lease")
            if nonce != lease["nonce"]:
                raise LeaseError(f"machine {machine_id}: the lease nonce does not match")
            await self.update(machine_id, lambda d: d.__setitem__("lease", None))

    # --- metadata -----------------------------------------------------------------------------

    def get_metadata(self, app: str, machine_id: str) -> dict[str, str]:
        return dict(self._get(app, machine_id)["config"].get("metadata", {}))

    async def set_metadata(
        self, app: str, machine_id: str, key: str, value: Any, *, nonce: str | None = None
    ) -> None:
        if not isinstance(key, str) or not m.METADATA_KEY.match(key):
            raise InvalidRequestError(f"invalid metadata key {key!r}")
        if not isinstance(value, str) or len(value) > 4096:
            raise InvalidRequestError("value: expected a string of at most 4096 characters")
        await self._meta(app, machine_id, nonce, lambda md: md.__setitem__(key, value))

    async def delete_metadata(
        self, app: str, machine_id: str, key: str, *, nonce: str | None = None
    ) -> None:
        if key not in self._get(app, machine_id)["config"].get("metadata", {}):
            raise NotFoundError(f"machine {machine_id} has no metadata key {key!r}")
        await self._meta(app, machine_id, nonce, lambda md: md.pop(key, None))

    async def _meta(self, app, machine_id, nonce, change) -> None:
        lock = self._api_locks.setdefault(machine_id, anyio.Lock())
        async with lock:
            doc = self._get(app, machine_id)
            self._check_lease(doc, nonce)
            if doc["state"] in (m.DESTROYING, m.DESTROYED):
                raise InvalidTransitionError(f"machine {machine_id} is {doc['state']}")
            await self.update(machine_id, lambda d: change(d["config"].setdefault("metadata", {})))


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


def _ttl(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError("ttl: expected a number of seconds")
    if not 0 < value <= MAX_LEASE_TTL:
        raise InvalidRequestError(f"ttl: expected seconds in (0, {MAX_LEASE_TTL}]")
    return float(value)


__all__ = ["Orchestrator"]
