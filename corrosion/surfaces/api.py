"""The HTTP API, with corrosion's paths and JSON shapes, as a starlette ASGI app.

``POST /v1/transactions``  statements in one transaction → ``{"results": [{"rows_affected",
                           "time"}], "time", "version", "actor_id"}``; DML on replicated tables
                           only (``sqlguard``: anything else is refused with 400); any failure,
                           or ``?timeout=`` seconds passed: 500; either way nothing applied
``POST /v1/queries``       one read-only statement → NDJSON ``{"columns"}``, ``{"row": [rowid,
                           [cells]]}``..., ``{"eoq": {"time"}}`` (or ``{"error"}``); a write,
                           ATTACH or a writing PRAGMA is refused with 400; ``?timeout=``
``GET  /v1/health``        ``{"response": {"gaps", "members", "p99_lag", "queue_size",
                           "pending_schema": {"versions", "missing"}, "not_in_schema",
                           "failed"}}``; the
                           thresholds ``gaps``, ``max_queue``, ``p99_lag`` (seconds; with
                           ``queue_size``, only while the queue is longer too),
                           ``pending_schema`` (kept versions) answer ``failure_status`` (default
                           503) when exceeded, listed in ``"failed"``; other parameters: 400
``POST /v1/table_stats``   ``{"tables": [...]}`` → ``{"total_row_count", "invalid_tables"}``
``GET  /v1/cluster/members``  membership as JSON (our addition)

With ``api.authz.bearer-token`` set, every request needs ``Authorization: Bearer <token>``
(401 otherwise). Per-route concurrency limits (503) and ``api.endpoint_name`` (421): see
``limits``. ``asgi_app(agent)`` can be mounted by an embedding application; an agent serves it
itself (``serve_api``) with uvicorn on asyncio and hypercorn on trio.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.sqlguard import parse_timeout
from ..core.statements import StatementFormError, json_type, parse_statement, parse_statements
from ..runtime.results import QueryError, TransactionError, TransactionRefused
from ..runtime.subscriptions import (
    SubscriptionError,
    SubscriptionGone,
    SubscriptionStorageError,
)
from .asgi_server import AsgiServer, serve_asgi
from .http_spans import server_span
from .interfaces import ApiAgent
from .limits import ConcurrencyLimits, EndpointName, api_load
from .ndjson import json_cell as _cell
from .ndjson import row_json as _row_json
from .ndjson import row_lines
from .schema_api import schema_routes


def _event_line(event: Any) -> bytes:
    kind, rowid, row, change_id = event.kind, event.rowid, event.row, event.change_id
    return f'{{"change":["{kind}",{rowid},{_row_json(row)},{change_id}]}}\n'.encode()


# Rows read and encoded per batch, at most (fewer when they are wide: see Reads.stream). Larger
# batches cost a little less CPU but stream later: the client and the transfer overlap less of
# the reading (16,384 rows a batch: ~40% more wall time on a loaded host).
QUERY_BATCH = 4096

# /v1/health's query parameters: the thresholds and the status answered when one is exceeded
HEALTH_PARAMETERS = frozenset(
    {"gaps", "max_queue", "p99_lag", "queue_size", "pending_schema", "failure_status"}
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StatementFormError(f"request body is not valid JSON: {exc}") from None


def routes(agent: ApiAgent) -> list[BaseRoute]:
    def _timeout(request: Request, default: float) -> float | None:
        try:
            return parse_timeout(request.query_params.get("timeout"), default or None)
        except ValueError as exc:
            raise StatementFormError(str(exc)) from None

    @server_span("POST", "/v1/transactions", transaction=True)
    async def transactions(request: Request) -> Response:
        try:
            timeout = _timeout(request, agent.config.api.transaction_timeout)
            body = await _json_body(request)
            if not isinstance(body, list):
                raise StatementFormError(
                    f"expected a JSON array of statements, got {json_type(body)}"
                )
            statements = parse_statements(body)
        except StatementFormError as exc:
            return _error(400, str(exc))
        t0 = time.perf_counter()
        try:
            result = await agent.execute(statements, timeout=timeout)
        except TransactionError as exc:
            # corrosion's shape (with the time it really took: corrosion says 0.0); a refused
            # statement is the client's error (400), a failed or timed-out one answers 500 as
            # in corrosion
            return JSONResponse(
                {
                    "results": [{"error": exc.message}],
                    "time": time.perf_counter() - t0,
                    "version": None,
                    "actor_id": agent.actor_id.hex(),
                },
                status_code=400 if isinstance(exc, TransactionRefused) else 500,
            )
        return JSONResponse(result.to_json())

    async def queries(request: Request) -> Response:
        try:
            timeout = _timeout(request, agent.config.api.query_timeout)
            sql, params = parse_statement(await _json_body(request))
        except StatementFormError as exc:
            return _error(400, str(exc))
        t0 = time.perf_counter()
        stream = agent.query_stream(
            sql, params, timeout=timeout, batch=QUERY_BATCH, encode=row_lines
        ).__aiter__()
        try:
            first = await stream.__anext__()
        except QueryError as exc:
            return _error(400 if exc.client_error else 500, exc.message)

        async def body() -> AsyncIterator[bytes]:
            yield (json.dumps({"columns": first[1]}) + "\n").encode()
            try:
                async for _kind, lines in stream:  # encoded in the thread that read them
                    yield lines
                yield (json.dumps({"eoq": {"time": time.perf_counter() - t0}}) + "\n").encode()
            except QueryError as exc:
                yield (json.dumps({"error": exc.message}) + "\n").encode()

        # A result that ends within the first 64 KiB goes out as one response with a length
        # (one write, no streaming machinery); a longer one streams.
        chunks = body()
        ready: list[bytes] = []
        size = 0
        while size < 65_536:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return Response(b"".join(ready), media_type="application/x-ndjson")
            ready.append(chunk)
            size += len(chunk)

        async def rest() -> AsyncIterator[bytes]:
            for chunk in ready:
                yield chunk
            async for chunk in chunks:
                yield chunk

        return StreamingResponse(rest(), media_type="application/x-ndjson")

    async def updates(request: Request) -> Response:
        try:
            watch = agent.watch_updates(request.path_params["table"])
        except QueryError as exc:
            return _error(404, exc.message)

        async def body() -> AsyncIterator[bytes]:
            with contextlib.closing(watch):
                async for kind, pk in watch:
                    yield (json.dumps({"notify": [kind, [_cell(v) for v in pk]]}) + "\n").encode()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    async def _subscription_stream(
        request: Request, sub: Any, from_id: int | None, skip_rows: bool
    ) -> Response:
        t0 = time.perf_counter()
        try:
            attached = await agent.subscriptions.attach(sub, from_id, skip_rows)
        except SubscriptionError as exc:
            return _error(404 if isinstance(exc, SubscriptionGone) else 400, str(exc))
        snapshot, receive = attached.snapshot, attached.receive

        async def body() -> AsyncIterator[bytes]:
            try:
                if snapshot is not None:
                    yield (json.dumps({"columns": snapshot.columns}) + "\n").encode()
                    lines = [
                        f'{{"row":[{rowid},{_row_json(row)}]}}\n' for rowid, row in snapshot.rows
                    ]
                    yield "".join(lines).encode()
                    eoq = {"time": time.perf_counter() - t0, "change_id": snapshot.change_id}
                    yield (json.dumps({"eoq": eoq}) + "\n").encode()
                for event in attached.backlog:
                    yield _event_line(event)
                async with receive:
                    async for event in receive:
                        yield _event_line(event)
                yield (json.dumps({"error": attached.ended()}) + "\n").encode()
            finally:
                attached.close()

        headers = {"corro-query-id": sub.id, "corro-query-hash": sub.hash}
        return StreamingResponse(body(), media_type="application/x-ndjson", headers=headers)

    async def subscribe(request: Request) -> Response:
        try:
            sql, params = parse_statement(await _json_body(request))
            from_id, skip_rows = _from(request), _skip_rows(request)
        except StatementFormError as exc:
            return _error(400, str(exc))
        try:
            sub, created = await agent.subscriptions.get_or_create(sql, params)
        except SubscriptionStorageError as exc:
            return _error(500, str(exc))
        except SubscriptionError as exc:
            return _error(400, str(exc))
        if created and from_id:  # as corrosion: nothing to resume from
            await agent.subscriptions.drop(sub.id)
            return _error(
                400, "a `from` query param was supplied, but no existing subscription found"
            )
        return await _subscription_stream(request, sub, from_id, skip_rows)

    async def resubscribe(request: Request) -> Response:
        sub = agent.subscriptions.by_id.get(request.path_params["id"])
        if sub is None:
            return _error(404, f"could not find subscription with id {request.path_params['id']}")
        try:
            from_id, skip_rows = _from(request), _skip_rows(request)
        except StatementFormError as exc:
            return _error(400, str(exc))
        return await _subscription_stream(request, sub, from_id, skip_rows)

    def _from(request: Request) -> int | None:
        value = request.query_params.get("from")
        if value is None:
            return None
        try:
            change_id = int(value)
        except ValueError:
            change_id = -1
        if change_id < 0:
            raise StatementFormError("from must be a change id (an integer >= 0)")
        return change_id

    def _skip_rows(request: Request) -> bool:
        value = request.query_params.get("skip_rows", "false").lower()
        if value not in ("true", "false", "1", "0"):
            raise StatementFormError("skip_rows must be true or false")
        return value in ("true", "1")

    async def health(request: Request) -> Response:
        q = request.query_params
        gaps, members, queue = agent.gaps(), agent.alive_members(), agent.queue_size()
        lag = agent.p99_lag()
        pending = agent.pending_schema
        response = {
            "gaps": gaps,
            "members": members,
            "p99_lag": lag,
            "queue_size": queue,
            "pending_schema": pending.to_json(),
            "not_in_schema": list(agent.not_in_schema),
            "schema": agent.schema.status.to_json(),
        }
        unknown = sorted(set(q) - HEALTH_PARAMETERS)
        if unknown:
            return _error(
                400,
                f"unknown health parameter {unknown[0]!r}: the known ones are "
                + ", ".join(sorted(HEALTH_PARAMETERS)),
            )
        try:
            failure = int(q.get("failure_status", 503))
            max_gaps = int(q["gaps"]) if "gaps" in q else None
            max_pending = int(q["pending_schema"]) if "pending_schema" in q else None
            max_queue_n = int(q["max_queue"]) if "max_queue" in q else None
            lag_queue = int(q["queue_size"]) if "queue_size" in q else None
            max_lag = float(q["p99_lag"]) if "p99_lag" in q else None
        except ValueError:
            return _error(400, "health thresholds must be numbers")
        # as corrosion: a lagging node is unhealthy only while its queue is also long (when
        # queue_size is given), so a burst it is working through does not fail the check
        lagging = max_lag is not None and lag > max_lag and (lag_queue is None or queue > lag_queue)
        failed = []  # each threshold exceeded, with the value that exceeded it
        if max_gaps is not None and gaps > max_gaps:
            failed.append(f"gaps: {gaps} > {max_gaps}")
        if max_queue_n is not None and queue > max_queue_n:
            failed.append(f"max_queue: queue_size {queue} > {max_queue_n}")
        if max_pending is not None and pending.versions > max_pending:
            failed.append(f"pending_schema: {pending.versions} > {max_pending}")
        if agent.schema.status.blocked is not None:  # always: a node stopped on a version
            failed.append(f"schema: {agent.schema.status.blocked}")
        if lagging:
            while_queued = "" if lag_queue is None else f" while queue_size {queue} > {lag_queue}"
            failed.append(f"p99_lag: {lag:g} > {max_lag:g}{while_queued}")
        response["failed"] = failed
        return JSONResponse({"response": response}, status_code=failure if failed else 200)

    async def members(request: Request) -> Response:
        return JSONResponse([m.to_json() for m in agent.members()])

    async def table_stats(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except StatementFormError as exc:
            return _error(400, str(exc))
        tables = body.get("tables") if isinstance(body, dict) else None
        if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
            return _error(400, 'expected {"tables": [names]}')
        total, invalid = 0, []
        for t in tables:
            try:
                quoted = '"' + t.replace('"', '""') + '"'
                async for row in agent.query(f"SELECT count(*) FROM {quoted}"):
                    total += row[0]
            except QueryError:
                invalid.append(t)
        return JSONResponse({"total_row_count": total, "invalid_tables": invalid})

    return [
        Route("/v1/transactions", transactions, methods=["POST"]),
        Route("/v1/queries", queries, methods=["POST"]),
        Route("/v1/health", health, methods=["GET"]),
        *schema_routes(agent),
        Route("/v1/table_stats", table_stats, methods=["POST"]),
        Route("/v1/cluster/members", members, methods=["GET"]),
        Route("/v1/updates/{table}", updates, methods=["POST"]),
        Route("/v1/subscriptions", subscribe, methods=["POST"]),
        Route("/v1/subscriptions/{id}", resubscribe, methods=["GET"]),
    ]


class BearerAuth:
    """Refuse requests without ``Authorization: Bearer <token>`` (401)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _error(401, "unauthorized")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def asgi_app(agent: ApiAgent, extra_routes: list[BaseRoute] | None = None) -> ASGIApp:
    load = api_load(agent)
    app: ASGIApp = Starlette(routes=routes(agent) + list(extra_routes or []))
    app = ConcurrencyLimits(app, load)
    token = agent.config.api.bearer_token
    if token:
        app = BearerAuth(app, token)
    if agent.config.api.endpoint_name:  # checked first, as corrosion does
        app = EndpointName(app, agent.config.api.endpoint_name, load)
    return app


async def serve_api(
    agent: ApiAgent, tg: Any, host: str, port: int
) -> tuple[AsgiServer, tuple[str, int]]:
    """Serve the API inside ``tg``: uvicorn on asyncio, hypercorn on trio (``corrosion[trio]``)."""
    server = await serve_asgi(asgi_app(agent, agent.extra_routes()), tg, host, port)
    return server, server.address
