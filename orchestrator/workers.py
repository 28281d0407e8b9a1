"""Workers announce themselves in the replicated ``workers`` table, for gateways to place on.

Each worker is the only writer of its own row (like its machines' rows): region, the URL of its
Machines API, its capacity, and a heartbeat (wall-clock milliseconds) rewritten every few
seconds. A gateway reading its local replica treats a worker whose heartbeat is older than a
few intervals as dead, and one marked ``draining`` (set as the worker shuts down) or
``cordoned`` as taking no new machines.

An operator cordons a worker (before maintenance, say) with ``POST /v1/worker/cordon`` on its
API, or through any gateway with ``POST /v1/workers/{id}/cordon``; the flag is kept in a file
beside the machine databases, so the worker comes back cordoned after a restart until it is
uncordoned. Its machines keep running and keep answering: cordoning only stops placement.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from corrosion.files import write_json_durably

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
        cordon_path: Path | None = None,
        api_url: Callable[[], str] | None = None,
    ) -> None:
        """``api_url``: where this worker's API is, asked at every beat (the agent's bound
        address is known only once its API serves: a configured port 0 is not an address)."""
        self.publisher = publisher
        self._api_url = api_url
        self.clock = clock
        self.interval = interval
        self.cordon_path = cordon_path
        self.beats = 0
        self.info = replace(info, cordoned=read_cordon(cordon_path)) if cordon_path else info
        if self.info.cordoned:
            log.warning("worker %s starts cordoned: it takes no new machines until "
                        "POST /v1/worker/uncordon", info.id)  # fmt: skip

    async def set_cordoned(self, cordoned: bool) -> bool:
        """Cordon or uncordon this worker; True when that changed something. The flag is saved
        before it is published, so an answered request survives a crash; a failed publish is
        retried by the next heartbeat."""
        if self.info.cordoned == cordoned:
            return False
        if self.cordon_path is not None:
            write_json_durably(self.cordon_path, {"cordoned": cordoned})
        self.info = replace(self.info, cordoned=cordoned)
        log.warning("worker %s %s", self.info.id,
                    "cordoned: gateways place no new machines here" if cordoned
                    else "uncordoned: gateways may place machines here again")  # fmt: skip
        try:
            await self.beat()
        except Exception as e:  # noqa: BLE001 — the agent may be busy: the next beat retries
            log.warning("publishing worker %s's cordon failed: %s", self.info.id, e)
        return True

    async def beat(self, *, draining: bool = False) -> None:
        if self._api_url is not None:
            url = self._api_url()
            if url != self.info.api_url:
                self.info = replace(self.info, api_url=url)
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

    def view(self) -> dict[str, Any]:
        i = self.info
        return {"id": i.id, "region": i.region, "api_url": i.api_url, "capacity": i.capacity,
                "cordoned": i.cordoned}  # fmt: skip

    async def drain(self) -> None:
        try:
            await self.beat(draining=True)
        except Exception as e:  # noqa: BLE001 — stopping anyway: the heartbeat just ages out
            log.warning("marking worker %s draining failed: %s", self.info.id, e)


def read_cordon(path: Path) -> bool:
    """The saved cordon flag (False when never set). An unreadable file is an operator's
    problem to see, not a reason to take machines: it is logged and read as cordoned."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        log.error("cannot read the cordon flag in %s (%s): starting cordoned", path, e)
        return True
    return bool(isinstance(data, dict) and data.get("cordoned"))


def worker_routes(announcer: Announcer) -> list[Route]:
    """``GET /v1/worker`` (this worker as it announces itself) and ``POST /v1/worker/cordon``
    / ``uncordon``, each answering the worker's view."""

    async def show(_request: Request) -> JSONResponse:
        return JSONResponse(announcer.view())

    async def cordon(_request: Request) -> JSONResponse:
        await announcer.set_cordoned(True)
        return JSONResponse(announcer.view())

    async def uncordon(_request: Request) -> JSONResponse:
        await announcer.set_cordoned(False)
        return JSONResponse(announcer.view())

    return [
        Route("/v1/worker", show, methods=["GET"]),
        Route("/v1/worker/cordon", cordon, methods=["POST"]),
        Route("/v1/worker/uncordon", uncordon, methods=["POST"]),
    ]
