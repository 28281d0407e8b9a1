"""Opening a database with cr-sqlite's SQL surface registered on the connection.

``connect()`` is our ``load_extension('crsqlite')``: it bootstraps ``crsql_master``,
``crsql_site_id`` (ordinal 0 is the local site; its 16-byte id persists in the file) and
``crsql_tracked_peers``, registers the ``crsql_*`` functions and the ``crsql_changes`` table, and
installs the commit/rollback hooks that drive db_version (see state.py). Every write through such a
connection to a CRR is tracked by the CRR's triggers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, cast

import apsw

from . import crr, fractindex
from .errors import CrdtError
from .merge import merge as _merge
from .merge import merge_changesets as _merge_changesets
from .pack import pack_columns
from .state import CrrState
from .tableinfo import read_table_info
from .vtab import ChangesModule

CRSQLITE_VERSION = 160300
MIN_SUPPORTED_VERSION = 150000

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS "crsql_master" ("key" TEXT PRIMARY KEY, "value" ANY);
CREATE TABLE IF NOT EXISTS "crsql_site_id" (site_id BLOB NOT NULL, ordinal INTEGER PRIMARY KEY);
CREATE UNIQUE INDEX IF NOT EXISTS crsql_site_id_site_id ON "crsql_site_id" (site_id);
CREATE TABLE IF NOT EXISTS crsql_tracked_peers ("site_id" BLOB NOT NULL, "version" INTEGER NOT NULL,
  "seq" INTEGER DEFAULT 0, "tag" INTEGER, "event" INTEGER,
  PRIMARY KEY ("site_id", "tag", "event")) STRICT;
"""

CONFIG_KEYS = {"merge-equal-values"}


class Connection(apsw.Connection):
    """An ``apsw.Connection`` with CRR support; ``crr`` is its per-connection CRR state."""

    crr: CrrState


def new_site_id() -> bytes:
    """16 random bytes with UUIDv4 bits, as cr-sqlite creates them."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) + 0x40
    b[8] = (b[8] & 0x3F) + 0x80
    return bytes(b)


def connect(
    path: str = ":memory:",
    *,
    site_id: bytes | None = None,
    merge_equal_values: bool | None = None,
    wal: bool = False,
    **opts: Any,
) -> Connection:
    """Open ``path`` with the CRR functions and ``crsql_changes`` registered.

    ``site_id`` seeds a *new* database's site id (simulations pass ids from their seeded RNG);
    an existing database keeps the id stored in it. ``merge_equal_values`` sets and persists the
    ``merge-equal-values`` config. ``wal`` switches a file database to WAL journaling. Other
    keyword arguments go to ``apsw.Connection`` (``flags``, ``vfs``, ``statementcachesize``).

    ``flags`` may add ``apsw.SQLITE_OPEN_NOMUTEX`` (measured: ``changes_since`` 8% and a merge
    into an existing replica 3% cheaper, SQLite's per-call mutex gone) only for a connection
    that one thread opens, uses and closes: SQLite then no longer serialises calls on it, and
    apsw no longer refuses a second thread (its ThreadingViolationError is a try of that
    mutex), so a statement run, or a cursor finalised by the garbage collector, in another
    thread while the owner steps one corrupts memory instead of raising. The agent's
    connections are used by several threads in turn, so they keep the mutex.
    """
    conn = Connection(path, **opts)
    try:
        conn.set_busy_timeout(5000)
        if wal and path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        state, rebuilt = _bootstrap(conn, site_id)
        conn.crr = state
        _register(conn, state)
        if rebuilt:
            _record_unclocked(conn, state, rebuilt)
        if merge_equal_values is not None:
            config_set(conn, state, "merge-equal-values", 1 if merge_equal_values else 0)
    except BaseException:
        conn.close()
        raise
    return conn


def _record_unclocked(conn: apsw.Connection, state: CrrState, tables: list[str]) -> None:
    """Values in CRRs whose triggers were just rebuilt that no clock records (a column added by
    a plain ``ALTER TABLE`` outside the alter functions: the old triggers did not know it) become
    local writes at one new db_version, so peers receive them. A table whose triggers were only
    rewritten by a newer release has none, and no version is taken."""
    with conn:
        for table in tables:
            crr.backfill(conn, state, read_table_info(conn, table), commit_alter=False)


def _bootstrap(conn: apsw.Connection, site_id: bytes | None) -> tuple[CrrState, list[str]]:
    """The connection's CRR state, and the CRRs whose triggers were rebuilt on this open."""
    rebuilt: list[str] = []
    readonly = conn.readonly("main")
    if not readonly:
        with conn:
            conn.execute(_BOOTSTRAP)
            row = conn.execute(
                "SELECT value FROM crsql_master WHERE key = 'crsqlite_version'"
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO crsql_master (key, value) VALUES ('crsqlite_version', ?)",
                    (CRSQLITE_VERSION,),
                )
            elif int(row[0]) < MIN_SUPPORTED_VERSION:
                raise CrdtError(
                    f"database was created by cr-sqlite {row[0]}, older than the supported "
                    f"{MIN_SUPPORTED_VERSION}"
                )
            stored = conn.execute("SELECT site_id FROM crsql_site_id WHERE ordinal = 0").fetchone()
            if stored is None:
                if site_id is not None and len(site_id) != 16:
                    raise CrdtError("site_id must be 16 bytes")
                conn.execute(
                    "INSERT INTO crsql_site_id (site_id, ordinal) VALUES (?, 0)",
                    (site_id or new_site_id(),),
                )
            rebuilt = crr.upgrade_triggers(conn)
    row = conn.execute("SELECT site_id FROM crsql_site_id WHERE ordinal = 0").fetchone()
    if row is None:
        raise CrdtError("database has no site id and is read-only")
    state = CrrState(conn, row[0])
    mev = conn.execute(
        "SELECT value FROM crsql_master WHERE key = 'config.merge-equal-values'"
    ).fetchone()
    state.merge_equal_values = bool(mev and mev[0])
    return state, rebuilt


def config_set(conn: apsw.Connection, state: CrrState, name: str, value: Any) -> Any:
    if name not in CONFIG_KEYS:
        raise CrdtError(f"unknown config: {name}")
    if name == "merge-equal-values":
        state.merge_equal_values = bool(value)
    conn.execute(
        "INSERT OR REPLACE INTO crsql_master (key, value) VALUES (?, ?)", ("config." + name, value)
    )
    return value


def config_get(conn: apsw.Connection, name: str) -> Any:
    if name not in CONFIG_KEYS:
        raise CrdtError(f"unknown config: {name}")
    row = conn.execute(
        "SELECT value FROM crsql_master WHERE key = ?", ("config." + name,)
    ).fetchone()
    return row[0] if row else None


def _register(conn: Connection, state: CrrState) -> None:
    # apsw's stubs type a scalar function as taking *args only; fixed arities are valid
    f: Callable[..., None] = conn.create_scalar_function
    f("crsql_site_id", lambda: state.site_id, 0, deterministic=True)
    f("crsql_db_version", state.current_db_version, 0)
    f("crsql_next_db_version", state.next_db_version, 0)
    f("crsql_next_db_version", state.next_db_version, 1)
    f("crsql_increment_and_get_seq", state.bump_seq, 0)
    f("crsql_get_seq", lambda: state.seq, 0)
    f("crsql_internal_take_seqs", state.take_seqs, 1)
    f("crsql_rows_impacted", lambda: state.rows_impacted, 0)
    f("crsql_pack_columns", pack_columns, -1, deterministic=True)

    def sync_bit(*args: Any) -> int:
        if args:
            state.sync_bit = int(args[0])
        return state.sync_bit

    f("crsql_internal_sync_bit", lambda: state.sync_bit, 0)
    # the same bit, read-only: what ordered lists' triggers check (clients may call it too)
    f("crsql_internal_merging", lambda: state.sync_bit, 0)
    f("crsql_internal_local_write", state.local_write_guard, 0)
    f("crsql_internal_sync_bit", sync_bit, 1)
    f("crsql_as_crr", lambda t: crr.as_crr(conn, state, t), 1)
    f("crsql_as_crr", lambda _schema, t: crr.as_crr(conn, state, t), 2)
    f("crsql_as_table", lambda t: crr.as_table(conn, t), 1)
    f("crsql_begin_alter", lambda t: crr.begin_alter(conn, t), 1)
    f("crsql_begin_alter", lambda _schema, t: crr.begin_alter(conn, t), 2)
    f("crsql_commit_alter", lambda t: crr.commit_alter(conn, state, t), 1)
    f("crsql_commit_alter", lambda _schema, t: crr.commit_alter(conn, state, t), 2)
    f("crsql_config_set", lambda n, v: config_set(conn, state, n, v), 2)
    f("crsql_config_get", lambda n: config_get(conn, n), 1)
    f("crsql_finalize", lambda: "finalized", 0)
    f("crsql_sha", lambda: "corrosion-python", 0, deterministic=True)
    fractindex.register(conn)
    # apsw's VTModule protocol wrongly requires ShadowName and types Connect's *args as tuples
    conn.create_module("crsql_changes", ChangesModule(conn, state), eponymous=True)  # type: ignore[arg-type]
    conn.set_commit_hook(state.on_commit, id="crsql")
    conn.set_rollback_hook(state.on_rollback, id="crsql")


# -- Python API -----------------------------------------------------------------------------


def state_of(conn: apsw.Connection) -> CrrState:
    try:
        return cast(CrrState, conn.crr)  # type: ignore[attr-defined]
    except AttributeError:
        raise CrdtError("connection was not opened with crdt.connect()") from None


def merge(conn: apsw.Connection, changes: Iterable[tuple[Any, ...]]) -> int:
    """Merge changes (nine-field tuples or :class:`crdt.Change`) in one transaction; return the
    number of rows impacted. On any invalid change, nothing is applied and the error is raised."""
    return _merge(conn, state_of(conn), changes)


def merge_changesets(
    conn: apsw.Connection, changesets: Iterable[Iterable[tuple[Any, ...]]]
) -> list[int | None]:
    """Merge changesets inside the caller's transaction, each at a local db_version of its own;
    return it per changeset (None when nothing won). See ``crdt.merge.merge_changesets``."""
    return _merge_changesets(conn, state_of(conn), changesets)


def site_id(conn: apsw.Connection) -> bytes:
    return state_of(conn).site_id


def db_version(conn: apsw.Connection) -> int:
    return state_of(conn).current_db_version()


def as_crr(conn: apsw.Connection, table: str) -> None:
    crr.as_crr(conn, state_of(conn), table)
