"""Per-machine databases at fleet scale: which schema each machine's step log is on, and the
background migrator that brings them all to this release's schema without pausing the worker.

Theory of operation
===================

Each machine's step log records its schema in the file (``PRAGMA user_version`` and the
``schema_meta`` row: version and hash; :mod:`.steplog_schema`). Opening a log never migrates
it, so a worker with 10,000 machines of an older release starts as fast as before and serves
reads at once. A database is migrated, in one transaction, by whichever comes first:

* **lazily**: the first write to it (any operation, lease or metadata change) migrates it in the
  writer's worker thread before writing;
* **eagerly**: :class:`Migrations.run` walks the machines still on an older schema, one database
  per step, at most ``rate`` per second, yielding to the event loop between steps, so API calls
  are served throughout. Each step closes the machine's log here if open and migrates the
  file in a worker process (``anyio.to_process``): a migration is mostly schema diffing in
  Python, which in a thread would hold the GIL the event loop needs (API latency tripled in the
  bench). A call that reopens the log meanwhile waits on SQLite's lock and sees the result.

Ownership
=========

M1  A worker thread opens or migrates a file and records the resulting :class:`SchemaStatus` in
    the store (an immutable value under the store's status lock); it changes nothing else. A
    worker process migrates a file and returns its status, which the loop records.
M2  The event loop installs statuses (:meth:`Migrations.install`): its own map, which the API
    and the publisher read, the metrics, one ERROR log line per failure, and the machine's row
    marked for publishing (its ``schema_version``/``schema_state`` columns). The loop installs
    after each background step and whenever a machine's document changes.

A migration that fails (a constraint the data violates, a damaged file) changes nothing in the
file; the machine is FAILED with the reason: reads still answer from the old schema, writes raise
``MigrationFailedError`` (HTTP 503) naming the reason, and the failure is not retried until the
worker restarts (after an operator repaired the file).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_process

from .errors import OrchestratorError
from .steplog import migrate_file
from .steplog_schema import CURRENT, FAILED, SchemaStatus
from .store import MachineStore

log = logging.getLogger(__name__)

DEFAULT_RATE = 50.0  # background migrations per second


class Migrations:
    """The loop's view of every machine database's schema, and the background migrator."""

    def __init__(
        self,
        store: MachineStore,
        *,
        rate: float = DEFAULT_RATE,
        io: Callable[..., Awaitable[Any]],
        on_change: Callable[[str], None],
        processes: bool = True,
    ) -> None:
        """``rate``: background migrations per second (0: none; writes still migrate lazily).
        ``io``: runs a blocking call off the loop. ``on_change``: a machine's status changed
        (the service republishes it). ``processes``: background steps in a worker process
        (False: all through ``io``)."""
        if not rate >= 0:
            raise ValueError("the migration rate must be a number >= 0")
        self.store = store
        self.rate = rate
        self._io = io
        self._on_change = on_change
        self._processes = processes
        self._status: dict[str, SchemaStatus] = {}
        self.migrated = 0  # pending -> current, lazily or in the background
        self.failed = 0  # migrations that failed (the file left as it was)
        self.step_seconds = 0.0  # wall time spent in background steps (thread hand-off included)
        self.background_done = anyio.Event()

    def status(self, machine_id: str) -> SchemaStatus | None:
        return self._status.get(machine_id)

    def counts(self) -> Counter[tuple[int, str]]:
        """Machines by (schema version, state)."""
        return Counter((st.version, st.state) for st in self._status.values())

    def install(self) -> None:
        """Take the statuses worker threads recorded since the last call (M2)."""
        for mid in self.store.take_schema_changes():
            status = self.store.schema_status(mid)
            before = self._status.pop(mid, None)
            if status is None:  # its database was discarded or archived
                continue
            self._status[mid] = status
            if status.state == FAILED and (before is None or before.state != FAILED):
                self.failed += 1
                log.error(
                    "machine %s: step-log migration to schema %d failed, database left as it "
                    "was (%s)", mid, self.store.target.version, status.error,
                )  # fmt: skip
            elif status.state == CURRENT and before is not None and before.state != CURRENT:
                self.migrated += 1
                log.info("machine %s: step log migrated %d -> %d", mid, before.version,
                         status.version)  # fmt: skip
            if status != before:
                self._on_change(mid)

    async def run(self) -> None:
        """Migrate every machine still on an older schema, one per step, at most ``rate`` per
        second; returns when none is left (new databases are created on the current schema)."""
        try:
            if self.rate <= 0:
                return
            interval = 1.0 / self.rate
            next_at = anyio.current_time()
            tried: set[str] = set()  # not retried this run: gone meanwhile, or failed
            self.install()
            while pending := [m for m in self.store.pending_migrations() if m not in tried]:
                for mid in pending:
                    step_began = anyio.current_time()
                    status = None
                    with contextlib.suppress(OrchestratorError):  # destroyed meanwhile
                        status = await self._step(mid)
                    if status is None or status.state != CURRENT:
                        tried.add(mid)
                    self.step_seconds += anyio.current_time() - step_began
                    self.install()
                    # paced in real time (it bounds load on this host, not logical time)
                    next_at = max(next_at + interval, anyio.current_time())
                    await anyio.sleep(max(0.0, next_at - anyio.current_time()))
        finally:
            self.background_done.set()

    async def _step(self, mid: str) -> SchemaStatus:
        if not self._processes:
            status: SchemaStatus = await self._io(self.store.migrate, mid)
            return status
        path = self.store.file_of(mid)
        await self._io(self.store.release, mid)  # its lock waits for a call in progress
        status = await anyio.to_process.run_sync(
            migrate_file, str(path), self.store.target, cancellable=True
        )
        # a log opened here meanwhile may have recorded the older status after the process read
        # it; such a machine is pending again and its next step finds it current
        self.store.record_status(mid, status)
        return status


__all__ = ["DEFAULT_RATE", "Migrations"]
