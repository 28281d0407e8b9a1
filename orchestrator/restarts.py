"""Scheduled restarts: the restart policy's backoff, waited outside any run.

An exit run that decides to restart (``record_exit``, :mod:`.operations`) does not wait: it
leaves the machine ``starting`` with ``restart_at`` in its document (written with the run's
step, so it survives a crash) and finishes. One timer task per such machine sleeps on the
injected clock until ``restart_at`` and then queues a ``relaunch`` run, which launches the
machine unless something moved it on first.

Why not sleep inside the exit run: runs of a machine execute one at a time, so a stop, destroy
or update asked during a one-minute backoff would wait for it. Here nothing holds the machine's
queue while it waits: such a request runs at once, its first step sets a new state (which drops
``restart_at``), :meth:`RestartTimers.sync` cancels the timer, and a relaunch that was already
queued finds the restart stale and does nothing. After a crash the service's start syncs every
machine again: a restart still due waits the rest of its delay, one overdue runs at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import anyio.abc

from . import machine as m
from .clock import Clock
from .documents import Documents
from .engine import Backoff, Engine
from .errors import EngineClosedError
from .tracing import detached

log = logging.getLogger(__name__)


@dataclass
class _Timer:
    at: float
    scope: anyio.CancelScope


class RestartTimers:
    """The scheduled restarts of one running service, on tasks in its task group.
    ``sync(machine_id)`` after every change of a machine's document arms, keeps or cancels
    its timer."""

    def __init__(
        self,
        docs: Documents,
        clock: Clock,
        engine: Engine,
        tg: anyio.abc.TaskGroup,
        retry: Backoff,
    ) -> None:
        self._docs = docs
        self._clock = clock
        self._engine = engine
        self._tg = tg
        self._retry = retry
        self._timers: dict[str, _Timer] = {}

    def due(self, machine_id: str) -> float | None:
        """When the machine's scheduled restart is due (None: none is scheduled)."""
        doc = self._docs.find(machine_id)
        if doc is None or doc["state"] != m.STARTING:
            return None
        at = doc.get("restart_at")
        return None if at is None else float(at)

    def sync(self, machine_id: str) -> None:
        at = self.due(machine_id)
        timer = self._timers.get(machine_id)
        if timer is not None:
            if timer.at == at:
                return  # armed (or fired: its relaunch is queued) for this very restart
            timer.scope.cancel()
            del self._timers[machine_id]
        if at is None:
            return
        timer = self._timers[machine_id] = _Timer(at, anyio.CancelScope())
        # a restart is a cause of its own: its run starts a trace, not the exit's
        self._tg.start_soon(detached, self._fire, machine_id, timer, name=f"restart:{machine_id}")

    async def _fire(self, machine_id: str, timer: _Timer) -> None:
        with timer.scope:
            await self._clock.sleep(max(0.0, timer.at - self._clock.now()))
            if self._queued(machine_id, timer.at):
                return  # a relaunch run resumed after a crash already does it
            attempt = 0
            while True:
                try:
                    await self._engine.start(
                        machine_id, "relaunch", {"restart_at": timer.at}, queue=True
                    )
                    return
                except EngineClosedError:
                    return  # the service is stopping; its next start schedules it again
                except Exception:  # storage trouble: the restart is owed, try again
                    attempt += 1
                    log.exception("machine %s: could not start its scheduled restart", machine_id)
                    await self._clock.sleep(self._retry.delay(attempt))

    def _queued(self, machine_id: str, at: float) -> bool:
        return any(
            run.action == "relaunch" and run.request.get("restart_at") == at
            for run in self._engine.list_runs(machine_id)
        )


__all__ = ["RestartTimers"]
