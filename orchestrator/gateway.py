"""The gateway (Fly's flaps, in small): one Machines API over many workers.

A gateway runs beside an agent and reads that agent's replica of the ``workers`` and
``machines`` tables; it keeps no state of its own, so any number of gateways can serve the same
cluster with no coordinator between them.

* Create: the live workers (heartbeat fresher than ``HEARTBEAT_TTL``, not cordoned or
  draining) in the request's ``region`` (any region without one) with free capacity, most free
  first, are tried in turn; a worker that refuses the connection, times out or answers 5xx is
  skipped for the next. A 4xx is the caller's error and is returned as is.
* Every per-machine call goes to the worker that owns the machine (``machines.worker``). A
  machine not in the replica yet (just created, through this gateway or another) is waited for,
  up to ``replication_wait`` seconds, before answering 404.
* List comes from the replica, across workers, with Fly's filters: ``region``, ``state``
  (comma-separated), ``metadata.<key>=<value>``, ``include_deleted``, ``summary``.
* ``POST /v1/workers/{id}/cordon`` / ``uncordon`` forwards to that worker, which stops (or
  resumes) taking new machines.
* ``GET /v1/workers`` lists the workers as this replica sees them, each with ``live`` and
  ``used``.

The gateway takes the workers' bearer token and forwards the caller's ``Authorization``.
Answers carry ``fly-worker``: the worker that served them.

Tracing: each request is a SERVER span continuing the caller's ``traceparent``, each forward a
CLIENT span whose context the worker receives in ``traceparent``, so a create through the
gateway (placement, the worker's API span, its run and steps) is one trace. Without a tracer
provider in this process, the caller's ``traceparent`` is passed on as received.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import apsw
import httpx
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import tracing
from .machine import DESTROYED, iso
from .proxy import open_replica
from .publish import MACHINES_TABLE
from .workers import HEARTBEAT_TTL, WORKER_COLUMNS, WORKERS_TABLE, WorkerInfo

log = logging.getLogger(__name__)
BASE = "/v1/apps/{app}/machines"
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
SPAN_PARAMS = {"app": "fly.app", "machine_id": "machine.id"}  # path parameter: span attribute
LIST_PARAMS = {"region", "state", "include_deleted", "summary"}
LIST_COLUMNS = (
    "id", "name", "app", "worker", "region", "state", "instance_id", "private_ip", "cordoned",
    "checks", "services", "metadata", "updated_at",
)  # fmt: skip


class GatewayReplica:
    """Reads of the ``workers`` and ``machines`` tables in a replica database file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = open_replica(self.path)
        self._lock = threading.Lock()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, params).fetchall())
            except apsw.SQLError:  # the table has not replicated here yet
                return []

    def workers(self) -> list[WorkerInfo]:
        rows = self._rows(f"SELECT {', '.join(WORKER_COLUMNS)} FROM {WORKERS_TABLE} ORDER BY id")
        return [
            WorkerInfo(str(i), str(r), str(u), int(c), bool(co), bool(d), int(h))
            for i, r, u, c, co, d, h in rows
        ]

    def used(self) -> dict[str, int]:
        """Machines per worker that take capacity (every one not destroyed)."""
        rows = self._rows(
            f"SELECT worker, count(*) FROM {MACHINES_TABLE} WHERE state != ? GROUP BY worker",
            (DESTROYED,),
        )
        return {str(w): int(n) for w, n in rows}

    def known(self, machine_ids: Sequence[str]) -> set[str]:
        """Which of ``machine_ids`` the replica has."""
        if not machine_ids:
            return set()
        marks = ", ".join("?" for _ in machine_ids)
        rows = self._rows(f"SELECT id FROM {MACHINES_TABLE} WHERE id IN ({marks})", machine_ids)
        return {str(r[0]) for r in rows}

    def owner(self, app: str, machine_id: str) -> str | None:
        rows = self._rows(
            f"SELECT worker FROM {MACHINES_TABLE} WHERE id = ? AND app = ?", (machine_id, app)
        )
        return str(rows[0][0]) if rows else None

    def machines(self, app: str, *, machine_id: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(LIST_COLUMNS)} FROM {MACHINES_TABLE} WHERE app = ?"
        params: list[Any] = [app]
        if machine_id is not None:
            sql += " AND id = ?"
            params.append(machine_id)
        rows = self._rows(sql + " ORDER BY id", params)
        return [dict(zip(LIST_COLUMNS, r, strict=True)) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def live(worker: WorkerInfo, now_ms: int, ttl: float = HEARTBEAT_TTL) -> bool:
    return now_ms - worker.heartbeat <= ttl * 1000


def place(
    workers: Sequence[WorkerInfo],
    used: dict[str, int],
    *,
    region: str | None,
    now_ms: int,
    ttl: float = HEARTBEAT_TTL,
) -> list[WorkerInfo]:
    """The workers to try for a new machine, in order: live, accepting (not cordoned or
    draining), in ``region`` when given, with free capacity; most free first, then by id."""
    fit = [
        w for w in workers
        if live(w, now_ms, ttl) and not w.cordoned and not w.draining and w.api_url
        and (not region or w.region == region) and w.capacity - used.get(w.id, 0) > 0
    ]  # fmt: skip
    return sorted(fit, key=lambda w: (-(w.capacity - used.get(w.id, 0)), w.id))


def list_filter(params: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """The filters of a list request, or an error message for a parameter it does not know."""
    unknown = sorted(k for k in params if k not in LIST_PARAMS and not k.startswith("metadata."))
    if unknown:
        return {}, f"unknown query parameter(s) {', '.join(unknown)}"
    filters: dict[str, Any] = {
        "region": params.get("region") or None,
        "states": [s for s in params.get("state", "").split(",") if s] or None,
        "metadata": {
            k.removeprefix("metadata."): v for k, v in params.items() if k.startswith("metadata.")
        },
    }
    for flag in ("include_deleted", "summary"):
        value = params.get(flag, "false").lower()
        if value not in ("1", "true", "0", "false", ""):
            return {}, f"{flag}: expected true or false, got {params[flag]!r}"
        filters[flag] = value in ("1", "true", "")
    return filters, None


def matches(row: dict[str, Any], filters: dict[str, Any]) -> bool:
    if row["state"] == DESTROYED and not filters["include_deleted"]:
        return False
    if filters["region"] and row["region"] != filters["region"]:
        return False
    if filters["states"] and row["state"] not in filters["states"]:
        return False
    metadata = _loads(row["metadata"], {})
    return all(metadata.get(k) == v for k, v in filters["metadata"].items())


def _loads(text: str, default: Any) -> Any:
    try:
        return json.loads(text or "null") or default
    except json.JSONDecodeError:
        return default


def replica_view(row: dict[str, Any], *, summary: bool = False) -> dict[str, Any]:
    """A machine as the replica knows it: Fly's Machine JSON without what only the owner holds
    (events, the rest of the config)."""
    view: dict[str, Any] = {
        "id": row["id"],
        "name": row["name"] or row["id"],
        "state": row["state"],
        "region": row["region"],
        "instance_id": row["instance_id"],
        "private_ip": row["private_ip"],
        "updated_at": iso(row["updated_at"] / 1000),
        "cordoned": bool(row["cordoned"]),
        "worker": row["worker"],
    }
    if not summary:
        view["config"] = {"metadata": _loads(row["metadata"], {}),
                          "services": _loads(row["services"], [])}  # fmt: skip
        view["checks"] = _loads(row["checks"], [])
    return view


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Gateway:
    """The gateway's ASGI app over a replica (see the module docstring)."""

    def __init__(
        self,
        replica: GatewayReplica,
        *,
        token: str | None = None,
        replication_wait: float = 5.0,
        heartbeat_ttl: float = HEARTBEAT_TTL,
        client: httpx.AsyncClient | None = None,
        create_timeout: float = 30.0,
    ) -> None:
        self.replica = replica
        self.token = token
        self.replication_wait = replication_wait
        self.heartbeat_ttl = heartbeat_ttl
        self.create_timeout = create_timeout
        self._client = client
        # machines this gateway created, until its replica has them: their owner is known here
        self._created: OrderedDict[str, str] = OrderedDict()
        # each worker's liveness as this gateway last saw it, to log changes once
        self._live_seen: dict[str, bool] = {}
        methods = ["GET", "POST", "DELETE", "PUT"]
        routes = [
            Route(path, self._traced(handler, path), methods=ms)
            for path, handler, ms in [
                ("/v1/workers", self._workers, ["GET"]),
                ("/v1/workers/{worker_id}/{action:str}", self._cordon, ["POST"]),
                (BASE, self._machines, ["GET", "POST"]),
                (BASE + "/{machine_id}", self._one, methods),
                (BASE + "/{machine_id}/{rest:path}", self._one, methods),
            ]
        ]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        owned = self._client is None
        if owned:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=2.0))
        try:
            yield
        finally:
            if owned and self._client is not None:
                await self._client.aclose()
                self._client = None

    @staticmethod
    def _traced(handler: Callable[[Request], Awaitable[Response]], route: str):
        async def handle(request: Request) -> Response:
            params = request.path_params
            attrs = {a: params[p] for p, a in SPAN_PARAMS.items() if p in params}
            with tracing.server_span(request.method, route, request.headers, attrs) as span:
                response = await handler(request)
                tracing.responded(span, response.status_code)
                return response

        return handle

    async def _forward(
        self, request: Request, worker: WorkerInfo, path: str, content: bytes, timeout: float | None
    ) -> httpx.Response:
        """Send ``request`` to ``worker`` in a CLIENT span the worker's spans continue."""
        attrs = {"orchestrator.worker": worker.id, "url.full": worker.api_url + path}
        with tracing.tracer().start_as_current_span(
            f"{request.method} {worker.id}", kind=SpanKind.CLIENT, attributes=attrs
        ) as span:
            response = await self.client.request(
                request.method, worker.api_url + path, headers=_forwarded(request),
                content=content, timeout=timeout,
            )  # fmt: skip
            tracing.responded(span, response.status_code)
            return response

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway's client is not open (run it with its lifespan)")
        return self._client

    def _denied(self, request: Request) -> Response | None:
        if self.token is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return None
        return _error(401, "missing or invalid bearer token")

    def _now_ms(self) -> int:
        return int(time.time() * 1000)  # heartbeats are wall-clock milliseconds

    def _live_workers(self, now_ms: int) -> list[WorkerInfo]:
        """The replica's workers, logging each one whose liveness changed since this gateway
        last looked: an operator sees why machines stopped (or resumed) landing on a host."""
        workers = self.replica.workers()
        for w in workers:
            is_live = live(w, now_ms, self.heartbeat_ttl)
            if self._live_seen.get(w.id, True) and not is_live:
                log.warning("worker %s is not live (last heartbeat %.1f s ago, limit %.0f s): "
                            "new machines go to other workers",
                            w.id, (now_ms - w.heartbeat) / 1000, self.heartbeat_ttl)  # fmt: skip
            elif self._live_seen.get(w.id) is False and is_live:
                log.info("worker %s is live again", w.id)
            self._live_seen[w.id] = is_live
        return workers

    # --- endpoints ----------------------------------------------------------------------------

    async def _workers(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        used, now = self.replica.used(), self._now_ms()
        workers = self._live_workers(now)
        return JSONResponse([
            {"id": w.id, "region": w.region, "api_url": w.api_url, "capacity": w.capacity,
             "used": used.get(w.id, 0), "cordoned": w.cordoned, "draining": w.draining,
             "live": live(w, now, self.heartbeat_ttl), "heartbeat": iso(w.heartbeat / 1000)}
            for w in workers
        ])  # fmt: skip

    async def _cordon(self, request: Request) -> Response:
        """``POST /v1/workers/{id}/cordon`` or ``uncordon``, forwarded to that worker (the
        only writer of its row); the answer is the worker's."""
        if (denied := self._denied(request)) is not None:
            return denied
        wid, action = request.path_params["worker_id"], request.path_params["action"]
        if action not in ("cordon", "uncordon"):
            return _error(404, f"no such worker action {action!r} (cordon or uncordon)")
        worker = next((w for w in self.replica.workers() if w.id == wid), None)
        if worker is None or not worker.api_url:
            return _error(404, f"worker {wid} is not in the workers table")
        try:
            response = await self.client.post(
                f"{worker.api_url}/v1/worker/{action}", headers=_forwarded(request)
            )
        except (httpx.TimeoutException, httpx.TransportError) as e:
            return _error(503, f"worker {wid} is unreachable ({type(e).__name__})")
        return _relay(response, wid)

    async def _machines(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        app = request.path_params["app"]
        if request.method == "POST":
            return await self._create(request, app)
        filters, problem = list_filter(dict(request.query_params))
        if problem is not None:
            return _error(400, problem)
        rows = [r for r in self.replica.machines(app) if matches(r, filters)]
        return JSONResponse([replica_view(r, summary=filters["summary"]) for r in rows])

    async def _create(self, request: Request, app: str) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body) if body.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"request body: invalid JSON ({e})")
        if not isinstance(parsed, dict):
            return _error(400, "request body: expected a JSON object")
        region = parsed.get("region") or None
        if region is not None and not isinstance(region, str):
            return _error(400, "region: expected a string")
        now = self._now_ms()
        candidates = place(self._live_workers(now), self._used(), region=region, now_ms=now,
                           ttl=self.heartbeat_ttl)  # fmt: skip
        if not candidates:
            where = f" in region {region}" if region else ""
            return _error(503, f"no live worker{where} with free capacity")
        failures = []
        for worker in candidates:
            try:
                response = await self._forward(
                    request, worker, f"/v1/apps/{app}/machines", body, self.create_timeout
                )
            except (httpx.TimeoutException, httpx.TransportError) as e:
                failures.append(f"{worker.id}: {type(e).__name__}")
                log.warning("create in app %s: worker %s unreachable (%s); trying the next",
                            app, worker.id, type(e).__name__)  # fmt: skip
                continue
            if response.status_code >= 500:
                failures.append(f"{worker.id}: {response.status_code}")
                log.warning("create in app %s: worker %s answered %d (%s); trying the next",
                            app, worker.id, response.status_code,
                            response.text[:200])  # fmt: skip
                continue
            if response.status_code < 300:
                mid = _loads(response.text, {}).get("id")
                if isinstance(mid, str):
                    self._remember(mid, worker.id)
            return _relay(response, worker.id)
        return _error(503, "no worker took the machine (" + "; ".join(failures) + ")")

    def _used(self) -> dict[str, int]:
        """Machines per worker: the replica's count plus what this gateway created that has not
        replicated here yet (so a burst of creates spreads instead of piling on one worker)."""
        used = self.replica.used()
        pending = list(self._created)
        known = self.replica.known(pending)
        for mid in pending:
            if mid in known:
                del self._created[mid]
            else:
                worker = self._created[mid]
                used[worker] = used.get(worker, 0) + 1
        return used

    def _remember(self, machine_id: str, worker: str) -> None:
        self._created[machine_id] = worker
        while len(self._created) > 1024:
            self._created.popitem(last=False)

    async def _owner(self, app: str, machine_id: str) -> str | None:
        """The machine's worker from the replica, waiting up to ``replication_wait`` for a
        machine the replica does not have yet."""
        deadline = anyio.current_time() + self.replication_wait
        while True:
            owner = self.replica.owner(app, machine_id)
            if owner is not None:
                self._created.pop(machine_id, None)
                return owner
            if machine_id in self._created:
                return self._created[machine_id]
            if anyio.current_time() >= deadline:
                return None
            await anyio.sleep(0.05)

    async def _one(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        app, mid = request.path_params["app"], request.path_params["machine_id"]
        owner = await self._owner(app, mid)
        if owner is None:
            return _error(404, f"machine {mid} not found")
        worker = next((w for w in self.replica.workers() if w.id == owner), None)
        if worker is None or not worker.api_url:
            return _error(503, f"machine {mid}'s worker {owner} is not in the workers table")
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        timeout: float | None = 60.0
        if request.url.path.endswith("/wait"):
            try:
                timeout = float(request.query_params.get("timeout") or 60) + 10
            except ValueError:
                timeout = 70.0  # the worker answers the bad value with a 400
        try:
            response = await self._forward(request, worker, path, await request.body(), timeout)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            rows = self.replica.machines(app, machine_id=mid)
            if request.method == "GET" and request.path_params.get("rest") is None and rows:
                view = JSONResponse(replica_view(rows[0]), headers={"fly-worker": owner})
                view.headers["warning"] = f'199 - "worker {owner} unreachable: from the replica"'
                return view
            return _error(503, f"machine {mid}'s worker {owner} is unreachable "
                               f"({type(e).__name__})")  # fmt: skip
        return _relay(response, owner)


def _forwarded(request: Request) -> dict[str, str]:
    """The caller's headers a worker gets: hop-by-hop ones dropped, the trace context the
    current (forwarding) span's."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    tracing.inject_headers(headers)
    return headers


def _relay(response: httpx.Response, worker: str) -> Response:
    headers = {k: v for k, v in response.headers.items()
               if k.lower() not in HOP_BY_HOP and k.lower() not in ("date", "server",
                                                                   "content-encoding")}  # fmt: skip
    headers["fly-worker"] = worker
    return Response(response.content, status_code=response.status_code, headers=headers)
