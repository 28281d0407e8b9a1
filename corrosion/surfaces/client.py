"""Clients for an agent's HTTP API, synchronous (``Client``) and asynchronous (``AsyncClient``).

    with corrosion.Client("127.0.0.1:8080", token=None) as client:
        client.execute(["INSERT INTO todos (id, title) VALUES (1, 'hi')"])  # one transaction
        for row in client.query("SELECT * FROM todos WHERE id = ?", [1]):     # streamed
            print(row)

    async with corrosion.AsyncClient("127.0.0.1:8080") as client:
        async with client.subscribe("SELECT id, title FROM todos") as sub:
            async for event in sub:          # Columns, Row..., EndOfQuery, then Change...
                ...

They speak corrosion's API (``/v1/transactions``, ``/v1/queries``, ``/v1/subscriptions``,
``/v1/updates``, ``/v1/health``), so they also work against corrosion itself. One connection
pool per client, kept alive between requests. Failures raise ``ClientError`` or one of its
kinds: ``AgentUnreachable``, ``Unauthorized``, ``Rejected`` (the agent refused the request: bad
SQL, a refused statement, a timeout), ``SubscriptionLost``.

A subscription survives the agent: when its stream breaks (the agent restarted, the network
failed, or the agent cut a subscriber that fell behind), it reconnects with backoff and resumes
from the last change it delivered (``GET /v1/subscriptions/{id}?from=N``), so no change is missed
or delivered twice. If the agent no longer has the subscription, or no longer keeps the changes
after N, iterating raises ``SubscriptionLost``: subscribe again for a fresh snapshot.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from ..errors import CorrosionError

Params = Sequence[Any] | dict[str, Any] | None


class ClientError(CorrosionError):
    """The agent refused or failed a request (``status`` is None when it was unreachable)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AgentUnreachable(ClientError):
    """No answer from the agent (not listening, network down, timed out connecting)."""


class Unauthorized(ClientError):
    """401: a bearer token is missing or wrong."""


class Rejected(ClientError):
    """The agent refused the request (400 and the like): the message says why."""


class SubscriptionLost(ClientError):
    """The agent cannot resume this subscription (gone, or its changes were purged)."""


# -- the wire ------------------------------------------------------------------------------------


def base_url(addr: str | tuple[str, int]) -> str:
    """``host:port`` (or a tuple, or a URL) → ``http://host:port``; a wildcard bind address is
    reached through loopback."""
    if isinstance(addr, tuple):
        host, port = addr
    elif addr.startswith(("http://", "https://")):
        return addr.rstrip("/")
    else:
        host, _, p = addr.rpartition(":")
        host, port = host.strip("[]"), int(p)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def statement(sql: str, params: Params = None) -> Any:
    """One statement in corrosion's JSON forms: ``"SQL"``, ``["SQL", [...]]``,
    ``["SQL", {...}]``."""
    return sql if params is None else [sql, params if isinstance(params, dict) else list(params)]


@dataclass(frozen=True)
class Columns:
    names: list[str]


@dataclass(frozen=True)
class Row:
    rowid: int
    values: list[Any]  # blobs arrive as lists of byte values, as in corrosion


@dataclass(frozen=True)
class EndOfQuery:
    change_id: int | None  # a subscription's: the last change the snapshot includes
    time: float


@dataclass(frozen=True)
class Change:
    kind: str  # "insert", "update" or "delete"
    rowid: int
    values: list[Any]
    change_id: int


Event = Columns | Row | EndOfQuery | Change


def parse_event(line: str | bytes) -> Event:
    """One NDJSON line of a query or subscription stream; an ``error`` line raises."""
    try:
        ((kind, payload),) = json.loads(line).items()
    except (ValueError, AttributeError):
        raise ClientError(f"malformed event from the agent: {line!r}") from None
    if kind == "columns":
        return Columns(list(payload))
    if kind == "row":
        return Row(payload[0], payload[1])
    if kind == "eoq":
        return EndOfQuery(payload.get("change_id"), payload.get("time", 0.0))
    if kind == "change":
        return Change(payload[0], payload[1], payload[2], payload[3])
    if kind == "error":
        raise Rejected(str(payload))
    raise ClientError(f"unknown event from the agent: {line!r}")


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"error": resp.text.strip() or f"HTTP {resp.status_code}"}


def _error_text(body: Any, resp: httpx.Response) -> str:
    if isinstance(body, dict):
        if "error" in body:
            return str(body["error"])
        errors = [
            r["error"] for r in body.get("results", []) if isinstance(r, dict) and "error" in r
        ]
        if errors:
            return "; ".join(map(str, errors))
    return f"HTTP {resp.status_code}"


def _refused(resp: httpx.Response, has_token: bool) -> ClientError:
    """The error for a response that is not 200 (its body read)."""
    if resp.status_code == 401:
        why = "refused the bearer token" if has_token else "requires a bearer token"
        return Unauthorized(f"unauthorized: the agent at {resp.url.copy_with(path='/')} {why}", 401)
    return Rejected(_error_text(_json(resp), resp), resp.status_code)


def _unreachable(url: object, exc: httpx.HTTPError) -> AgentUnreachable:
    hint = " (is the agent running?)" if isinstance(exc, httpx.ConnectError) else ""
    return AgentUnreachable(f"could not reach the agent at {url}{hint}: {exc}")


def _timeout_kw(timeout: float | None, read_timeout: float | None) -> dict[str, Any]:
    """``?timeout=`` for the agent, and a client-side wait that outlasts it."""
    if timeout is None:
        return {}
    wait = None if timeout == 0 else max(timeout + 10, read_timeout or 0)
    return {"params": {"timeout": timeout}, "timeout": wait}


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _legacy(event: Event) -> tuple[str, Any]:
    """``query_events``' ``(kind, payload)`` pairs, as the NDJSON spells them."""
    if isinstance(event, Columns):
        return "columns", event.names
    if isinstance(event, Row):
        return "row", [event.rowid, event.values]
    if isinstance(event, EndOfQuery):
        return "eoq", {"time": event.time}
    return "change", [event.kind, event.rowid, event.values, event.change_id]


# -- synchronous -------------------------------------------------------------------------------


class Client:
    """A synchronous client (what the CLI uses)."""

    def __init__(
        self, addr: str | tuple[str, int], token: str | None = None, *, timeout: float = 60.0
    ) -> None:
        self._has_token = bool(token)
        self._http = httpx.Client(base_url=base_url(addr), headers=_headers(token), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, statements: Sequence[Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Run statements (each in any of corrosion's forms) in one transaction; return
        ``{"results": [{"rows_affected", "time"}], "time", "version", "actor_id"}``.
        ``timeout``: seconds the agent lets them run (its default when None; 0: no limit)."""
        kw = _timeout_kw(timeout, self._http.timeout.read)
        try:
            resp = self._http.post("/v1/transactions", json=list(statements), **kw)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None
        if resp.status_code != 200:
            raise _refused(resp, self._has_token)
        return dict(_json(resp))

    def events(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> Iterator[Event]:
        """A query's events: ``Columns``, ``Row``..., ``EndOfQuery``; an error, before or
        mid-stream, raises."""
        kw = _timeout_kw(timeout, self._http.timeout.read)
        try:
            with self._http.stream(
                "POST", "/v1/queries", json=statement(sql, params), **kw
            ) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise _refused(resp, self._has_token)
                for line in resp.iter_lines():
                    if line.strip():
                        yield parse_event(line)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None

    def query_events(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> Iterator[tuple[str, Any]]:
        """``events`` as the NDJSON spells them: ``("columns", [names])``, ``("row", [rowid,
        cells])``..., ``("eoq", {"time": t})``."""
        for event in self.events(sql, params, timeout=timeout):
            yield _legacy(event)

    def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> Iterator[list[Any]]:
        """The rows' cells, streamed."""
        for event in self.events(sql, params, timeout=timeout):
            if isinstance(event, Row):
                yield event.values

    def health(self, **thresholds: int) -> tuple[int, dict[str, Any]]:
        """``(status, {"gaps", "members", "queue_size", ...})``; 503 when a threshold is
        exceeded."""
        try:
            resp = self._http.get("/v1/health", params=thresholds)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None
        if resp.status_code == 401:
            raise _refused(resp, self._has_token)
        return resp.status_code, _json(resp).get("response", {})


# -- asynchronous ------------------------------------------------------------------------------


class AsyncClient:
    """An asynchronous client (asyncio or trio), with subscriptions that resume."""

    def __init__(
        self, addr: str | tuple[str, int], token: str | None = None, *, timeout: float = 60.0
    ) -> None:
        self._has_token = bool(token)
        self._http = httpx.AsyncClient(
            base_url=base_url(addr), headers=_headers(token), timeout=timeout
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def execute(
        self, statements: Sequence[Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """As ``Client.execute``."""
        kw = _timeout_kw(timeout, self._http.timeout.read)
        try:
            resp = await self._http.post("/v1/transactions", json=list(statements), **kw)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None
        if resp.status_code != 200:
            raise _refused(resp, self._has_token)
        return dict(_json(resp))

    async def events(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """As ``Client.events``."""
        kw = _timeout_kw(timeout, self._http.timeout.read)
        try:
            async with self._http.stream(
                "POST", "/v1/queries", json=statement(sql, params), **kw
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _refused(resp, self._has_token)
                async for line in resp.aiter_lines():
                    if line.strip():
                        yield parse_event(line)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None

    async def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> AsyncIterator[list[Any]]:
        """The rows' cells, streamed."""
        async for event in self.events(sql, params, timeout=timeout):
            if isinstance(event, Row):
                yield event.values

    async def health(self, **thresholds: int) -> tuple[int, dict[str, Any]]:
        """As ``Client.health``."""
        try:
            resp = await self._http.get("/v1/health", params=thresholds)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None
        if resp.status_code == 401:
            raise _refused(resp, self._has_token)
        return resp.status_code, _json(resp).get("response", {})

    async def updates(self, table: str) -> AsyncIterator[tuple[str, list[Any]]]:
        """``(kind, primary key)`` of each row of ``table`` changed from now on (``/v1/updates``;
        ``kind`` is ``update`` or ``delete``). It does not resume: if the stream breaks, this
        raises ``AgentUnreachable``; read what you need again and watch again."""
        try:
            async with self._http.stream(
                "POST", f"/v1/updates/{table}", timeout=httpx.Timeout(None, connect=10)
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _refused(resp, self._has_token)
                async for line in resp.aiter_lines():
                    if line.strip():
                        kind, pk = json.loads(line)["notify"]
                        yield kind, pk
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None

    def subscribe(
        self,
        sql: str,
        params: Params = None,
        *,
        skip_rows: bool = False,
        max_backoff: float = 5.0,
        give_up_after: float | None = None,
        on_connect: Callable[[], None] | None = None,
        on_unreachable: Callable[[Exception], None] | None = None,
    ) -> Subscription:
        """A subscription to ``sql``: use it as ``async with client.subscribe(...) as sub:
        async for event in sub``. Events: ``Columns``, ``Row``..., ``EndOfQuery`` (unless
        ``skip_rows``), then a ``Change`` for every change. A broken stream is resumed (backoff
        up to ``max_backoff`` s; ``give_up_after`` s without the agent raises
        ``AgentUnreachable``, None: never). With ``skip_rows`` the position is known from the
        first change on: a break before it resumes from the subscription's present.
        ``on_connect`` is called each time the stream is (re)established: what changed while it
        was down is then known to be in what follows or already read (``corrosion template``
        reads again then). ``on_unreachable(error)`` is called with an ``AgentUnreachable``
        each time an attempt to (re)establish it cannot reach the agent (to say so while it
        retries)."""
        return Subscription(
            self, sql, params, skip_rows, max_backoff, give_up_after, on_connect, on_unreachable
        )

    def resume(
        self,
        subscription_id: str,
        change_id: int,
        *,
        max_backoff: float = 5.0,
        give_up_after: float | None = None,
    ) -> Subscription:
        """The changes after ``change_id`` of the subscription ``subscription_id`` (kept by a
        program from an earlier ``Subscription``), and every change after them."""
        sub = Subscription(self, "", None, True, max_backoff, give_up_after)
        sub.id, sub.change_id = subscription_id, change_id
        return sub


class Subscription:
    """A live subscription; ``id`` and ``change_id`` (the last change delivered) say where it
    is, so a program can also keep them and resume later with ``AsyncClient.resume``."""

    def __init__(
        self,
        client: AsyncClient,
        sql: str,
        params: Params,
        skip_rows: bool,
        max_backoff: float,
        give_up_after: float | None,
        on_connect: Callable[[], None] | None = None,
        on_unreachable: Callable[[Exception], None] | None = None,
    ) -> None:
        self._client = client
        self._on_connect = on_connect
        self._on_unreachable = on_unreachable
        self._body = statement(sql, params)
        self._skip_rows = skip_rows
        self._max_backoff = max_backoff
        self._give_up_after = give_up_after
        self.id: str | None = None
        self.change_id: int | None = None
        self.reconnects = 0
        self._resp: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Subscription:
        return self

    async def aclose(self) -> None:
        await self._close_stream()

    async def _close_stream(self) -> None:
        resp, self._resp, self._lines = self._resp, None, None
        if resp is not None:
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    async def __anext__(self) -> Event:
        http = self._client._http
        down_since: float | None = None
        delay = 0.2
        while True:
            opening = self._lines is None
            try:
                if self._lines is None:
                    await self._open(http)
                assert self._lines is not None
                line = await self._lines.__anext__()
            except (httpx.HTTPError, StopAsyncIteration, Rejected) as exc:
                # a broken stream, one the agent ended, or an error line ("fell too far
                # behind"): resume from the last change delivered
                await self._close_stream()
                if isinstance(exc, Rejected) and exc.status is not None:
                    raise  # the agent refused to open it: not something a retry mends
                if opening and isinstance(exc, httpx.HTTPError) and self._on_unreachable:
                    self._on_unreachable(_unreachable(http.base_url, exc))
                now = time.monotonic()
                down_since = down_since if down_since is not None else now
                if self._give_up_after is not None and now - down_since > self._give_up_after:
                    raise AgentUnreachable(
                        f"subscription {self.id}: no agent at {http.base_url} for "
                        f"{self._give_up_after:g}s"
                    ) from None
                await anyio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                self.reconnects += 1
                continue
            if not line.strip():
                continue
            event = parse_event(line)
            if isinstance(event, Change) or (
                isinstance(event, EndOfQuery) and event.change_id is not None
            ):
                self.change_id = event.change_id
            return event

    async def _open(self, http: httpx.AsyncClient) -> None:
        params: dict[str, Any] = {}
        if self._skip_rows:
            params["skip_rows"] = "true"
        timeout = httpx.Timeout(None, connect=10)
        if self.id is None:
            request = http.build_request(
                "POST", "/v1/subscriptions", json=self._body, params=params, timeout=timeout
            )
        else:
            # resume after the last change delivered; before any, the snapshot again
            params["from"] = self.change_id if self.change_id is not None else 0
            request = http.build_request(
                "GET", f"/v1/subscriptions/{self.id}", params=params, timeout=timeout
            )
        resp = await http.send(request, stream=True)
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            error = _refused(resp, self._client._has_token)
            if self.id is not None and resp.status_code in (400, 404):
                raise SubscriptionLost(
                    f"subscription {self.id} cannot resume after change {self.change_id}: "
                    f"{error.message}; subscribe again",
                    resp.status_code,
                )
            raise error
        self.id = resp.headers.get("corro-query-id", self.id)
        self._resp = resp
        self._lines = resp.aiter_lines()
        if self._on_connect is not None:
            self._on_connect()
