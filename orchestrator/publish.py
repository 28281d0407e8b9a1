"""Publishing machine state into a replicated table: the seam between flyd and corrosion.

Each worker is the only writer of its own machines' rows (Fly's invariant). The orchestrator
writes through a :class:`Publisher`: anything with ``async execute(statements)`` taking
corrosion's statement forms (``"SQL"`` or ``["SQL", [params]]``) and applying them in one
transaction — the agent's ``/v1/transactions`` or an embedded agent, later; an in-memory fake now.

:class:`PublishQueue` decouples FSM steps from the publisher: a step marks a machine dirty and
moves on; the queue publishes the machine's *current* row (latest state wins), retries with
backoff while the publisher fails, and on start reconciles: upserts every live machine and
deletes this worker's rows for machines it no longer has (destroyed while the agent was away).
Rows therefore converge to the worker's truth after any crash or outage.

Each publish is a ``machines.publish`` span in the trace of the change that dirtied the machine
(the step attempt, or the API request, current when ``mark`` was called: the queue runs in its
own task, so the context travels with the mark), with links to the other changes a batch
carries. The publisher is called inside that span, so the agent's transaction and replication
spans join the same trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from . import tracing
from .checks import published_checks
from .clock import Clock
from .engine import Backoff

log = logging.getLogger(__name__)

MACHINES_TABLE = "machines"

# The schema every node includes (a CRR: NOT NULL primary key, no unique index, every NOT NULL
# column has a default), shipped as a file so that nodes without an orchestrator load the same one.
MACHINES_SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "machines.sql"
MACHINES_SCHEMA = MACHINES_SCHEMA_PATH.read_text()

COLUMNS = (
    "id", "app", "worker", "region", "state", "instance_id", "address", "cordoned", "checks",
    "services", "updated_at", "private_ip", "name", "metadata", "schema_version", "schema_hash",
    "schema_state", "schema_error",
)  # fmt: skip

# columns added after the first release (the schema grows additively): a row without them, made
# by older code, is published with their default
ADDED_COLUMNS = frozenset({"private_ip", "name", "metadata", "schema_version", "schema_hash",
                           "schema_state", "schema_error"})  # fmt: skip
_ADDED_DEFAULTS: dict[str, Any] = {"schema_version": 0}

Statement = str | list[Any]


@runtime_checkable
class Publisher(Protocol):
    async def execute(self, statements: Sequence[Statement]) -> Any:
        """Apply ``statements`` atomically (all or none); raise on failure."""
        ...


def machine_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The machine's row; ``doc["db_schema"]`` (added by the service, not persisted) is its step
    log's schema status (``Orchestrator.schema_of``)."""
    schema = doc.get("db_schema") or {}
    return {
        "id": doc["id"],
        "app": doc["app"],
        "worker": doc.get("worker", ""),
        "region": doc.get("region", ""),
        "state": doc["state"],
        "instance_id": doc.get("instance_id", ""),
        "address": doc.get("private_ip", "") or "",
        "cordoned": 1 if doc.get("cordoned") else 0,
        "checks": _json(published_checks(doc)),
        "services": _json(routable_services(doc)),
        "updated_at": int(doc["updated_at"] * 1000),
        # the machine's address: on its own network when it has one, 127.0.0.1 (reachable from
        # this host only) when it shares the host's; ``address`` is the same, for older readers
        "private_ip": doc.get("private_ip", "") or "",
        "name": doc.get("name", ""),
        "metadata": _json(doc.get("config", {}).get("metadata") or {}),
        # which schema the machine's own database is on (a fleet query groups by these)
        "schema_version": int(schema.get("version", 0)),
        "schema_hash": schema.get("hash", ""),
        "schema_state": schema.get("state", ""),
        "schema_error": schema.get("error", ""),
    }


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def routable_services(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a proxy needs of ``config.services``: protocol and internal port of each service
    (none when the machine was created with ``skip_service_registration``)."""
    if doc.get("skip_service_registration"):
        return []
    out = []
    for svc in doc.get("config", {}).get("services") or []:
        if isinstance(svc, Mapping) and isinstance(svc.get("internal_port"), int):
            out.append({"protocol": str(svc.get("protocol", "tcp")),
                        "internal_port": svc["internal_port"]})  # fmt: skip
    return out


def upsert_statement(row: Mapping[str, Any]) -> list[Any]:
    cols = ", ".join(COLUMNS)
    marks = ", ".join("?" for _ in COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "id")
    sql = (
        f"INSERT INTO {MACHINES_TABLE} ({cols}) VALUES ({marks}) "
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )
    return [
        sql,
        [row.get(c, _ADDED_DEFAULTS.get(c, "")) if c in ADDED_COLUMNS else row[c] for c in COLUMNS],
    ]


def delete_statement(machine_id: str) -> list[Any]:
    return [f"DELETE FROM {MACHINES_TABLE} WHERE id = ?", [machine_id]]


def reconcile_statement(worker: str, live_ids: Sequence[str]) -> list[Any]:
    if not live_ids:
        return [f"DELETE FROM {MACHINES_TABLE} WHERE worker = ?", [worker]]
    marks = ", ".join("?" for _ in live_ids)
    return [
        f"DELETE FROM {MACHINES_TABLE} WHERE worker = ? AND id NOT IN ({marks})",
        [worker, *live_ids],
    ]


class MemoryPublisher:
    """Applies statements to an in-memory SQLite table (plain, not a CRR) and keeps them all;
    ``fail_next(n)`` makes the next n calls fail without applying anything."""

    def __init__(self) -> None:
        import apsw

        self.conn = apsw.Connection(":memory:")
        self.conn.execute(MACHINES_SCHEMA)
        self.batches: list[list[Statement]] = []
        self._failures = 0
        self.changed = anyio.Event()

    def fail_next(self, n: int = 1) -> None:
        self._failures += n

    async def execute(self, statements: Sequence[Statement]) -> Any:
        await anyio.lowlevel.checkpoint()
        if self._failures:
            self._failures -= 1
            raise ConnectionError("publisher unavailable (injected)")
        self.conn.execute("BEGIN")
        try:
            for st in statements:
                if isinstance(st, str):
                    self.conn.execute(st)
                else:
                    self.conn.execute(st[0], st[1] if len(st) > 1 else ())
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.batches.append(list(statements))
        self.changed.set()
        self.changed = anyio.Event()
        return {"results": [{"rows_affected": 0} for _ in statements]}

    def rows(self) -> dict[str, dict[str, Any]]:
        cur = self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {MACHINES_TABLE} ORDER BY id")
        return {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in cur}


class PublishQueue:
    """Latest-state-wins publishing of dirty machines, with retry and startup reconcile."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        worker: str,
        lookup: Callable[[str], Mapping[str, Any] | None],
        live_ids: Callable[[], list[str]],
        clock: Clock,
        backoff: Backoff | None = None,
    ) -> None:
        self.publisher = publisher
        self.worker = worker
        self._lookup = lookup
        self._live_ids = live_ids
        self._clock = clock
        self._backoff = backoff if backoff is not None else Backoff()
        # dirty machines, each with the trace context of the change that dirtied it
        self._dirty: dict[str, otel_context.Context] = {}
        self._wake = anyio.Event()
        self._reconciled = False
        self.published = 0
        self.failures = 0
        self.idle = anyio.Event()

    def mark(self, machine_id: str) -> None:
        self._dirty.pop(machine_id, None)  # the latest change's trace carries the publish
        self._dirty[machine_id] = otel_context.get_current()
        self.idle = anyio.Event() if self.idle.is_set() else self.idle
        self._wake.set()

    def _statements(self, ids: list[str]) -> list[Statement]:
        out: list[Statement] = []
        if not self._reconciled:
            out.append(reconcile_statement(self.worker, self._live_ids()))
        for mid in ids:
            doc = self._lookup(mid)
            out.append(delete_statement(mid) if doc is None else upsert_statement(machine_row(doc)))
        return out

    async def run(self) -> None:
        """Publish forever; cancel to stop (unpublished changes are redone by the next start)."""
        for mid in self._live_ids():
            self._dirty.setdefault(mid, otel_context.Context())
        attempt = 0
        while True:
            if not self._dirty and self._reconciled:
                self.idle.set()
                await self._wake.wait()
            self._wake = anyio.Event()
            batch = dict(self._dirty)
            ids = list(batch)
            self._dirty.clear()
            try:
                with self._span(batch):
                    await self.publisher.execute(self._statements(ids))
            except Exception as e:  # noqa: BLE001 — any publisher failure is retried, never fatal
                for mid, ctx in batch.items():
                    self._dirty.setdefault(mid, ctx)
                attempt += 1
                self.failures += 1
                log.warning("publishing %d machine(s) failed (%s); retrying", len(ids), e)
                await self._clock.sleep(self._backoff.delay(attempt))
                continue
            attempt = 0
            self._reconciled = True
            self.published += len(ids)

    def _span(self, batch: Mapping[str, otel_context.Context]) -> AbstractContextManager[Any]:
        """The publish's span: a child of the newest change's context, linked to the others."""
        spans = [trace.get_current_span(ctx).get_span_context() for ctx in batch.values()]
        traced = [sc for sc in spans if sc.is_valid]
        parent = otel_context.Context()  # no change was traced: a trace of its own
        if traced:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(traced[-1]), parent)
        links = [trace.Link(sc) for sc in dict.fromkeys(traced[:-1]) if sc != traced[-1]]
        attrs: dict[str, AttributeValue] = {
            "machine.ids": list(batch),
            "orchestrator.worker": self.worker,
            "publish.reconcile": not self._reconciled,
        }
        return tracing.tracer().start_as_current_span(
            "machines.publish", context=parent, links=links, attributes=attrs
        )
