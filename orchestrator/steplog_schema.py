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
schema version and the ``schema_meta`` row the version and hash of the schema text it was migrated
to: a release only migrates when the version is older, and refuses a database from a newer
release. To change the schema: edit ``SCHEMA_SQL`` and bump ``SCHEMA_VERSION``.

A migration is one transaction (the diff, the ``schema_meta`` row and ``user_version``): it either
lands whole or leaves the file as it was, so a database whose data a new constraint rejects, or a
damaged file, stays readable by the old schema and is reported (:class:`SchemaStatus`) rather than
half-migrated. Who migrates when (lazily on a write, eagerly in the background at a bounded rate)
is :mod:`.migrations`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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
CREATE TABLE schema_meta (
    id INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


CURRENT = "current"  # the database is on the target schema
PENDING = "pending"  # older, readable, migrated on its next write or by the background migrator
FAILED = "migration_failed"  # its migration was refused or failed; the file was left as it was


def schema_hash(sql: str) -> str:
    """A short fingerprint of a schema text (whitespace-insensitive), recorded in the file."""
    return hashlib.sha256(" ".join(sql.split()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SchemaTarget:
    """A schema a release migrates its databases to: ``SCHEMA_SQL`` at ``SCHEMA_VERSION`` in
    production; tests and benches pass a later one to rehearse the next release's migration."""

    version: int
    sql: str

    @property
    def hash(self) -> str:
        return schema_hash(self.sql)


CURRENT_TARGET = SchemaTarget(SCHEMA_VERSION, SCHEMA_SQL)


@dataclass(frozen=True)
class SchemaStatus:
    """What one machine database's schema is: its version and hash (empty before version 3 wrote
    it), ``state`` (CURRENT, PENDING or FAILED) and, when FAILED, why."""

    version: int
    hash: str
    state: str
    error: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"version": self.version, "hash": self.hash, "state": self.state,
                "error": self.error}  # fmt: skip


class SchemaTooNewError(OrchestratorError, RuntimeError):
    """The database was written by a newer release; opening it could lose data."""


class MigrationFailedError(OrchestratorError, RuntimeError):
    """The machine's database could not be migrated to this release's schema (it was left as it
    was): operations that write to it are refused until an operator repairs it."""

    status = 503


def read_status(conn: apsw.Connection, target: SchemaTarget = CURRENT_TARGET) -> SchemaStatus:
    """The schema status of ``conn``'s database as the file records it (never changes it)."""
    found = cast(int, conn.execute("PRAGMA user_version").fetchall()[0][0])
    if found > target.version:
        raise SchemaTooNewError(
            f"step-log database has schema version {found}; this release knows up to "
            f"{target.version}"
        )
    rows: list = []
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_meta'").fetchall():
        rows = conn.execute("SELECT hash FROM schema_meta WHERE id = 1").fetchall()
    recorded = cast(str, rows[0][0]) if rows else ""
    return SchemaStatus(found, recorded, CURRENT if found == target.version else PENDING)


def migrate(conn: apsw.Connection, target: SchemaTarget = CURRENT_TARGET) -> SchemaStatus:
    """Bring ``conn``'s database to ``target``; returns its status after (CURRENT).

    The diff, the ``schema_meta`` row and ``user_version`` are one transaction: on any error
    (a refused diff, a constraint the data violates, a damaged file) it raises and the database
    is exactly as it was.
    """
    if read_status(conn, target).state == CURRENT:
        return read_status(conn, target)
    # the write lock first, then the check again: another connection to the same file (an API
    # call's log while the background sweep has it open) may have migrated it meanwhile
    conn.execute("BEGIN IMMEDIATE")
    try:
        if read_status(conn, target).state != CURRENT:
            apply_schema(conn, target.sql, as_crr=False)  # its savepoint nests in ours
            conn.execute(
                "INSERT INTO schema_meta (id, version, hash) VALUES (1, ?, ?) ON CONFLICT (id) "
                "DO UPDATE SET version = excluded.version, hash = excluded.hash",
                (target.version, target.hash),
            )
            conn.execute(f"PRAGMA user_version = {target.version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
            conn.execute("ROLLBACK")
        raise
    return read_status(conn, target)
