"""Schema of a per-machine step-log database, and how an old database is brought up to date.

A machine's database holds three plain (non-replicated) tables: ``runs`` (one row per run, its
input and the step names fixed at START), ``events`` (the append-only log: START, COMPLETE,
ERROR, CANCEL, FINISH) and ``machine`` (the machine's document, one row).

``SCHEMA_SQL`` is the whole desired schema. :func:`migrate` is the single place that brings a
database opened by a newer release up to it: through the project's schema manager
(``crdt.schema.apply_schema``, a diff of CREATE statements against the live database, as plain
tables) when it is available, and through ``PRAGMA user_version`` steps otherwise. Either way the
database ends at ``user_version = SCHEMA_VERSION``; a database from a *newer* release is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import apsw

SCHEMA_VERSION = 1

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
    response TEXT
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
CREATE TABLE machine (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

# user_version fallback: MIGRATIONS[v] takes a database at version v to v + 1.
MIGRATIONS: dict[int, str] = {0: SCHEMA_SQL}


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer release; opening it could lose data."""


def _schema_manager() -> Callable[..., object] | None:
    try:
        from crdt.schema import apply_schema  # the project's schema management, when landed
    except ImportError:
        return None
    return apply_schema


def migrate(conn: apsw.Connection) -> int:
    """Bring ``conn``'s database to ``SCHEMA_VERSION``; returns the version it found.

    The fallback runs in one immediate transaction, so a crash mid-migration leaves the old
    schema intact; the schema manager's diff is idempotent, so repeating it is harmless.
    """
    found = conn.execute("PRAGMA user_version").fetchall()[0][0]
    if found == SCHEMA_VERSION:
        return found
    if found > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"step-log database has schema version {found}; this release knows up to "
            f"{SCHEMA_VERSION}"
        )
    apply_schema = _schema_manager()
    if apply_schema is not None:
        # a diff against the live schema is idempotent: a crash before user_version is set
        # just applies an empty diff next time
        apply_schema(conn, SCHEMA_SQL, as_crr=False)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        for version in range(found, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[version])
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
