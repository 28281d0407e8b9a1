"""Exit watchers: a started machine's instance exiting on its own becomes an ``exit`` run.

One watcher task per started instance (keyed by instance id and boot, so a restart gets a new
one). When the instance exits, the watcher queues an ``exit`` run behind the machine's accepted
runs - unless the machine already moved on, or an exit run for that very boot is accepted (a
resumed one). An exit is never dropped because some run is live: the run that started this boot
(an exit run's restart, an API restart) may still be finishing when its instance dies at once,
and it does not own that exit. Whether the exit still matters is decided when its run executes,
in order with the others: ``record_exit`` (:mod:`.operations`) ignores an exit whose boot a
stop, restart, update or destroy ahead of it already ended, and applies the restart policy to
the others (a restart is scheduled after its backoff: :mod:`.restarts`).
"""

from __future__ import annotations

import contextlib

import anyio.abc

from . import machine as m
from .clock import Clock
from .documents import Documents
from .drivers.base import Driver, DriverError, ExitStatus
from .engine import Engine
from .errors import EngineClosedError
from .tracing import detached


class ExitWatchers:
    """The watchers of one running service, in its task group."""

    def __init__(
        self,
        docs: Documents,
        driver: Driver,
        clock: Clock,
        engine: Engine,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        self._docs = docs
        self._driver = driver
        self._clock = clock
        self._engine = engine
        self._tg = tg
        self._watching: dict[str, tuple[str, str | None]] = {}

    def watch(self, machine_id: str) -> None:
        """Watch the machine's running instance (a no-op unless it is started and not yet
        watched)."""
        doc = self._docs.find(machine_id)
        if doc is None or doc["state"] != m.STARTED:
            return
        key = (doc["instance_id"], doc.get("boot"))
        if self._watching.get(machine_id) == key:
            return
        self._watching[machine_id] = key
        # an exit is a cause of its own: its run starts a trace, not the starting run's
        self._tg.start_soon(detached, self._watcher, machine_id, key, name=f"watch:{machine_id}")

    async def _watcher(self, machine_id: str, key: tuple[str, str | None]) -> None:
        try:
            try:
                exit_ = await self._driver.wait(key[0])
            except DriverError:
                exit_ = ExitStatus(exited_at=self._clock.now())  # the instance vanished
            # still watched until the exit run is accepted: a watch() meanwhile starts no twin
            await self._submit(machine_id, key, exit_)
        finally:
            if self._watching.get(machine_id) == key:
                del self._watching[machine_id]

    async def _submit(
        self, machine_id: str, key: tuple[str, str | None], exit_: ExitStatus
    ) -> None:
        doc = self._docs.find(machine_id)
        if doc is None or doc["state"] != m.STARTED or (doc["instance_id"], doc.get("boot")) != key:
            return  # the run that moved the machine on stopped or replaced this instance
        if self._accepted(machine_id, key):
            return
        request = {"instance_id": key[0], "boot": key[1], "exit": exit_.to_dict()}
        # EngineClosedError: the service is stopping; its next start watches the machine again
        # and sees the exit then
        with contextlib.suppress(EngineClosedError):
            await self._engine.start(machine_id, "exit", request, queue=True)

    def _accepted(self, machine_id: str, key: tuple[str, str | None]) -> bool:
        """Whether a live exit run already reports this boot's exit (one resumed after a
        restart of the service, or accepted before the watcher that noticed it was replaced)."""
        return any(
            run.action == "exit"
            and (run.request.get("instance_id"), run.request.get("boot")) == key
            for run in self._engine.list_runs(machine_id)
        )


__all__ = ["ExitWatchers"]
