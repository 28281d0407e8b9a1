"""The agent's tombstone reaper (``db.tombstone_gc``): every ``db.tombstone_gc_interval`` the
loop advances the watermark (``corrosion.core.tombstones``), a worker thread collects up to
``db.tombstone_gc_batch`` deleted rows below it under the database lock, and the loop installs
the table floors the pass left. A pass that collects something logs one INFO line."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from crdt.reaper import merge_floors

from ..core.replication import Replicator
from ..core.store import Store
from ..core.tombstones import ReapResult, reap

log = logging.getLogger("corrosion.tombstones")


@dataclass
class ReaperStats:
    """What ``/metrics`` shows: passes run, deleted rows collected (by table), clock rows."""

    passes: int = 0
    reaped: dict[str, int] = field(default_factory=dict)
    clock_rows: int = 0


class Reaper:
    def __init__(
        self, store: Store, replicator: Replicator, db_lock: anyio.Lock, interval: float, batch: int
    ) -> None:
        self.store = store
        self.replicator = replicator
        self.db_lock = db_lock
        self.interval = interval
        self.batch = batch
        self.stats = ReaperStats()
        self.scanned: dict[str, int] = {}  # per table, where the next pass starts

    async def run(self) -> None:
        async with self.db_lock:
            remembered = await anyio.to_thread.run_sync(self.store.load_members)
        for actor, _address, state, _meta in remembered:
            self.replicator.watermark.remembered(actor, left=state == "LEFT")
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.run_pass()
            except Exception:
                log.exception("tombstone GC pass failed")

    async def run_pass(self) -> ReapResult | None:
        """One pass: None when nothing is reapable yet (a member has not reported, or the
        watermark has not settled)."""
        cut = self.replicator.watermark.advance(self.store.bookie)
        if cut is None:
            waiting = self.replicator.watermark.unreported(self.store.bookie)
            if waiting:
                log.debug("tombstone GC waits for %d members' heads", len(waiting))
            return None
        async with self.db_lock:
            with anyio.CancelScope(shield=True):
                result = await anyio.to_thread.run_sync(
                    reap, self.store, cut, self.batch, dict(self.scanned)
                )
                # O3: before the lock is free; floors heard from peers are kept
                self.store.tombstone_floors = merge_floors(
                    self.store.tombstone_floors, result.floors
                )
        self.scanned.update(result.scanned)
        self.stats.passes += 1
        for table, n in result.keys.items():
            self.stats.reaped[table] = self.stats.reaped.get(table, 0) + n
        self.stats.clock_rows += result.clock_rows
        if result.total_keys:
            log.info(
                "tombstone GC collected %d deleted row%s (%s; %d clock rows) at or below "
                "db_version %d",
                result.total_keys,
                "" if result.total_keys == 1 else "s",
                ", ".join(f"{t}: {n}" for t, n in sorted(result.keys.items())),
                result.clock_rows,
                result.bound,
            )
        return result
