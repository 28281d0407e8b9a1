"""A small HTTP client for an agent's API (what the CLI uses; usable from any Python program).

    client = CorrosionClient("127.0.0.1:8080", token=None)
    client.execute(["INSERT INTO todos (id, title) VALUES (1, 'hi')"])  # one transaction
    for row in client.query("SELECT * FROM todos WHERE id = ?", [1]):     # streamed
        print(row)

It speaks corrosion's API (``/v1/transactions``, ``/v1/queries`` NDJSON), so it also works against
corrosion itself. Failures raise ``ClientError`` carrying the server's message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from ..errors import CorrosionError


class ClientError(CorrosionError):
    """The agent refused or failed a request (``status`` is None when it was unreachable)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


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


def statement(sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
    """One statement in corrosion's JSON forms: ``"SQL"``, ``["SQL", [...]]``,
    ``["SQL", {...}]``."""
    return sql if params is None else [sql, params if isinstance(params, dict) else list(params)]


def _unreachable(url: object, exc: httpx.HTTPError) -> ClientError:
    hint = " (is the agent running?)" if isinstance(exc, httpx.ConnectError) else ""
    return ClientError(f"could not reach the agent at {url}{hint}: {exc}")


class CorrosionClient:
    def __init__(
        self, addr: str | tuple[str, int], token: str | None = None, *, timeout: float = 60.0
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._has_token = bool(token)
        self._http = httpx.Client(base_url=base_url(addr), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CorrosionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        try:
            return self._http.post(path, json=body, **kw)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None

    def _timeout_kw(self, timeout: float | None) -> dict[str, Any]:
        """``?timeout=`` for the agent, and a client-side wait that outlasts it."""
        if timeout is None:
            return {}
        wait = None if timeout == 0 else max(timeout + 10, self._http.timeout.read or 0)
        return {"params": {"timeout": timeout}, "timeout": wait}

    def execute(self, statements: Sequence[Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Run statements (each in any of corrosion's forms) in one transaction; return
        ``{"results": [{"rows_affected", "time"}], "time", "version", "actor_id"}``.
        ``timeout``: seconds the agent lets them run (its default when None; 0: no limit)."""
        resp = self._post("/v1/transactions", list(statements), **self._timeout_kw(timeout))
        body = _json(resp)
        if resp.status_code != 200:
            raise self._refused(body, resp)
        return body

    def query_events(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """The NDJSON events: ``("columns", [names])``, ``("row", [rowid, cells])``...,
        ``("eoq", {"time": t})``. An error event, before or mid-stream, raises ``ClientError``.
        ``timeout``: seconds the agent lets the query run (its default when None; 0: none)."""
        body = statement(sql, params)
        try:
            with self._http.stream(
                "POST", "/v1/queries", json=body, **self._timeout_kw(timeout)
            ) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise self._refused(_json(resp), resp)
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                        ((kind, payload),) = event.items()
                    except (ValueError, AttributeError):
                        raise ClientError(f"malformed event from the agent: {line!r}") from None
                    if kind == "error":
                        raise ClientError(str(payload), resp.status_code)
                    yield kind, payload
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None

    def _refused(self, body: Any, resp: httpx.Response) -> ClientError:
        if resp.status_code == 401:
            why = "refused the bearer token" if self._has_token else "requires a bearer token"
            return ClientError(f"unauthorized: the agent at {self._http.base_url} {why}", 401)
        return ClientError(_error_text(body, resp), resp.status_code)

    def query(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> Iterator[list[Any]]:
        """The rows' cells, streamed (blobs arrive as lists of byte values, as in corrosion)."""
        for kind, payload in self.query_events(sql, params):
            if kind == "row":
                yield payload[1]

    def health(self, **thresholds: int) -> tuple[int, dict[str, Any]]:
        """``(status, {"gaps", "members", "queue_size", ...})``; 503 when a threshold is
        exceeded."""
        try:
            resp = self._http.get("/v1/health", params=thresholds)
        except httpx.HTTPError as exc:
            raise _unreachable(self._http.base_url, exc) from None
        return resp.status_code, _json(resp).get("response", {})


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
