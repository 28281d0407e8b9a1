"""Schema of a per-machine step-log database, and how an old database is brought up to date.

A machine's database holds four plain (non-replicated) tables: ``runs`` (one row per run, its
input and the step names fixed at START), ``events`` (the append-only log: START, COMPLETE,
ERROR, CANCEL, FINISH), ``history`` (finished runs compacted out of the first two: one row per
run, its events folded into a JSON list) and ``machine`` (the machine's document, one row).
A run's ``trace`` is the W3C trace context (``{"traceparent": ..., "tracestate": ...}`` as JSON)
its START was written in, NULL without tracing: every process that executes the run parents its
spans to it, so a run resumed after a crash continues the trace it started in (version 3).

``SCHEMA_SQL`` is the whole desired schema; the project's schema management
(``crdt.schema.apply_schema``, plain tables) applies it as a diff against the live database, so a
database written by an older release gains what is new (tables, columns, indexes) and keeps its
data; a change that would lose data is refused. ``PRAGMA user_version`` records the release's
schema version: a release only migrates when the version is older, and refuses a database from a
newer release. To change the schema: edit ``SCHEMA_SQL`` and bump ``SCHEMA_VERSION``.
"""

from __future__ import annotations

from typing import cast

import apsw

from crdt.schema import apply_schema

from .errors import OrchestratorError

SCHEMA_VERSION = 3

SCHEMA_SQL = """
CREATE TABLE runs (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    action TEXT NOT NULL,
    steps TEXT NOT NULL,
    finalizers TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',
    finished_at REAL,
    error TEXT,
    response TEXT,
    trace TEXT
);
CREATE UNIQUE INDEX runs_run_id ON runs (run_id);
CREATE INDEX runs_status_action ON runs (status, action);
CREATE TABLE events (
    run_seq INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step TEXT,
    payload TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    at REAL NOT NULL,
    PRIMARY KEY (run_seq, seq)
);
CREATE TABLE history (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    action TEXT NOT NULL,
    steps TEXT NOT NULL,
    finalizers TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    request TEXT NOT NULL,
    error TEXT,
    events TEXT NOT NULL,
    trace TEXT
);
CREATE TABLE machine (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


class SchemaTooNewError(OrchestratorError, RuntimeError):
    """The database was written by a newer release; opening it could lose data."""


def migrate(conn: apsw.Connection) -> int:
    """Bring ``conn``'s database to ``SCHEMA_VERSION``; returns the version it found.

    The diff runs in one savepoint (all or nothing) and is idempotent, so a crash before
    ``user_version`` is written just applies an empty diff on the next open.
    """
    found = cast(int, conn.execute("PRAGMA user_version").fetchall()[0][0])
    if found == SCHEMA_VERSION:
        return found
    if found > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"step-log database has schema version {found}; this release knows up to "
            f"{SCHEMA_VERSION}"
        )
    apply_schema(conn, SCHEMA_SQL, as_crr=False)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found
