"""What the engine needs to know about a table: its primary-key and other columns, in cr-sqlite's
order, and whether it may become a CRR.

Primary-key columns are ordered by their position in ``PRIMARY KEY(...)``
(``pragma_table_info.pk``), other columns by declaration order (``cid``); the packed pk, the
triggers and ``crsql_changes`` all use these orders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import apsw

from .errors import IncompatibleTableError
from .sqlutil import ident, literal

SENTINEL = "-1"
CLOCK_SUFFIX = "__crsql_clock"
PKS_SUFFIX = "__crsql_pks"


@dataclass(frozen=True)
class Column:
    name: str
    decl_type: str
    notnull: bool
    default: str | None  # the DEFAULT clause's SQL text, as pragma_table_info reports it
    pk_index: int  # 0 for columns outside the primary key


@dataclass
class TableInfo:
    name: str
    pks: tuple[Column, ...]
    non_pks: tuple[Column, ...]
    # name -> position among non_pks, for validating incoming cids without a scan
    non_pk_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.non_pk_index = {c.name: i for i, c in enumerate(self.non_pks)}

    @property
    def clock(self) -> str:
        return ident(self.name + CLOCK_SUFFIX)

    @property
    def pks_table(self) -> str:
        return ident(self.name + PKS_SUFFIX)

    @property
    def quoted(self) -> str:
        return ident(self.name)

    @property
    def pk_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.pks)

    @property
    def non_pk_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.non_pks)


def table_exists(conn: apsw.Connection, table: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        is not None
    )


def read_table_info(conn: apsw.Connection, table: str) -> TableInfo:
    """Introspect ``table``; raises if it does not exist."""
    rows = cast(
        "list[tuple[int, str, str | None, int, str | None, int]]",
        conn.execute(
            'SELECT cid, name, type, "notnull", dflt_value, pk FROM pragma_table_info(?) '
            "ORDER BY cid",
            (table,),
        ).fetchall(),
    )
    if not rows:
        raise IncompatibleTableError(f"table {table!r} does not exist")
    cols = [Column(name, decl or "", bool(nn), dflt, pk) for _cid, name, decl, nn, dflt, pk in rows]
    pks = tuple(sorted((c for c in cols if c.pk_index), key=lambda c: c.pk_index))
    non_pks = tuple(c for c in cols if not c.pk_index)
    return TableInfo(table, pks, non_pks)


def check_compatible(conn: apsw.Connection, table: str) -> TableInfo:
    """Enforce cr-sqlite's CRR rules, with messages that say which rule and which column."""
    if not table_exists(conn, table):
        raise IncompatibleTableError(f"table {table!r} does not exist")
    info = read_table_info(conn, table)
    if not info.pks or any(not c.notnull for c in info.pks):
        raise IncompatibleTableError(
            f"table {table!r} has no primary key or primary key is nullable: every primary key "
            "column of a CRR must be declared NOT NULL"
        )
    for _seq, name, unique, origin, _partial in conn.execute(
        f'SELECT seq, name, "unique", origin, partial FROM pragma_index_list({literal(table)})'
    ):
        if unique and origin != "pk":
            raise IncompatibleTableError(
                f"table {table!r} has unique index {name!r} besides its primary key; CRRs cannot "
                "enforce uniqueness across replicas"
            )
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    assert row is not None  # the table exists (checked above)
    sql = row[0]
    if sql and "autoincrement" in sql.lower():
        raise IncompatibleTableError(f"table {table!r} uses AUTOINCREMENT, which CRRs cannot use")
    if conn.execute(f"SELECT 1 FROM pragma_foreign_key_list({literal(table)})").fetchone():
        raise IncompatibleTableError(
            f"table {table!r} has foreign key constraints, which CRRs cannot keep across replicas"
        )
    for c in info.non_pks:
        if c.notnull and c.default is None:
            raise IncompatibleTableError(
                f"column {c.name!r} of table {table!r} is NOT NULL without a DEFAULT; "
                "merges create "
                "rows column by column, so it needs a default value"
            )
    return info


def crr_tables(conn: apsw.Connection) -> list[str]:
    """Names of the CRR tables, in sqlite_master order of their clock tables (as cr-sqlite
    reads them)."""
    names = []
    for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ? ESCAPE '\\'",
        ("%\\_\\_crsql\\_clock",),
    ):
        names.append(name[: -len(CLOCK_SUFFIX)])
    return names


def is_crr(conn: apsw.Connection, table: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?",
            (table + "__crsql_itrig",),
        ).fetchone()
        is not None
    )
