"""A proxy-like consumer of the replicated ``machines`` table (fly-proxy's role, in small).

It routes an HTTP request for an app to one of the app's machines, chosen by SQL over the local
replica — started, not cordoned, no critical readiness check, with an HTTP-capable service —
wherever the machine runs: the row may have been written by any worker. It follows changes: the
routing table is re-read whenever SQLite's ``data_version`` says the replica changed (another
connection, such as the agent applying gossip, committed), and a machine that stops, is cordoned
or fails a check stops getting traffic as soon as its row arrives.

The app comes from the ``Host`` header (``<app>.<domain>``) or, without a domain, from the
configured default. ``fly-force-instance-id: <machine id>`` pins a request to one machine.
Backends are taken round-robin; a backend that refuses the connection is skipped for the next
one. When none takes the request, it is tried again (the replica re-read, every backend
reconnected) at short intervals growing from 2 ms to 20 ms, for up to
``(connect_attempts - 1) × retry_delay`` in all: a machine whose row is just replicating, or
that is about to listen, is reached as soon as it can be rather than a fixed delay later.
Every proxied response carries ``fly-machine-id`` (and ``fly-worker``) so callers can see
where it went; its ``date`` and ``server`` are those of the server serving the proxy (the
machine's are dropped, not repeated). No backend: 503 (naming the machines held back by failing
health checks, if any); a backend that took the request and then
failed: 502 (JSON errors).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import apsw
import httpx

from .publish import MACHINES_TABLE

ROUTE_SQL = (
    f"SELECT id, worker, address, services, checks FROM {MACHINES_TABLE} "
    "WHERE app = ? AND state = 'started' AND cordoned = 0 ORDER BY id"
)
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip
# seconds between the tries of a request no backend took: the first, then doubling up to the last
RETRY_FIRST, RETRY_MAX = 0.002, 0.02
# written by the server that serves the proxy: relayed too, a response would carry two of each
SERVER_WRITTEN = {"date", "server"}


@dataclass(frozen=True)
class Backend:
    machine_id: str
    worker: str
    host: str
    port: int
    failing: tuple[str, ...] = ()  # its critical readiness checks: out of rotation while any

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _backend(row: Sequence[Any]) -> Backend | None:
    machine_id, worker, address, services, checks = row
    try:
        svcs = json.loads(services or "[]")
        checks_ = json.loads(checks or "[]")
    except json.JSONDecodeError:
        return None
    failing = tuple(
        str(c.get("name", ""))
        for c in checks_
        if isinstance(c, dict)
        and c.get("status") == "critical"
        and c.get("kind", "readiness") != "informational"
    )
    ports = [s["internal_port"] for s in svcs if s.get("protocol", "tcp") == "tcp"]
    if not address or not ports:
        return None
    return Backend(machine_id, worker, address, int(ports[0]), failing)


def open_replica(path: Path) -> apsw.Connection:
    """A connection that reads the agent's replica file (the proxy's and the gateway's):
    opened read-write, as a read-only one cannot attach to a WAL database without its -shm, but
    it never writes, and never creates the file: a path with no database raises CantOpenError
    (a typo must not serve an empty replica), a file that is not one NotADBError."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        conn.set_busy_timeout(2000)
        conn.execute("PRAGMA query_only = 1")
        conn.execute("PRAGMA schema_version").fetchall()  # reads the header: is it a database?
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteReplica:
    """Routing reads over a replica database file (the agent's, or any copy with the table).

    One read connection; the per-app routing table is cached and dropped whenever
    ``PRAGMA data_version`` changes, i.e. whenever another connection committed.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = open_replica(self.path)
        self._lock = threading.Lock()
        self._version: int | None = None
        self._cache: dict[str, list[Backend]] = {}

    def backends(self, app: str) -> list[Backend]:
        """The app's routable machines that pass their readiness checks."""
        return [b for b in self._routable(app) if not b.failing]

    def failing(self, app: str) -> list[Backend]:
        """The app's routable machines held back by a critical readiness check."""
        return [b for b in self._routable(app) if b.failing]

    def _routable(self, app: str) -> list[Backend]:
        with self._lock:
            version = cast(int, self._conn.execute("PRAGMA data_version").fetchall()[0][0])
            if version != self._version:
                self._cache.clear()
                self._version = version
            cached = self._cache.get(app)
            if cached is None:
                try:
                    rows = self._conn.execute(ROUTE_SQL, (app,)).fetchall()
                except apsw.SQLError:  # the table has not replicated here yet
                    rows = []
                cached = self._cache[app] = [b for r in rows if (b := _backend(r)) is not None]
            return list(cached)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Proxy:
    """An ASGI app forwarding HTTP requests to the app's machines (see the module docstring)."""

    def __init__(
        self,
        replica: SqliteReplica,
        *,
        domain: str | None = None,
        default_app: str | None = None,
        client: httpx.AsyncClient | None = None,
        connect_attempts: int = 3,
        retry_delay: float = 0.1,
    ) -> None:
        self.replica = replica
        self.domain = domain.lstrip(".").lower() if domain else None
        self.default_app = default_app
        self._client = client
        self._rr = itertools.count()
        self.connect_attempts = connect_attempts
        self.retry_delay = retry_delay

    def app_for(self, host: str) -> str | None:
        host = host.split(":", 1)[0].lower()
        if self.domain and host.endswith("." + self.domain):
            return host[: -len(self.domain) - 1] or None
        return self.default_app

    def pick(self, app: str, pinned: str | None = None) -> list[Backend]:
        """Candidate backends in the order to try them."""
        backends = self.replica.backends(app)
        if pinned is not None:
            return [b for b in backends if b.machine_id == pinned]
        if not backends:
            return []
        start = next(self._rr) % len(backends)
        return backends[start:] + backends[:start]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        app = self.app_for(headers.get("host", ""))
        if app is None:
            await _json_error(send, 404, "no app for this host")
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        forward = [(k, v) for k, v in headers.items() if k not in HOP_BY_HOP]
        forward.append(("x-forwarded-host", headers.get("host", "")))
        pinned = headers.get("fly-force-instance-id")
        client = self._client or httpx.AsyncClient(timeout=30)
        try:
            # no reachable backend: go again at short, growing intervals (a row that has just
            # replicated, a machine about to listen) until the retry budget is spent
            deadline = anyio.current_time() + max(0, self.connect_attempts - 1) * self.retry_delay
            interval = min(RETRY_FIRST, self.retry_delay)
            while True:
                candidates = self.pick(app, pinned)
                for backend in candidates:
                    request = client.build_request(
                        scope["method"], backend.url + path.decode("latin-1"),
                        headers=forward, content=body,
                    )  # fmt: skip
                    try:
                        response = await client.send(request, stream=True)
                    except (httpx.ConnectError, httpx.ConnectTimeout):
                        continue  # not listening (yet, or any more): the next one
                    except httpx.TransportError as e:  # it took the request, then failed
                        await _json_error(
                            send, 502, f"machine {backend.machine_id} failed to answer: {e!r}"
                        )
                        return
                    try:
                        await _relay(send, response, backend)
                    finally:
                        await response.aclose()
                    return
                now = anyio.current_time()
                if now >= deadline:
                    break
                await anyio.sleep(min(interval, deadline - now))
                interval = min(interval * 2, RETRY_MAX, self.retry_delay)
            which = f"machine {pinned}" if pinned else "started machine"
            message = f"no reachable {which} for app {app}"
            failing = [b for b in self.replica.failing(app) if pinned in (None, b.machine_id)]
            if failing:
                message += "; failing health checks: " + ", ".join(
                    f"{b.machine_id} ({', '.join(b.failing)})" for b in failing
                )
            await _json_error(send, 503, message)
        finally:
            if self._client is None:
                await client.aclose()

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _relay(send, response: httpx.Response, backend: Backend) -> None:
    headers = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in SERVER_WRITTEN
    ]
    headers += [(b"fly-machine-id", backend.machine_id.encode()),
                (b"fly-worker", backend.worker.encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    try:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.TransportError:
        pass  # the machine went away mid-body: end what we have (the status is already sent)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
