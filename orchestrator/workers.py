"""Workers announce themselves in the replicated ``workers`` table, for gateways to place on.

Each worker is the only writer of its own row (like its machines' rows): region, the URL of its
Machines API, its capacity, and a heartbeat (wall-clock milliseconds) rewritten every few
seconds. A gateway reading its local replica treats a worker whose heartbeat is older than a
few intervals as dead, and one marked ``draining`` (set as the worker shuts down) or
``cordoned`` as taking no new machines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .clock import Clock
from .publish import Publisher

log = logging.getLogger(__name__)

WORKERS_TABLE = "workers"
WORKER_COLUMNS = ("id", "region", "api_url", "capacity", "cordoned", "draining", "heartbeat")
HEARTBEAT_INTERVAL = 2.0  # seconds between heartbeats
HEARTBEAT_TTL = 10.0  # a worker silent for longer is dead to gateways


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    region: str
    api_url: str
    capacity: int
    cordoned: bool = False
    draining: bool = False
    heartbeat: int = 0  # wall-clock milliseconds


def worker_statement(info: WorkerInfo) -> list[Any]:
    cols = ", ".join(WORKER_COLUMNS)
    marks = ", ".join("?" for _ in WORKER_COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in WORKER_COLUMNS if c != "id")
    sql = (
        f"INSERT INTO {WORKERS_TABLE} ({cols}) VALUES ({marks}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )
    return [sql, [info.id, info.region, info.api_url, info.capacity, int(info.cordoned),
                  int(info.draining), info.heartbeat]]  # fmt: skip


def api_url_for(addrs: list[tuple[str, int]]) -> str:
    """The URL gateways use for a worker serving its API on ``addrs`` (the first one): an
    unspecified address (0.0.0.0, ::) is not reachable as such, so this host's name stands in."""
    import socket

    if not addrs:
        return ""
    host, port = addrs[0][0], addrs[0][1]
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


class Announcer:
    """Writes this worker's row at start and then every ``interval`` seconds; ``drain()``
    publishes it one last time marked draining (as the worker stops)."""

    def __init__(
        self,
        publisher: Publisher,
        info: WorkerInfo,
        *,
        clock: Clock,
        interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.publisher = publisher
        self.info = info
        self.clock = clock
        self.interval = interval
        self.beats = 0

    async def beat(self, *, draining: bool = False) -> None:
        info = WorkerInfo(
            self.info.id, self.info.region, self.info.api_url, self.info.capacity,
            self.info.cordoned, draining, int(self.clock.now() * 1000),
        )  # fmt: skip
        await self.publisher.execute([worker_statement(info)])
        self.beats += 1

    async def run(self) -> None:
        """Heartbeat forever; a failed write is logged and retried at the next beat."""
        while True:
            try:
                await self.beat()
            except Exception as e:  # noqa: BLE001 — the agent may be busy: the next beat retries
                log.warning("publishing worker %s's heartbeat failed: %s", self.info.id, e)
            await self.clock.sleep(self.interval)

    async def drain(self) -> None:
        try:
            await self.beat(draining=True)
        except Exception as e:  # noqa: BLE001 — stopping anyway: the heartbeat just ages out
            log.warning("marking worker %s draining failed: %s", self.info.id, e)
