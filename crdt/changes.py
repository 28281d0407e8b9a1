"""Reading changes: the nine-column rows of ``crsql_changes``.

A change row describes the *current* state of one clock entry (history-free): a non-pk column's
value read live from the base table, or a ``'-1'`` sentinel record carrying the row's causal
length. ``changes_since(v)`` returns every clock entry changed after local version ``v`` across all
CRR tables, ordered by ``(db_version, seq)``, which is what a peer pulls to catch up.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import apsw

from .gcpause import gc_paused
from .pack import pack_pk
from .sqlutil import ident, literal
from .tableinfo import SENTINEL, TableInfo, crr_tables, read_table_info


class Change(NamedTuple):
    """One row of ``crsql_changes``, in its column order."""

    table: str
    pk: bytes
    cid: str
    val: Any
    col_version: int
    db_version: int
    site_id: bytes | None
    cl: int
    seq: int


COLUMNS = ("table", "pk", "cid", "val", "col_version", "db_version", "site_id", "cl", "seq")

# A change as a plain tuple of the same fields in the same order (a Change is one, with names).
# Receivers that build many changes use these: a plain tuple of atoms costs less to build, and
# the garbage collector stops tracking it at its first collection, which it never does for a
# tuple subclass such as Change. Code that takes either reads fields by position.
ChangeRow = tuple[str, bytes, str, Any, int, int, bytes | None, int, int]


def value_expr(info: TableInfo) -> str:
    """The ``val`` column: the base-table value named by the clock row, NULL for sentinels."""
    if not info.non_pks:
        return "NULL"
    return (
        "CASE t1.col_name "
        + " ".join(f"WHEN {literal(c)} THEN base.{ident(c)}" for c in info.non_pk_names)
        + " END"
    )


def from_clause(info: TableInfo, *, join_site: bool = True) -> str:
    """Clock rows joined to their pk values, site id, causal length and base row.

    The base row is joined on the primary key, which applies the same affinity rules as
    cr-sqlite's ``SELECT col FROM t WHERE pk = ?``.
    """
    base_join = ""
    if info.non_pks:
        on = " AND ".join(f"base.{ident(c)} = pk_tbl.{ident(c)}" for c in info.pk_names)
        base_join = f" LEFT JOIN {info.quoted} AS base ON {on}"
    site_join = (
        " LEFT JOIN crsql_site_id AS site_tbl ON t1.site_id = site_tbl.ordinal" if join_site else ""
    )
    return (
        f" FROM {info.clock} AS t1 JOIN {info.pks_table} AS pk_tbl ON t1.key = pk_tbl.__crsql_key"
        f"{site_join}"
        f" LEFT JOIN {info.clock} AS t2 ON t1.key = t2.key AND t2.col_name = '{SENTINEL}'"
        f"{base_join}"
    )


# Expressions for the columns after ``val``, shared by the Python reader and the virtual table.
TAIL_EXPRS = "t1.col_version, t1.db_version, site_tbl.site_id, COALESCE(t2.col_version, 1), t1.seq"


def table_select(info: TableInfo, where: str = "") -> str:
    """Per-table SELECT yielding ``key, pk values..., cid, val, col_version, db_version,
    site ordinal, cl, seq`` (the ordinal is mapped to the site id by ``_rows``)."""
    pk_vals = ", ".join(f"pk_tbl.{ident(c)}" for c in info.pk_names)
    return (
        f"SELECT t1.key, {pk_vals}, t1.col_name, {value_expr(info)}, t1.col_version, "
        f"t1.db_version, t1.site_id, COALESCE(t2.col_version, 1), t1.seq"
        f"{from_clause(info, join_site=False)}{where}"
    )


_new = tuple.__new__  # builds a Change without NamedTuple.__new__'s Python frame


def _rows(
    conn: apsw.Connection, info: TableInfo, sql: str, bindings: tuple[Any, ...]
) -> list[Change]:
    """Run a ``table_select`` query and build Changes: pk values are packed once per key, and
    site ordinals mapped to ids in Python (cheaper than a join per row)."""
    npk = len(info.pks)
    name = info.name
    sites = dict(conn.execute("SELECT ordinal, site_id FROM crsql_site_id"))
    site_of = sites.get
    packed: dict[int, bytes] = {}
    if npk == 1:
        packed_get = packed.get

        def pack_one(key: int, p: Any) -> bytes:
            pk = packed[key] = pack_pk((p,))
            return pk

        # one comprehension: the hot loop of every sync, ~8% faster than append in a for loop
        return [
            _new(Change, (name, packed_get(key) or pack_one(key, p), cid, val, cv, dbv,
                          site_of(site), cl, seq))
            for key, p, cid, val, cv, dbv, site, cl, seq in conn.execute(sql, bindings)
        ]  # fmt: skip
    out: list[Change] = []
    append = out.append
    for row in conn.execute(sql, bindings):
        key = row[0]
        pk = packed.get(key)
        if pk is None:
            pk = packed[key] = pack_pk(row[1 : 1 + npk])
        cid, val, cv, dbv, site, cl, seq = row[1 + npk :]
        append(_new(Change, (name, pk, cid, val, cv, dbv, site_of(site), cl, seq)))
    return out


def changes_since(
    conn: apsw.Connection,
    db_version: int,
    *,
    exclude_site: bytes | None = None,
    limit: int | None = None,
    tables: list[str] | None = None,
) -> list[Change]:
    """Changes with ``db_version > db_version`` (optionally not authored by ``exclude_site``),
    ordered by ``(db_version, seq)`` like ``SELECT * FROM crsql_changes WHERE db_version > ?
    AND site_id IS NOT ?``."""
    with gc_paused():
        return _changes_since(conn, db_version, exclude_site, limit, tables)


def _changes_since(
    conn: apsw.Connection,
    db_version: int,
    exclude_site: bytes | None,
    limit: int | None,
    tables: list[str] | None,
) -> list[Change]:
    names = tables if tables is not None else crr_tables(conn)
    where = " WHERE t1.db_version > ?"
    bindings: tuple[Any, ...] = (db_version,)
    if exclude_site is not None:
        # by ordinal: a site never seen here has none, and then nothing is excluded
        where += " AND t1.site_id IS NOT (SELECT ordinal FROM crsql_site_id WHERE site_id = ?)"
        bindings += (exclude_site,)
    out: list[Change] = []
    for name in names:
        info = read_table_info(conn, name)
        sql = table_select(info, where) + " ORDER BY t1.db_version, t1.seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        out.extend(_rows(conn, info, sql, bindings))
    if len(names) > 1:
        out.sort(key=lambda c: (c.db_version, c.seq))
    if limit is not None:
        del out[limit:]
    return out


def changes_for_version(
    conn: apsw.Connection, db_version: int, *, tables: list[str] | None = None
) -> list[Change]:
    """All changes currently recorded at exactly ``db_version``, in seq order."""
    names = tables if tables is not None else crr_tables(conn)
    out: list[Change] = []
    with gc_paused():
        for name in names:
            info = read_table_info(conn, name)
            sql = table_select(info, " WHERE t1.db_version = ?") + " ORDER BY t1.seq"
            out.extend(_rows(conn, info, sql, (db_version,)))
    if len(names) > 1:
        out.sort(key=lambda c: c.seq)
    return out
