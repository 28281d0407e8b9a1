"""What a client's SQL may do, enforced by SQLite's authorizer, and how long it may run.

Clients (``/v1/transactions``, ``/v1/queries``, subscriptions, ``Agent.execute`` / ``query``) send
SQL that runs on the agent's own connections. Unchecked, one statement could break the node: a
``CREATE TABLE`` that never replicates and stops the next start-up (the table is not in the
schema files), a ``DROP TABLE`` that makes this node diverge, a ``DELETE FROM __corro_members``,
an ``ATTACH`` or ``VACUUM INTO`` that writes files anywhere the agent may write, a ``PRAGMA`` that
changes the agent's connection, a ``COMMIT`` in the middle of the agent's transaction.

The rules, for a client's statement (what its CRR triggers do is the agent's business and is
allowed):

* writes (``INSERT``, ``UPDATE``, ``DELETE``, ``REPLACE``, upserts): only to replicated tables,
  and only in transactions (a query is read-only);
* reads: anything, internal tables included;
* refused: DDL (the schema comes from the schema files, applied by ``corrosion reload``),
  ``ATTACH`` / ``DETACH``, ``VACUUM`` (``INTO`` too), ``ANALYZE``, ``REINDEX``, transaction
  control (``BEGIN``, ``COMMIT``, ``SAVEPOINT``...: a request is one transaction already),
  pragmas other than the reading ones (``table_info(t)``, ``journal_mode``...), and the
  functions that change replication state or the schema (``crsql_as_crr`` and the like).

How: one ``Guard`` per connection is its authorizer for the connection's whole life (installing
an authorizer expires every statement the connection has prepared, so it is not toggled per
request). It refuses only inside ``guard.client()``, around a client's statements; the agent's
own statements on the same connection (bookkeeping, commits) pass. A statement the agent
prepared unchecked stays in the statement cache, so a client's statement of the same text is
prepared apart, with ``CLIENT_PREPARE_FLAGS`` (the cache keys on the flags). SQLite names the
trigger a check comes from, which tells the CRR triggers' own writes from the client's (the
triggers' names are read from the schema). SQLite reports a CTE's name the same way, so a CTE
named after a trigger passes for one when it calls functions: that gains it the counters the
triggers call (``crsql_next_db_version()`` and the like, which only consume numbers), not the
sync bit or the admin functions, refused everywhere; writes cannot come from a CTE.

Timeouts: ``Deadline`` is a progress handler on the connection that aborts the running statement
(``apsw.InterruptError``) once its time is up. Per connection and installed only around the
client's statements, it never interrupts the agent's bookkeeping or commit, unlike an
``interrupt()`` from a timer, which could land on whatever runs when it fires.

Thread rule: a Guard and a Deadline belong to their connection; they are used by whichever
thread uses the connection, one at a time (the writer under the agent's db lock, a reader while
it is checked out of the pool).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, cast

import apsw

from crdt.schema import is_internal

from ..errors import CorrosionError

# A client's statements are prepared with this flag, so the statement cache never hands them a
# statement the agent prepared without checks (apsw's cache keys on text and flags).
CLIENT_PREPARE_FLAGS = apsw.SQLITE_PREPARE_PERSISTENT

SCHEMA_REMEDY = (
    "the schema comes from the schema files (db.schema_paths), so that every node has the same "
    "tables: edit them and run `corrosion reload`"
)

# Functions a client may call anywhere; every other crsql_* function is refused.
CLIENT_CRSQL_FUNCTIONS = frozenset(
    {
        "crsql_site_id",
        "crsql_db_version",
        "crsql_sha",
        "crsql_pack_columns",
        "crsql_config_get",
        "crsql_rows_impacted",
        "crsql_fract_key_between",  # an order key between two others: computes, changes nothing
        "crsql_internal_merging",  # reads the sync bit (ordered lists' triggers)
    }
)
# What the CRR triggers call: allowed inside those triggers only.
TRIGGER_FUNCTIONS = frozenset(
    {
        "crsql_next_db_version",
        "crsql_increment_and_get_seq",
        "crsql_get_seq",
        "crsql_internal_take_seqs",
        "crsql_internal_local_write",
        "crsql_fract_fix_conflict_return_old_key",  # ordered lists: inserting after a tied key
    }
)
REFUSED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})

# Pragmas that only report. Without an argument any of these reads; the second set also reads
# with one (a table or index name, or a row limit).
READ_PRAGMAS = frozenset(
    {
        "application_id",
        "auto_vacuum",
        "automatic_index",
        "busy_timeout",
        "cache_size",
        "cache_spill",
        "cell_size_check",
        "collation_list",
        "compile_options",
        "data_version",
        "database_list",
        "defer_foreign_keys",
        "encoding",
        "foreign_keys",
        "freelist_count",
        "function_list",
        "ignore_check_constraints",
        "journal_mode",
        "journal_size_limit",
        "legacy_alter_table",
        "locking_mode",
        "max_page_count",
        "mmap_size",
        "module_list",
        "page_count",
        "page_size",
        "pragma_list",
        "query_only",
        "read_uncommitted",
        "recursive_triggers",
        "reverse_unordered_selects",
        "schema_version",
        "secure_delete",
        "synchronous",
        "temp_store",
        "trusted_schema",
        "user_version",
        "wal_autocheckpoint",
    }
)
READ_PRAGMAS_WITH_ARG = frozenset(
    {
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)
READ_PRAGMAS |= READ_PRAGMAS_WITH_ARG

_DDL = {
    apsw.SQLITE_CREATE_INDEX: "CREATE INDEX",
    apsw.SQLITE_CREATE_TABLE: "CREATE TABLE",
    apsw.SQLITE_CREATE_TEMP_INDEX: "CREATE INDEX",
    apsw.SQLITE_CREATE_TEMP_TABLE: "CREATE TEMP TABLE",
    apsw.SQLITE_CREATE_TEMP_TRIGGER: "CREATE TRIGGER",
    apsw.SQLITE_CREATE_TEMP_VIEW: "CREATE VIEW",
    apsw.SQLITE_CREATE_TRIGGER: "CREATE TRIGGER",
    apsw.SQLITE_CREATE_VIEW: "CREATE VIEW",
    apsw.SQLITE_CREATE_VTABLE: "CREATE VIRTUAL TABLE",
    apsw.SQLITE_DROP_INDEX: "DROP INDEX",
    apsw.SQLITE_DROP_TABLE: "DROP TABLE",
    apsw.SQLITE_DROP_TEMP_INDEX: "DROP INDEX",
    apsw.SQLITE_DROP_TEMP_TABLE: "DROP TABLE",
    apsw.SQLITE_DROP_TEMP_TRIGGER: "DROP TRIGGER",
    apsw.SQLITE_DROP_TEMP_VIEW: "DROP VIEW",
    apsw.SQLITE_DROP_TRIGGER: "DROP TRIGGER",
    apsw.SQLITE_DROP_VIEW: "DROP VIEW",
    apsw.SQLITE_DROP_VTABLE: "DROP TABLE",
}
_WRITES = {apsw.SQLITE_INSERT: "INSERT", apsw.SQLITE_UPDATE: "UPDATE", apsw.SQLITE_DELETE: "DELETE"}
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master"})

# A write sent as a query: corrosion's words first (clients may match them), then the remedy.
NOT_READONLY = "statement is not readonly: writes go through POST /v1/transactions (corrosion exec)"


class Refused(CorrosionError):
    """A client's statement does something clients may not do; ``message`` says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Guard:
    """A connection's authorizer. ``writes``: the connection runs client transactions (the
    writer), checked only inside ``client()``; else it runs queries only (a reader), all
    checked."""

    def __init__(self, *, writes: bool) -> None:
        self.writes = writes
        # a reader checks everything it runs: all of it, the agent's own reads too, only reads
        self._checking = not writes
        self._running = False  # the client's statement is prepared and now runs
        self._replicated: frozenset[str] = frozenset()
        self._ordered_views: frozenset[str] = frozenset()  # <crr>_fractindex of ordered lists
        self._triggers: frozenset[str] = frozenset()
        self._schema_version = -1
        self._refusal: str | None = None
        self._schema_write = False  # the statement writes sqlite_schema (DDL): refuse it
        self._traced = False  # statement() set the hook that refuses it once prepared

    def install(self, conn: apsw.Connection) -> Guard:
        conn.authorizer = self
        return self

    def _load_schema(self, conn: apsw.Connection) -> None:
        """Which tables replicate and which triggers are theirs (cached per schema version)."""
        row = conn.execute("PRAGMA schema_version").fetchone()
        assert row is not None  # a PRAGMA always returns its row
        version = row[0]
        if version == self._schema_version:
            return
        triggers = cast(
            "list[tuple[str, str]]",
            conn.execute(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'"
            ).fetchall(),
        )
        self._triggers = frozenset(name for name, _ in triggers)
        self._replicated = frozenset(  # internal CRRs (the cluster schema's) are the agent's
            t for name, t in triggers if name == t + "__crsql_itrig" and not is_internal(t)
        )
        # an ordered list's view: its INSTEAD OF triggers write the replicated table
        self._ordered_views = frozenset(
            t
            for name, t in triggers
            if name == t + "_insert_trig"
            and t.endswith("_fractindex")
            and t.removesuffix("_fractindex") in self._replicated
        )
        self._schema_version = version

    @contextlib.contextmanager
    def client(self, conn: apsw.Connection) -> Iterator[None]:
        """Check the statements prepared and run inside this block as a client's."""
        if self.writes:
            self._load_schema(conn)
        checking, self._checking = self._checking, True
        try:
            yield
        finally:
            self._checking = checking
            self._traced = False

    def statement(self, cursor: apsw.Cursor) -> None:
        """Call before each client statement on ``cursor``: resets the refusal and marks when
        the statement starts to run (SQLite checks ``VACUUM``'s own ``ATTACH`` only then)."""
        self._refusal = None
        self._schema_write = False
        self._running = False
        self._traced = True
        previous = cursor.exec_trace

        def started(cur: apsw.Cursor, sql: str, bindings: Any) -> bool:
            if self._schema_write:
                # SQLite checks the write to sqlite_schema before naming the DDL; the check
                # let it pass so that the DDL's own check could say what it is. It did not.
                self._refusal = _schema_change()
                return False
            self._running = True
            return previous(cur, sql, bindings) if previous is not None else True

        cursor.exec_trace = started

    def refused(self, exc: apsw.Error) -> Refused | None:
        """The refusal behind ``exc`` (the statement failed on a denied check), if any."""
        if self._refusal is not None:
            return Refused(self._refusal)
        # Two refusals SQLite makes itself, before asking the authorizer:
        if isinstance(exc, apsw.SQLError) and "cannot VACUUM" in str(exc):
            return Refused(_vacuum())  # VACUUM inside the agent's transaction
        if isinstance(exc, apsw.SQLError) and "may not be modified" in str(exc):
            return Refused(_internal_write(str(exc)))  # a write to sqlite_master and the like
        return None

    # -- the authorizer ------------------------------------------------------------------------

    def __call__(
        self, op: int, p1: str | None, p2: str | None, db: str | None, inner: str | None
    ) -> int:
        if not self._checking:
            return apsw.SQLITE_OK
        why = self._check(op, p1, p2, db, inner)
        if why is None:
            return apsw.SQLITE_OK
        if self._refusal is None:
            self._refusal = why
        return apsw.SQLITE_DENY

    def _check(
        self, op: int, p1: str | None, p2: str | None, db: str | None, inner: str | None
    ) -> str | None:
        if op in (apsw.SQLITE_READ, apsw.SQLITE_SELECT, apsw.SQLITE_RECURSIVE):
            return None
        in_trigger = inner is not None and inner in self._triggers
        if op in _WRITES:
            table = p1 or ""
            if not self.writes:
                return NOT_READONLY
            if in_trigger:
                return None  # a CRR trigger keeping its clock and key tables
            if db == "main" and (table in self._replicated or table in self._ordered_views):
                return None
            if table.lower() in _SCHEMA_TABLES and inner is None:
                if not self._traced:
                    return _schema_change()
                self._schema_write = True  # DDL: its own check follows (see statement())
                return None
            if is_internal(table):
                return _internal_write(f"{_WRITES[op]} on {table} is not allowed")
            return (
                f"{_WRITES[op]} on {table} is not allowed: only replicated tables can be written "
                f"through the API, and {table} is not one (a table replicates when it is defined "
                "in the schema files, db.schema_paths: add it there and run `corrosion reload`)"
            )
        if op == apsw.SQLITE_FUNCTION:
            return self._check_function((p2 or "").lower(), in_trigger)
        if op == apsw.SQLITE_PRAGMA:
            return self._check_pragma((p1 or "").lower(), p2)
        if op in _DDL:
            if not self.writes:
                return NOT_READONLY
            name = p2 if op == apsw.SQLITE_DROP_VTABLE else p1
            if (name or "").lower().startswith("sqlite_stat"):
                return _maintenance("ANALYZE")  # ANALYZE's first run creates its tables
            what = f"{_DDL[op]} {name}"
            if op in (apsw.SQLITE_DROP_TABLE, apsw.SQLITE_DROP_VTABLE):
                return (
                    f"{what} is not allowed through the API: {SCHEMA_REMEDY} (dropping a table "
                    "takes removing it from the files and `corrosion reload --allow-destructive`)"
                )
            return f"{what} is not allowed through the API: {SCHEMA_REMEDY}"
        if op == apsw.SQLITE_ALTER_TABLE:
            if not self.writes:
                return NOT_READONLY
            return f"ALTER TABLE {p2} is not allowed through the API: {SCHEMA_REMEDY}"
        if op in (apsw.SQLITE_ATTACH, apsw.SQLITE_DETACH):
            if self._running:
                return _vacuum()  # VACUUM attaches its target while it runs
            return (
                "ATTACH and DETACH are not allowed through the API: statements run against this "
                "node's database only (open another SQLite file directly; for a copy of this "
                "database use `corrosion backup`)"
            )
        if op == apsw.SQLITE_TRANSACTION:
            return _transaction_control(p1 or "", self.writes)
        if op == apsw.SQLITE_SAVEPOINT:
            word = {"BEGIN": "SAVEPOINT", "RELEASE": "RELEASE", "ROLLBACK": "ROLLBACK TO"}
            return _transaction_control(word.get(p1 or "", "SAVEPOINT"), self.writes)
        if op in (apsw.SQLITE_ANALYZE, apsw.SQLITE_REINDEX):
            return _maintenance("ANALYZE" if op == apsw.SQLITE_ANALYZE else "REINDEX")
        return f"this statement is not allowed through the API (SQLite action {op})"

    def _check_function(self, name: str, in_trigger: bool) -> str | None:
        if name in REFUSED_FUNCTIONS:
            return f"{name}() is not allowed through the API"
        if not name.startswith("crsql_") or name in CLIENT_CRSQL_FUNCTIONS:
            return None
        if in_trigger and name in TRIGGER_FUNCTIONS:
            return None
        return (
            f"{name}() is not allowed through the API: it changes the schema or the state of "
            f"replication, which the agent owns ({SCHEMA_REMEDY})"
        )

    def _check_pragma(self, name: str, arg: str | None) -> str | None:
        if name in READ_PRAGMAS and (arg is None or name in READ_PRAGMAS_WITH_ARG):
            return None
        shown = f"PRAGMA {name}" if arg is None else f"PRAGMA {name} = {arg}"
        return (
            f"{shown} is not allowed through the API: the agent sets its own connection and "
            "database options; pragmas that only read (table_info(t), a setting's current "
            "value) are allowed"
        )


def _schema_change() -> str:
    return f"changing the schema is not allowed through the API: {SCHEMA_REMEDY}"


def _internal_write(what: str) -> str:
    return (
        f"{what}: internal tables (__corro_*, crsql_*, *__crsql_*, sqlite_*) are the agent's "
        "bookkeeping, kept by the agent; clients may read them"
    )


def _maintenance(kind: str) -> str:
    return f"{kind} is not allowed through the API: the agent maintains its database"


def _vacuum() -> str:
    return (
        "VACUUM is not allowed through the API (VACUUM INTO would write a file on the agent's "
        "host): for a copy of the database use `corrosion backup`"
    )


def _transaction_control(word: str, writes: bool) -> str:
    if writes:
        return (
            f"{word} is not allowed: a request is one transaction already (all of its "
            "statements apply, or none do); send statements that belong together in one request"
        )
    return f"{word} is not allowed in a query: each query reads on its own"


def guard_of(conn: apsw.Connection) -> Guard | None:
    auth = conn.authorizer
    return auth if isinstance(auth, Guard) else None


# -- timeouts ------------------------------------------------------------------------------------

PROGRESS_STEPS = 1000  # SQLite VM instructions between deadline checks (a few microseconds)
_DEADLINE_ID = "corrosion.deadline"


class Deadline:
    """Abort the statements running on ``conn`` once ``seconds`` have passed; ``expired`` then
    tells a timeout from any other interrupt. ``seconds`` None or 0: no limit."""

    def __init__(self, conn: apsw.Connection, seconds: float | None) -> None:
        self.conn = conn
        self.seconds = seconds or None
        self.expired = False
        self._end = 0.0

    def _check(self) -> bool:
        if time.monotonic() >= self._end:
            self.expired = True
        return self.expired

    def __enter__(self) -> Deadline:
        if self.seconds is not None:
            self._end = time.monotonic() + self.seconds
            self.conn.set_progress_handler(self._check, PROGRESS_STEPS, id=_DEADLINE_ID)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.seconds is not None:
            self.conn.set_progress_handler(None, id=_DEADLINE_ID)

    def message(self, what: str, set_by: str) -> str:
        """``set_by``: where the limit comes from (``client_timeout(key)`` for a client's)."""
        return (
            f"{what} did not finish within its timeout of {self.seconds:g} s and was "
            f"interrupted ({set_by}; 0 for none)"
        )


def client_timeout(config_key: str) -> str:
    """Where a client's limit comes from, for ``Deadline.message``: the same words whether the
    client used the HTTP API or the CLI."""
    return f"the timeout parameter sets it: ?timeout= or --timeout, default {config_key}"


def parse_timeout(value: str | None, default: float | None) -> float | None:
    """``?timeout=`` in seconds (fractions allowed); absent: ``default``; 0: no limit."""
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (0 <= seconds < float("inf")):
        raise ValueError(f"timeout must be a number of seconds, 0 for none (got {value!r})")
    return seconds or None
