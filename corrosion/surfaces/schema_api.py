"""The cluster schema over HTTP, and its metric families (``corrosion.core.cluster_schema``).

``GET  /v1/schema``   → ``{"status": {...}, "schema": "<the cluster's latest version's text>"}``
``POST /v1/schema``   ``{"schema": "<CREATE TABLE ...>", "allow_destructive": false, "wait": 10}``
                      → 200 ``{"version", "hash", "new", "changes", "unconfirmed", ...}``;
                      400 refused (invalid, destructive without the flag, node behind: nothing
                      written); 409 a concurrent proposal won (the message names it).

``corrosion schema apply`` uses the admin socket's ``schema apply``, which runs the same code.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from crdt.errors import SchemaError

from ..core.cluster_schema import ClusterSchemaStatus, ProposalRefused
from ..runtime.schema_flow import SchemaConflict
from .interfaces import ApiAgent

MAX_WAIT = 600.0  # seconds a proposer may wait for the members


def check_proposal(body: Any) -> tuple[str, bool, float]:
    """``(schema, allow_destructive, wait)`` of a proposal; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError('expected {"schema": "CREATE TABLE ...", "allow_destructive": false}')
    unknown = sorted(set(body) - {"schema", "allow_destructive", "wait"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    sql, allow, wait = body.get("schema"), body.get("allow_destructive", False), body.get("wait", 0)
    if not isinstance(sql, str) or not sql.strip():
        raise ValueError('"schema" must be the schema text (CREATE TABLE / CREATE INDEX ...)')
    if not isinstance(allow, bool):
        raise ValueError('"allow_destructive" must be true or false')
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT:
        raise ValueError(f'"wait" must be a number of seconds from 0 to {MAX_WAIT:g}')
    return sql, allow, float(wait)


def schema_show(status: ClusterSchemaStatus) -> dict[str, Any]:
    head = status.head
    return {"status": status.to_json(), "schema": head.sql if head else None}


def schema_routes(agent: ApiAgent) -> list[BaseRoute]:
    async def show(request: Request) -> Response:
        return JSONResponse(schema_show(agent.schema.status))

    async def apply(request: Request) -> Response:
        try:
            sql, allow, wait = check_proposal(json.loads(await request.body() or b"null"))
        except (ValueError, UnicodeDecodeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            result = await agent.schema.propose(sql, allow_destructive=allow, wait=wait)
        except (ProposalRefused, SchemaError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except SchemaConflict as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse(result)

    return [
        Route("/v1/schema", show, methods=["GET"]),
        Route("/v1/schema", apply, methods=["POST"]),
    ]


def schema_families(status: ClusterSchemaStatus) -> list[tuple[str, str, str, Any]]:
    """Metric families (name, type, help, samples) of the cluster schema."""

    def one(v: float) -> list[tuple[dict[str, str], float]]:
        return [({}, float(v))]

    head = status.head
    return [
        ("corro_schema_version", "gauge",
         "The cluster schema version this node runs (0: none yet).",
         one(status.running.version)),
        ("corro_schema_cluster_version", "gauge",
         "The latest cluster schema version this node knows of.",
         one(head.version if head else 0)),
        ("corro_schema_blocked", "gauge",
         "1 while a cluster schema version cannot be applied here (see /v1/health).",
         one(status.blocked is not None)),
        ("corro_schema_blocked_total", "counter",
         "Times a cluster schema version failed to apply here (since start).",
         one(status.blocked_total)),
        ("corro_schema_drift", "gauge",
         "1 while this node's schema files disagree with the cluster schema.",
         one(status.drift is not None)),
        ("corro_schema_losing_proposals", "gauge",
         "Schema proposals that lost to a concurrent one (ignored by every node).",
         one(len(status.losers))),
    ]  # fmt: skip
