"""Schema management: apply a schema (``CREATE TABLE`` / ``CREATE INDEX`` statements) as a diff
against the live database, the way corrosion does with its schema files.

Rules:

* The schema text may contain only ``CREATE TABLE``, ``CREATE INDEX``, ``DROP INDEX IF EXISTS``
  and ``SELECT crsql_fract_as_ordered('table', 'order_col', 'grouping_col', ...)`` (names as
  string literals: the table becomes an ordered list, crdt.fractindex); anything else (temp
  tables, ``CREATE TABLE ... AS SELECT``, DML) is refused before anything is touched. The whole
  schema is first built in a scratch in-memory database and checked there.
* CRR constraints are enforced with errors that name the table and column: a NOT NULL primary key,
  no UNIQUE index besides it, no foreign keys, a DEFAULT for every NOT NULL non-pk column.
* New tables are created and become CRRs. Existing plain tables named in the schema are adopted.
* New columns are added through the alter path *without* backfilling clocks: every node applies
  the same schema, so the new column's default is already the same everywhere, and stamping every
  row would only send a fleet-wide storm of identical changes. A row's clock for the column
  appears when the column is first written.
* Indexes are created, dropped, or recreated when their definition changed. So are a table's
  ordered-list triggers and view: made when the schema asks for them (or after the table's
  columns changed), dropped when it no longer does (the rows and their order keys stay).
* Dropping a table or a column, changing a column's definition or the primary key are refused
  unless ``allow_destructive=True``; then the table is rebuilt inside the alter path (clocks of
  dropped columns are compacted; a primary-key change re-creates the clocks).
* Applying the same schema twice changes nothing. Everything runs in one savepoint: on any error
  the database is left as it was.
* A table or index defined twice in the schema text (the same file included from two places) is
  fine when both definitions are the same (compared as parsed, not as text); two different
  definitions of one name are refused.
* ``reconcile_schema`` (the agent's start-up and reload) keeps a live table the schema does not
  list, and reports it, instead of refusing: only ``allow_destructive`` drops it.

Tables whose names start with ``sqlite_``, ``crsql_``, ``__corro_`` or contain ``__crsql_`` are
internal and never diffed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import apsw

from . import crr, fractindex
from .connection import state_of
from .errors import DestructiveChangeRefused, IncompatibleTableError, SchemaError
from .sqlutil import ident, idents
from .tableinfo import check_compatible, is_crr, read_table_info

_ALLOWED = re.compile(
    r"^\s*(CREATE\s+(UNIQUE\s+)?INDEX\b|CREATE\s+TABLE\b|DROP\s+INDEX\s+IF\s+EXISTS\b)", re.I
)
_ORDERED = re.compile(r"^\s*SELECT\s+crsql_fract_as_ordered\s*\((.*)\)\s*$", re.I | re.S)
_STRING = re.compile(r"\s*'((?:[^']|'')*)'\s*(?:,|$)")
_TEMP = re.compile(r"^\s*CREATE\s+(TEMP|TEMPORARY)\b", re.I)
_AS_SELECT = re.compile(r"^\s*CREATE\s+TABLE\b[^(]*\bAS\s+SELECT\b", re.I | re.S)
_IF_NOT_EXISTS = re.compile(r"\s+IF\s+NOT\s+EXISTS\s+", re.I)
_IDENT = r'(?:"(?:[^"]|"")*"|\[[^\]]*\]|`(?:[^`]|``)*`|[^\s.(]+)'
_CREATE_NAME = re.compile(
    rf"^\s*CREATE\s+(?:UNIQUE\s+)?(TABLE|INDEX)\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    rf"(?:{_IDENT}\s*\.\s*)?({_IDENT})",
    re.I,
)
_OPTIONS = re.compile(
    r"\)\s*((?:WITHOUT\s+ROWID|STRICT)(?:\s*,\s*(?:WITHOUT\s+ROWID|STRICT))*)\s*$", re.I
)


def is_internal(name: str) -> bool:
    low = name.lower()
    return low.startswith(("sqlite_", "crsql_", "__corro_")) or "__crsql_" in low


@dataclass(frozen=True)
class ColumnDef:
    name: str
    decl_type: str
    notnull: bool
    default: str | None
    pk: int
    hidden: int  # generated columns are hidden 2 or 3

    def same_definition(self, other: ColumnDef) -> bool:
        return (
            self.decl_type.upper() == other.decl_type.upper()
            and self.notnull == other.notnull
            and self.default == other.default
            and self.pk == other.pk
            and self.hidden == other.hidden
        )


@dataclass
class TableDef:
    name: str
    sql: str
    columns: dict[str, ColumnDef]
    options: str  # normalized "WITHOUT ROWID, STRICT" suffix, or ""
    indexes: dict[str, str] = field(default_factory=dict)  # name -> normalized CREATE INDEX
    ordered: tuple[str, ...] = ()  # an ordered list: (order column, grouping columns...)

    @property
    def pk(self) -> tuple[str, ...]:
        cols = sorted((c for c in self.columns.values() if c.pk), key=lambda c: c.pk)
        return tuple(c.name for c in cols)


def _normalize(sql: str) -> str:
    return " ".join(_IF_NOT_EXISTS.sub(" ", sql).split())


def _table_options(sql: str) -> str:
    m = _OPTIONS.search(sql.strip().rstrip(";"))
    if not m:
        return ""
    parts = [" ".join(p.split()).upper() for p in m.group(1).split(",")]
    return ", ".join(sorted(parts))


def _table_def(conn: apsw.Connection, name: str, sql: str) -> TableDef:
    cols = {}
    for _cid, cname, ctype, notnull, dflt, pk, hidden in conn.execute(
        'SELECT cid, name, type, "notnull", dflt_value, pk, hidden FROM pragma_table_xinfo(?)',
        (name,),
    ):
        cols[cname] = ColumnDef(cname, ctype or "", bool(notnull), dflt, pk, hidden)
    return TableDef(name, sql, cols, _table_options(sql))


def introspect(conn: apsw.Connection) -> dict[str, TableDef]:
    """The user tables and their indexes (internal tables excluded)."""
    tables: dict[str, TableDef] = {}
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY rowid"
    ).fetchall()
    for name, sql in cast("list[tuple[str, str | None]]", rows):
        if is_internal(name) or sql is None:
            continue
        tables[name] = _table_def(conn, name, sql)
    index_rows = conn.execute(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    ).fetchall()
    for name, tbl, sql in cast("list[tuple[str, str, str]]", index_rows):
        if tbl in tables and not is_internal(name):
            tables[tbl].indexes[name] = _normalize(sql)
    return tables


def split_statements(sql: str) -> list[str]:
    """Split SQL text on semicolons outside quotes and comments; empty statements are dropped."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    closers = {"'": "'", '"': '"', "`": "`", "[": "]"}
    while i < n:
        ch = sql[i]
        if ch in closers:
            end = sql.find(closers[ch], i + 1)
            while end != -1 and ch != "[" and end + 1 < n and sql[end + 1] == ch:
                end = sql.find(closers[ch], end + 2)  # doubled quote
            end = n - 1 if end == -1 else end
            buf.append(sql[i : end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end == -1 else end + 1
            buf.append(" ")
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end == -1 else end + 2
            buf.append(" ")
        elif ch == ";":
            out.append("".join(buf).strip())
            buf = []
            i += 1
        else:
            buf.append(ch)
            i += 1
    out.append("".join(buf).strip())
    return [stmt for stmt in out if stmt]


def _ordered_args(text: str) -> tuple[str, ...] | None:
    """The names of a ``SELECT crsql_fract_as_ordered(...)`` statement; None for any other."""
    m = _ORDERED.match(text)
    if m is None:
        return None
    args, rest = [], m.group(1).strip()
    while rest:
        arg = _STRING.match(rest)
        if arg is None:
            raise SchemaError(
                "crsql_fract_as_ordered in a schema takes the table and column names as string "
                f"literals ('t', 'position', ...): {text[:80]}",
                text,
            )
        args.append(arg.group(1).replace("''", "'"))
        rest = rest[arg.end() :]
    if len(args) < 2:
        raise SchemaError(
            f"crsql_fract_as_ordered needs the table and the column to order by: {text[:80]}", text
        )
    return tuple(args)


def _check_statement(text: str) -> None:
    if _ordered_args(text) is not None:
        return
    if _TEMP.match(text):
        raise SchemaError(f"temporary tables are not part of a schema: {text[:80]}", text)
    if _AS_SELECT.match(text):
        raise SchemaError(
            f"CREATE TABLE ... AS SELECT is not allowed in a schema: {text[:80]}", text
        )
    if not _ALLOWED.match(text):
        raise SchemaError(
            "a schema may only contain CREATE TABLE, CREATE INDEX, DROP INDEX IF EXISTS and "
            f"SELECT crsql_fract_as_ordered(...), not: {text[:80]}",
            text,
        )


def _created_object(text: str) -> tuple[str, str] | None:
    """``("table"|"index", name)`` of a CREATE statement, unquoted; None for anything else."""
    m = _CREATE_NAME.match(text)
    if m is None:
        return None
    name = m.group(2)
    if name[0] in '"`' and len(name) > 1:
        name = name[1:-1].replace(name[0] * 2, name[0])
    elif name[0] == "[":
        name = name[1:-1]
    return m.group(1).lower(), name


def _same_definition(scratch: apsw.Connection, kind: str, name: str, text: str) -> bool:
    """Whether ``text`` defines ``name`` exactly as ``scratch`` already has it: tables are
    compared column by column as parsed (type, NOT NULL, DEFAULT, key, options), indexes by
    their normalised text, the same rules the diff against the live database uses."""
    existing, sql = cast(
        "tuple[str, str]",
        scratch.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = ? AND name = ? COLLATE NOCASE",
            (kind, name),
        ).fetchone(),
    )
    if kind == "index":
        if _normalize(sql) == _normalize(text):
            return True
        have = _index_shape(scratch, existing)
        scratch.execute("SAVEPOINT same_index")
        try:
            scratch.execute(f"DROP INDEX {ident(existing)}")
            try:
                scratch.execute(text)
            except apsw.Error:
                return False
            want = _index_shape(scratch, existing)
        finally:
            scratch.execute("ROLLBACK TO same_index")
            scratch.execute("RELEASE same_index")
        return have == want and not have[2]  # a partial index's WHERE is compared as text
    alone = apsw.Connection(":memory:")
    try:
        try:
            alone.execute(text)
        except apsw.Error:
            return False
        (new_name,) = cast(
            "tuple[str]",
            alone.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchone(),
        )
        if new_name.lower() != existing.lower():
            return False
        old_def, new_def = _table_def(scratch, existing, sql), _table_def(alone, new_name, text)
        return list(old_def.columns.values()) == list(new_def.columns.values()) and (
            old_def.options == new_def.options
        )
    finally:
        alone.close()


def _index_shape(conn: apsw.Connection, name: str) -> tuple[Any, ...]:
    """An index as SQLite parsed it: table, unique, partial, and its key columns in order."""
    table, unique, partial = cast(
        "tuple[str, int, int]",
        conn.execute(
            'SELECT m.tbl_name, l."unique", l.partial FROM sqlite_master AS m '
            "JOIN pragma_index_list(m.tbl_name) AS l ON l.name = m.name "
            "WHERE m.type = 'index' AND m.name = ?",
            (name,),
        ).fetchone(),
    )
    keys = conn.execute(
        'SELECT cid, name, "desc", coll FROM pragma_index_xinfo(?) WHERE key = 1 ORDER BY seqno',
        (name,),
    ).fetchall()
    return (table.lower(), unique, partial, keys)


def _build(statements: list[str]) -> apsw.Connection:
    """A scratch database holding the tables and indexes of ``statements`` (ordered lists are
    ``parse_schema``'s); a repeated definition that matches the first is skipped, one that
    differs is refused."""
    scratch = apsw.Connection(":memory:")
    try:
        for text in statements:
            if _ordered_args(text) is not None:
                continue
            created = _created_object(text)
            if created is not None:
                kind, name = created
                found = scratch.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = ? AND name = ? COLLATE NOCASE",
                    (kind, name),
                ).fetchone()
                if found is not None:
                    if _same_definition(scratch, kind, name, text):
                        continue
                    raise SchemaError(
                        f"{kind} {name!r} is defined twice in the schema, differently: {text[:80]}",
                        text,
                    )
            try:
                scratch.execute(text)
            except apsw.Error as exc:
                raise SchemaError(f"invalid schema statement ({exc}): {text[:80]}", text) from None
    except BaseException:
        scratch.close()
        raise
    return scratch


_PARSED_MAX = 16  # schema texts kept parsed (a process applies a handful, to many databases)
_parsed: dict[str, dict[str, TableDef]] = {}


def parse_schema(sql: str) -> dict[str, TableDef]:
    """Build ``sql`` in a scratch database and describe it; refuse anything but table and index
    definitions and ordered lists.

    A pure function of the text, so results are cached (a fleet migration applies one schema
    to every machine's database); callers get their own copies."""
    tables = _parsed.get(sql)
    if tables is None:
        tables = _parse_schema(sql)
        if len(_parsed) >= _PARSED_MAX:
            del _parsed[next(iter(_parsed))]  # the oldest
        _parsed[sql] = tables
    return {
        name: replace(t, columns=dict(t.columns), indexes=dict(t.indexes))
        for name, t in tables.items()
    }


def _parse_schema(sql: str) -> dict[str, TableDef]:
    statements = split_statements(sql)
    for text in statements:
        _check_statement(text)
    scratch = _build(statements)
    try:
        tables = introspect(scratch)
    finally:
        scratch.close()
    for text in statements:
        args = _ordered_args(text)
        if args is not None:
            _set_ordered(tables, args, text)
    return tables


def _set_ordered(tables: dict[str, TableDef], args: tuple[str, ...], text: str) -> None:
    """Record an ordered list on its table, refusing what ``as_ordered`` would refuse."""
    name, order, grouping = args[0], args[1], args[2:]
    table = next((t for t in tables.values() if t.name.lower() == name.lower()), None)
    if table is None:
        raise SchemaError(
            f"crsql_fract_as_ordered: table {name!r} is not defined in the schema: {text[:80]}",
            text,
        )
    for col in args[1:]:
        if col not in table.columns:
            raise SchemaError(
                f"crsql_fract_as_ordered: table {table.name!r} has no column {col!r}", text
            )
    if table.columns[order].pk:
        raise SchemaError(
            f"crsql_fract_as_ordered: order column {order!r} is part of the primary key of "
            f"{table.name!r}; order by a column of its own",
            text,
        )
    if order in grouping or len(set(grouping)) != len(grouping):
        raise SchemaError(
            "crsql_fract_as_ordered: each column may appear once, and the order column is not "
            f"a grouping column: {text[:80]}",
            text,
        )
    if table.ordered and table.ordered != args[1:]:
        raise SchemaError(
            f"table {table.name!r} is made an ordered list twice in the schema, differently: "
            f"{text[:80]}",
            text,
        )
    table.ordered = args[1:]


def check_crr_constraints(desired: dict[str, TableDef], sql: str) -> None:
    """cr-sqlite's rules for each table; a refusal names the statement that created the table
    (so that the agent's message names the file to fix)."""
    statements = split_statements(sql)
    scratch = _build(statements)
    try:
        for name in desired:
            try:
                check_compatible(scratch, name)
            except IncompatibleTableError as exc:
                raise SchemaError(str(exc), _creating(statements, name)) from None
    finally:
        scratch.close()


def _creating(statements: list[str], table: str) -> str | None:
    """The first of ``statements`` that creates ``table`` (SQLite's names ignore case)."""
    for text in statements:
        created = _created_object(text)
        if created is not None and created[0] == "table" and created[1].lower() == table.lower():
            return text
    return None


def load_schema_paths(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Concatenate schema files: each path is a ``.sql`` file or a directory of them (sorted)."""
    return "\n;\n".join(f.read_text() for f in schema_files(paths))


def schema_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The ``.sql`` files ``paths`` name, in the order ``load_schema_paths`` reads them."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix == ".sql" and f.is_file())
        elif p.is_file():
            files = [p]
        else:
            raise SchemaError(f"schema path {str(p)!r} does not exist")
        found.extend(files)
    return found


def source_of(statement: str, paths: list[str | Path]) -> Path | None:
    """The schema file under ``paths`` that holds ``statement`` (as ``split_statements`` gives
    it, e.g. a ``SchemaError``'s), so that an error can name the file to fix."""
    for f in schema_files(paths):
        if statement in split_statements(f.read_text()):
            return f
    return None


def apply_schema(
    conn: apsw.Connection,
    sql: str,
    *,
    allow_destructive: bool = False,
    as_crr: bool = True,
) -> list[str]:
    """Make the live database match ``sql``; return a description of each change made (empty
    when the database already matched). With ``as_crr=False`` tables stay plain tables (for a
    node-local database, e.g. the orchestrator's step log)."""
    return _apply(conn, sql, allow_destructive, as_crr, keep_unlisted=False).changes


@dataclass
class SchemaOutcome:
    changes: list[str]  # what was done, as apply_schema describes it
    unlisted: list[str]  # live tables the schema does not list, left as they are


def reconcile_schema(
    conn: apsw.Connection, sql: str, *, allow_destructive: bool = False
) -> SchemaOutcome:
    """``apply_schema`` for a node's schema files: a live table the files do not list (left
    over from older files, or created by hand) is kept and reported rather than refused, so it
    never stops a node from starting; ``allow_destructive`` drops it."""
    return _apply(conn, sql, allow_destructive, True, keep_unlisted=True)


def _apply(
    conn: apsw.Connection, sql: str, allow_destructive: bool, as_crr: bool, *, keep_unlisted: bool
) -> SchemaOutcome:
    desired = parse_schema(sql)
    if as_crr:
        check_crr_constraints(desired, sql)
    with conn:
        live = introspect(conn)
        plan = _Plan(conn, desired, live, allow_destructive, as_crr)
        if keep_unlisted and not allow_destructive:
            plan.unlisted = [name for name in live if name not in desired]
        plan.check()
        plan.run()
    return SchemaOutcome(plan.done, plan.unlisted)


class _Plan:
    def __init__(
        self,
        conn: apsw.Connection,
        desired: dict[str, TableDef],
        live: dict[str, TableDef],
        allow_destructive: bool,
        as_crr: bool,
    ) -> None:
        self.conn = conn
        self.desired = desired
        self.live = live
        self.destructive = allow_destructive
        self.as_crr = as_crr
        self.done: list[str] = []
        self.unlisted: list[str] = []  # live tables missing from the schema, to leave alone

    def _refuse(self, what: str) -> None:
        if not self.destructive:
            raise DestructiveChangeRefused(what)

    def check(self) -> None:
        """Refuse destructive changes before anything is touched."""
        for name in self.live:
            if name not in self.desired and name not in self.unlisted:
                self._refuse(f"table {name!r} is missing from the schema and would be dropped")
        for name, want in self.desired.items():
            have = self.live.get(name)
            if have is None:
                continue
            if have.pk != want.pk:
                self._refuse(f"the primary key of table {name!r} would change")
            for col in have.columns:
                if col not in want.columns:
                    self._refuse(f"column {col!r} of table {name!r} would be dropped")
            for col, cdef in want.columns.items():
                old = have.columns.get(col)
                if old is not None and not old.same_definition(cdef):
                    self._refuse(f"column {col!r} of table {name!r} would change definition")
            if have.options != want.options:
                self._refuse(f"the options of table {name!r} would change ({want.options!r})")
            for col, cdef in want.columns.items():
                if col not in have.columns and cdef.pk:
                    self._refuse(f"column {col!r} of table {name!r} would join the primary key")

    def run(self) -> None:
        conn = self.conn
        for name in list(self.live):
            if name not in self.desired and name not in self.unlisted:
                self._drop_table(name)
        for name, want in self.desired.items():
            have = self.live.get(name)
            if have is None:
                conn.execute(want.sql)
                self.done.append(f"created table {name}")
                if self.as_crr:
                    crr.as_crr(conn, state_of(conn), name)
                have = TableDef(name, want.sql, dict(want.columns), want.options)
            elif self._needs_rebuild(have, want):
                self._rebuild(have, want)
                have = TableDef(name, want.sql, dict(want.columns), want.options)
            else:
                added = [c for c in want.columns if c not in have.columns]
                if added:
                    self._add_columns(name, want, added)
                if self.as_crr and not is_crr(conn, name):
                    crr.as_crr(conn, state_of(conn), name)
                    self.done.append(f"made table {name} a CRR")
                elif self.as_crr:  # internal upkeep, not a schema change to report
                    crr.ensure_dbv_index(conn, read_table_info(conn, name))
            self._sync_indexes(name, have.indexes, want.indexes)
            if self.as_crr:
                self._sync_ordering(name, want.ordered)

    @staticmethod
    def _needs_rebuild(have: TableDef, want: TableDef) -> bool:
        if have.pk != want.pk or have.options != want.options:
            return True
        for col, cdef in have.columns.items():
            other = want.columns.get(col)
            if other is None or not other.same_definition(cdef):
                return True
        return any(
            cdef.pk or cdef.hidden for c, cdef in want.columns.items() if c not in have.columns
        )

    def _drop_table(self, name: str) -> None:
        if is_crr(self.conn, name) or crr_tables_has(self.conn, name):
            crr.as_table(self.conn, name)
        self.conn.execute(f"DROP TABLE {ident(name)}")
        self.done.append(f"dropped table {name}")

    def _add_columns(self, name: str, want: TableDef, added: list[str]) -> None:
        """begin_alter / ADD COLUMN / a fast commit_alter: triggers are rebuilt for the new
        column list, the version is pinned, and no clocks are written."""
        conn = self.conn
        tracked = is_crr(conn, name)
        if tracked:
            crr.drop_triggers(conn, name)
        for col in added:
            conn.execute(f"ALTER TABLE {ident(name)} ADD COLUMN {_column_sql(want, col)}")
            self.done.append(f"added column {name}.{col}")
        if tracked:
            state = state_of(conn)
            state.fill_db_version_if_needed()
            conn.execute(
                "INSERT OR REPLACE INTO crsql_master (key, value) "
                "VALUES ('pre_compact_dbversion', ?)",
                (state.db_version,),
            )
            crr.create_triggers(conn, check_compatible(conn, name))
            state.invalidate_db_version()

    def _rebuild(self, have: TableDef, want: TableDef) -> None:
        """Destructive change: copy the rows into a table built from the new definition, inside
        the alter path so clocks are compacted (dropped columns) or re-created (new pk)."""
        conn = self.conn
        name = have.name
        tracked = is_crr(conn, name)
        if tracked:
            crr.begin_alter(conn, name)
        try:
            temp = f"{name}__corro_rebuild"
            create = _rename_create(want.sql, name, temp)
            conn.execute(create)
            common = [c for c in want.columns if c in have.columns and not want.columns[c].hidden]
            if common:
                conn.execute(
                    f"INSERT INTO {ident(temp)} ({idents(common)}) "
                    f"SELECT {idents(common)} FROM {ident(name)}"
                )
            conn.execute(f"DROP TABLE {ident(name)}")
            conn.execute(f"ALTER TABLE {ident(temp)} RENAME TO {ident(name)}")
        except BaseException:
            if tracked:
                conn.execute("ROLLBACK TO alter_crr")
                conn.execute("RELEASE alter_crr")
            raise
        if tracked:
            crr.commit_alter(conn, state_of(conn), name)
        elif self.as_crr:
            crr.as_crr(conn, state_of(conn), name)
        have.indexes = {}
        self.done.append(f"rebuilt table {name}")

    def _sync_ordering(self, table: str, ordered: tuple[str, ...]) -> None:
        """Make ``table`` the ordered list the schema asks for (after its columns are final:
        the view's triggers name them), or no ordered list."""
        conn = self.conn
        if ordered:
            if not fractindex.is_ordered_as(conn, table, *ordered):
                fractindex.as_ordered(conn, table, *ordered)
                by = f" by {ordered[0]}" + (f" per {', '.join(ordered[1:])}" if ordered[1:] else "")
                self.done.append(f"made table {table} an ordered list{by}")
        elif fractindex.is_ordered(conn, table):
            fractindex.remove_ordering(conn, table)
            self.done.append(f"table {table} is no longer an ordered list (its order keys stay)")

    def _sync_indexes(self, table: str, have: dict[str, str], want: dict[str, str]) -> None:
        conn = self.conn
        for name, sql in have.items():
            if want.get(name) != sql:
                conn.execute(f"DROP INDEX IF EXISTS {ident(name)}")
                if name not in want:
                    self.done.append(f"dropped index {name}")
        for name, sql in want.items():
            if have.get(name) != sql:
                conn.execute(sql)
                self.done.append(f"{'recreated' if name in have else 'created'} index {name}")


def crr_tables_has(conn: apsw.Connection, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
            (name + "__crsql_clock",),
        ).fetchone()
        is not None
    )


def _column_sql(table: TableDef, col: str) -> str:
    """The column's definition as written in the table's CREATE statement (for ADD COLUMN):
    name, type, NOT NULL, DEFAULT (what ADD COLUMN accepts), as the parsed table reports them."""
    cdef = table.columns.get(col)
    if cdef is None or cdef.hidden:
        raise SchemaError(f"column {col!r} not found in table {table.name!r}")
    parts = [ident(col)]
    if cdef.decl_type:
        parts.append(cdef.decl_type)
    if cdef.notnull:
        parts.append("NOT NULL")
    if cdef.default is not None:
        if not _LITERAL_DEFAULT.fullmatch(cdef.default.strip()):
            raise SchemaError(
                f"column {col!r} of table {table.name!r} cannot be added with the default "
                f"({cdef.default}): SQLite adds a column to an existing table only with a "
                "constant literal default (a number, a string, NULL, TRUE or FALSE); write the "
                "value itself, e.g. DEFAULT 3"
            )
        parts.append(f"DEFAULT {cdef.default}")
    return " ".join(parts)


_LITERAL_DEFAULT = re.compile(
    r"""[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|0[xX][0-9a-fA-F]+)
    |'(?:[^']|'')*'|[xX]'[0-9a-fA-F]*'
    |(?i:NULL|TRUE|FALSE)""",
    re.VERBOSE,
)


def _rename_create(sql: str, old: str, new: str) -> str:
    """The CREATE TABLE statement with the table renamed (via a scratch ALTER TABLE RENAME)."""
    scratch = apsw.Connection(":memory:")
    try:
        scratch.execute(sql)
        scratch.execute(f"ALTER TABLE {ident(old)} RENAME TO {ident(new)}")
        (renamed,) = cast(
            "tuple[str]",
            scratch.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (new,)
            ).fetchone(),
        )
        return renamed
    finally:
        scratch.close()
