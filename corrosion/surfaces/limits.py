"""Load safety for the HTTP API: per-route concurrency limits, and corrosion's endpoint name.

**Concurrency.** Each of ``/v1/transactions``, ``/v1/queries``, ``/v1/subscriptions`` (both
paths) and ``/v1/updates`` serves at most ``api.concurrency_limit`` requests at once (corrosion's
128); ``/v1/table_stats`` and ``/v1/health`` at most 4, as corrosion. One more is answered at once
with 503 and a JSON error, never queued: a client flood costs the agent a refusal each, and the
streams already open carry on. A slot is held until the response has been sent to its end, so for
a subscription or an update watch it is held as long as the client listens (tower's limit in
corrosion frees it as soon as the response head goes out, which bounds handlers, not streams).

**Endpoint name.** With ``api.endpoint_name`` set, a request whose
``x-corrosion-requested-endpoint-name`` header names another endpoint is answered 421
(Misdirected Request): a proxy sent it to the wrong node. A request without the header passes.

The counters (``ApiLoad``) are per agent, shared by all its API listeners, and read by
``/metrics``: requests in flight and refused per route, and corrosion's
``corro_api_active_streams``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import ApiConfig

ENDPOINT_HEADER = b"x-corrosion-requested-endpoint-name"
SMALL_ROUTE_LIMIT = 4  # corrosion's for /v1/table_stats and /v1/health
STREAMING_ROUTES = ("queries", "subscriptions", "updates")  # corro_api_active_streams' sources

log = logging.getLogger("corrosion.api")


def route_of(path: str) -> str | None:
    """The limited route a request path belongs to, or None (not limited)."""
    if path == "/v1/transactions":
        return "transactions"
    if path == "/v1/queries":
        return "queries"
    if path == "/v1/subscriptions" or path.startswith("/v1/subscriptions/"):
        return "subscriptions"
    if path.startswith("/v1/updates/"):
        return "updates"
    if path == "/v1/table_stats":
        return "table_stats"
    if path == "/v1/health":
        return "health"
    return None


class ApiLoad:
    """Per route: its limit, the requests in flight and those refused since start."""

    def __init__(self, config: ApiConfig) -> None:
        big, small = config.concurrency_limit, SMALL_ROUTE_LIMIT
        self.limits: dict[str, int] = {
            "transactions": big,
            "queries": big,
            "subscriptions": big,
            "updates": big,
            "table_stats": small,
            "health": small,
        }
        self.in_flight: dict[str, int] = dict.fromkeys(self.limits, 0)
        self.refused: dict[str, int] = dict.fromkeys(self.limits, 0)
        self.accepted: dict[str, int] = dict.fromkeys(self.limits, 0)
        self.misdirected = 0


_loads: weakref.WeakKeyDictionary[Any, ApiLoad] = weakref.WeakKeyDictionary()


def api_load(agent: Any) -> ApiLoad:
    """The agent's ``ApiLoad`` (made on first use), shared by every API app built for it."""
    load = _loads.get(agent)
    if load is None:
        load = _loads[agent] = ApiLoad(agent.config.api)
    return load


class ConcurrencyLimits:
    """ASGI middleware: the route's concurrency limit (503 beyond it). Inside the bearer-token
    check, as corrosion's per-route layers are, so a refused client takes no slot."""

    def __init__(self, app: ASGIApp, load: ApiLoad) -> None:
        self.app = app
        self.load = load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_of(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        load = self.load
        limit = load.limits[route]
        if load.in_flight[route] >= limit:
            load.refused[route] += 1
            key = "" if route in ("table_stats", "health") else ", api.concurrency_limit"
            message = f"too many concurrent {route} requests (limit {limit}{key}): try again later"
            await JSONResponse({"error": message}, 503, {"retry-after": "1"})(scope, receive, send)
            return
        load.in_flight[route] += 1
        load.accepted[route] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            load.in_flight[route] -= 1


class EndpointName:
    """ASGI middleware: 421 for a request meant for another endpoint (``api.endpoint_name``).
    Outside the bearer-token check, as in corrosion."""

    def __init__(self, app: ASGIApp, name: str, load: ApiLoad) -> None:
        self.app = app
        self.name = name
        self.load = load

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        wanted = [v for k, v in scope.get("headers") or [] if k == ENDPOINT_HEADER]
        if not wanted:
            return None
        try:
            name = wanted[0].decode("ascii")
        except UnicodeDecodeError:
            return JSONResponse({"error": "x-corrosion-requested-endpoint-name is not ASCII"}, 400)
        if name == self.name:
            return None
        self.load.misdirected += 1
        log.debug("refusing a request meant for endpoint %r: this is %r", name, self.name)
        return JSONResponse(
            {
                "error": f"misdirected request: it asks for endpoint {name!r}, this agent is "
                f"{self.name!r} (api.endpoint_name)"
            },
            421,
        )
