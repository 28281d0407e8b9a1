"""Reading changes: the nine-column rows of ``crsql_changes``.

A change row describes the *current* state of one clock entry (history-free): a non-pk column's
value read live from the base table, or a ``'-1'`` sentinel record carrying the row's causal
length. ``changes_since(v)`` returns every clock entry changed after local version ``v`` across all
CRR tables, ordered by ``(db_version, seq)``, which is what a peer pulls to catch up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import Any, NamedTuple, overload

import apsw

from .gcpause import gc_paused
from .pack import ONE_INTEGER, pack_pk
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


class CompactChanges(Sequence[ChangeRow]):
    """One changeset's changes in the shape they travel in (corrosion's wire rows): eight
    fields ``(table, pk, cid, val, col_version, site_id, cl, seq)``, the db_version the whole
    changeset's, a site id of None meaning ``site``. ``merge_changesets`` merges the rows as
    they are; reading a change builds its ChangeRow. A receiver that only merges them builds no
    tuple per change (a seventh of what decoding a broadcast frame of 20 rows costs).

    ``checked``: whoever built them (a wire decoder) checked every row's types already (eight
    fields, col_version, cl and seq integers, the site id None or a blob of at most 16 bytes),
    so the merge does not check them again change by change."""

    __slots__ = ("checked", "db_version", "rows", "site")

    def __init__(
        self,
        rows: Sequence[Sequence[Any]],
        site: bytes,
        db_version: int,
        *,
        checked: bool = False,
    ) -> None:
        self.rows = rows
        self.site = site
        self.db_version = db_version
        self.checked = checked

    def expand(self, r: Sequence[Any]) -> ChangeRow:
        """The ChangeRow of one of its rows."""
        table, pk, cid, val, cv, site, cl, seq = r
        return (
            table,
            pk,
            cid,
            val,
            cv,
            self.db_version,
            self.site if site is None else site,
            cl,
            seq,
        )

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> ChangeRow: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[ChangeRow, ...]: ...
    def __getitem__(self, i: int | slice) -> ChangeRow | tuple[ChangeRow, ...]:
        if isinstance(i, slice):
            return tuple(map(self.expand, self.rows[i]))
        return self.expand(self.rows[i])

    def __iter__(self) -> Iterator[ChangeRow]:
        return map(self.expand, self.rows)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CompactChanges | tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"CompactChanges({tuple(self)!r})"


def value_expr(info: TableInfo) -> str:
    """The ``val`` column: the base-table value named by the clock row, NULL for sentinels."""
    if not info.non_pks:
        return "NULL"
    return (
        "CASE t1.col_name "
        + " ".join(f"WHEN {literal(c)} THEN base.{ident(c)}" for c in info.non_pk_names)
        + " END"
    )


def from_clause(info: TableInfo, *, join_site: bool = True, join_cl: bool = True) -> str:
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
        f"{_sentinel_join(info) if join_cl else ''}{base_join}"
    )


# Expressions for the columns after ``val``, shared by the Python reader and the virtual table.
TAIL_EXPRS = "t1.col_version, t1.db_version, site_tbl.site_id, COALESCE(t2.col_version, 1), t1.seq"


def table_select(info: TableInfo, where: str = "", *, with_cl: bool = True) -> str:
    """Per-table SELECT yielding ``key, pk values..., cid, val, col_version, db_version,
    site ordinal, cl, seq`` (the ordinal is mapped to the site id by ``_rows``); without the
    key for a one-column pk, whose value serves as well to pack each pk once; without ``cl``
    when the caller takes it from ``sentinels``."""
    pk_vals = ", ".join(f"pk_tbl.{ident(c)}" for c in info.pk_names)
    key = "t1.key, " if len(info.pks) > 1 else ""
    cl = "COALESCE(t2.col_version, 1), " if with_cl else ""
    return (
        f"SELECT {key}{pk_vals}, t1.col_name, {value_expr(info)}, t1.col_version, "
        f"t1.db_version, t1.site_id, {cl}t1.seq"
        f"{from_clause(info, join_site=False, join_cl=with_cl)}{where}"
    )


def _sentinel_join(info: TableInfo) -> str:
    return f" LEFT JOIN {info.clock} AS t2 ON t1.key = t2.key AND t2.col_name = '{SENTINEL}'"


def sentinels(conn: apsw.Connection, info: TableInfo) -> dict[Any, int]:
    """Every row's causal length other than 1, by pk value (one-column pk) or key: one pass
    over the clock table, cheaper than looking up each change's sentinel once a read returns
    a good part of the table."""
    if len(info.pks) == 1:
        sql = (
            f"SELECT p.{ident(info.pk_names[0])}, c.col_version FROM {info.clock} AS c "
            f"JOIN {info.pks_table} AS p ON p.__crsql_key = c.key WHERE c.col_name = ?"
        )
    else:
        sql = f"SELECT key, col_version FROM {info.clock} WHERE col_name = ?"
    return dict(conn.execute(sql, (SENTINEL,)))


# A read returning at least 1/SCAN_FRACTION of a table's estimated clock rows takes causal
# lengths from ``sentinels`` (a pass over the table) instead of a lookup per row.
SCAN_FRACTION = 5
# A read returning at least ``PASS_PER_KEY + PASS_PER_COLUMN * non-pk columns`` changes per row of
# the table reads the table once (``_table_pass``: each row's pk, causal length and values) and
# then walks the clock's db_version index alone, joining nothing per change. Measured with
# callgrind: on a 10-column table the two ways cost the same at 3 changes per row, and the pass
# is 6% cheaper at 5; on a 2-column table reading every change, it is 11% dearer.
PASS_PER_KEY = 2.0
PASS_PER_COLUMN = 0.1


def _count(
    conn: apsw.Connection, info: TableInfo, where: str, bindings: tuple[Any, ...], limit: int | None
) -> int:
    """How many clock rows the read returns (at most the limit), walking the db_version index
    only (the where names t1 and crsql_site_id). Nothing else is aggregated: min and max of the
    site ordinals (to skip reading each change's site when they are all one) cost as much as
    the table pass then saves (A/B: no difference), and the joins' path never used them."""
    row = conn.execute(f"SELECT count(*) FROM {info.clock} AS t1{where}", bindings).fetchone()
    n = row[0] if row else 0
    return n if limit is None else min(n, limit)


def _table_keys(conn: apsw.Connection, info: TableInfo) -> int:
    row = conn.execute(f"SELECT max(__crsql_key) FROM {info.pks_table}").fetchone()
    return row[0] if row and type(row[0]) is int else 0


_new = tuple.__new__  # builds a Change without NamedTuple.__new__'s Python frame


def _rows(
    conn: apsw.Connection,
    info: TableInfo,
    sql: str,
    bindings: tuple[Any, ...],
    cls: dict[Any, int] | None = None,
) -> list[Change]:
    """Run a ``table_select`` query and build Changes: pk values are packed once per key, and
    site ordinals mapped to ids in Python (cheaper than a join per row). With ``cls`` (from
    ``sentinels``), the query has no cl column and the row's cl is looked up there."""
    npk = len(info.pks)
    name = info.name
    sites = dict(conn.execute("SELECT ordinal, site_id FROM crsql_site_id"))
    site_of = sites.get
    packed: dict[Any, bytes] = {}
    if npk == 1:
        packed_get = packed.get

        def pack_one(p: Any) -> bytes:
            pk = packed[p] = pack_pk((p,))
            return pk

        # One comprehension: the hot loop of every sync, ~8% faster than append in a for loop.
        # The pk value is the cache key: the lookaside's unique index holds no two values that
        # SQLite finds equal, and Python finds the same pairs equal (1 and 1.0 included).
        if cls is not None:
            cl_of = cls.get
            return [
                _new(Change, (name, packed_get(p) or pack_one(p), cid, val, cv, dbv,
                              site_of(site), cl_of(p, 1), seq))
                for p, cid, val, cv, dbv, site, seq in conn.execute(sql, bindings)
            ]  # fmt: skip
        return [
            _new(Change, (name, packed_get(p) or pack_one(p), cid, val, cv, dbv,
                          site_of(site), cl, seq))
            for p, cid, val, cv, dbv, site, cl, seq in conn.execute(sql, bindings)
        ]  # fmt: skip
    out: list[Change] = []
    append = out.append
    for row in conn.execute(sql, bindings):
        key = row[0]
        pk = packed.get(key)
        if pk is None:
            pk = packed[key] = pack_pk(row[1 : 1 + npk])
        if cls is None:
            cid, val, cv, dbv, site, cl, seq = row[1 + npk :]
        else:
            cid, val, cv, dbv, site, seq = row[1 + npk :]
            cl = cls.get(key, 1)
        append(_new(Change, (name, pk, cid, val, cv, dbv, site_of(site), cl, seq)))
    return out


def _table_pass(conn: apsw.Connection, info: TableInfo, top: int) -> list[tuple[Any, ...]]:
    """``(packed pk, cl, value of each non-pk column..., None)`` for every row of the lookaside,
    at the index of its clock key (``()`` where there is none; ``top``, the largest key, and no
    key below 0), by the joins ``from_clause`` makes per change (so the same affinity rules,
    and NULLs for a deleted row). The trailing None is a sentinel's value, selected as a NULL
    so that each entry is the row SQLite returns after its packed pk. A list, not a dict by key:
    indexing it is the cheaper of the two per change (with the walk's column names in a list
    too, ``changes_since`` of 100k changes is ~9% cheaper), and the pass is only taken when a
    read returns several changes per key (``_table_changes``), so it is never much longer than
    the read."""
    pk_vals = ", ".join(f"pk_tbl.{ident(c)}" for c in info.pk_names)
    values = "".join(f", base.{ident(c)}" for c in info.non_pk_names)
    base_join = ""
    if info.non_pks:
        on = " AND ".join(f"base.{ident(c)} = pk_tbl.{ident(c)}" for c in info.pk_names)
        base_join = f" LEFT JOIN {info.quoted} AS base ON {on}"
    sql = (
        f"SELECT pk_tbl.__crsql_key, {pk_vals}, COALESCE(t2.col_version, 1){values}, NULL "
        f"FROM {info.pks_table} AS pk_tbl LEFT JOIN {info.clock} AS t2 "
        f"ON t2.key = pk_tbl.__crsql_key AND t2.col_name = '{SENTINEL}'{base_join}"
    )
    end = 1 + len(info.pks)
    out: list[tuple[Any, ...]] = [()] * (top + 1)
    if end == 2:
        # a one-column pk holding a non-negative integer (the usual one) is packed inline,
        # pack_pk's own fast path without a call per row: a sixth of the pass
        one = ONE_INTEGER
        for row in conn.execute(sql):
            p = row[1]
            if type(p) is int and p >= 0:
                n = (p.bit_length() + 7) >> 3
                out[row[0]] = (one[n] + p.to_bytes(n, "big"),) + row[2:]
            else:
                out[row[0]] = (pack_pk((p,)),) + row[2:]
        return out
    for row in conn.execute(sql):
        out[row[0]] = (pack_pk(row[1:end]),) + row[end:]
    return out


def _position_expr(slots: dict[str, int], missing: int | None = None) -> str:
    """SQL giving each clock row's position in ``slots`` by its col_name (``missing``, else
    NULL, for a name not there): a binary search over the sorted names, with at most four
    compared in turn at its leaves. SQLite orders the names (BINARY collation: their UTF-8
    bytes) as Python orders str. An integer from the walk costs less than the col_name string
    Python would otherwise build, hash and look up for every change."""
    names = sorted(slots)

    def search(lo: int, hi: int) -> str:
        if hi - lo <= 4:
            whens = " ".join(f"WHEN {literal(c)} THEN {slots[c]}" for c in names[lo:hi])
            otherwise = "" if missing is None else f" ELSE {int(missing)}"
            return f"CASE t1.col_name {whens}{otherwise} END"
        mid = (lo + hi) // 2
        return (
            f"CASE WHEN t1.col_name < {literal(names[mid])} THEN {search(lo, mid)} "
            f"ELSE {search(mid, hi)} END"
        )

    return search(0, len(names))


def _rows_by_pass(
    conn: apsw.Connection,
    info: TableInfo,
    where: str,
    bindings: tuple[Any, ...],
    tail: str,
    top: int,
) -> list[Change]:
    """Changes from the clock rows alone (a walk of the db_version index), their pk, value and
    causal length taken from ``_table_pass``, in the order ``table_select`` gives. The cid is
    the column's name from the table's info, one string shared by every change of the column.
    Raises IndexError or KeyError for what the per-change joins would handle otherwise: a
    clock row without a lookaside row or a column the table lacks (past the end of, or an
    empty entry in, the lists the walk indexes), an ordinal crsql_site_id lacks, a key below 0
    (checked first: it would index a list from its end)."""
    name = info.name
    low = conn.execute(
        f"SELECT (SELECT min(__crsql_key) FROM {info.pks_table}), (SELECT min(key) FROM "
        f"{info.clock})"
    ).fetchone()
    if low is None or any(type(k) is int and k < 0 for k in low):
        raise KeyError("a negative key")
    rows = _table_pass(conn, info, top)
    slots = {c: 2 + i for i, c in enumerate(info.non_pk_names)}  # positions in a pass row
    slots.setdefault(SENTINEL, 2 + len(info.non_pks))  # its None: a sentinel has no value
    cids: list[str | None] = [None] * (2 + len(slots))  # position -> the cid
    for c, i in slots.items():
        cids[i] = c
    sites = dict(conn.execute("SELECT ordinal, site_id FROM crsql_site_id"))
    position = _position_expr(slots, missing=len(cids))  # a name not there: past the list
    sql = (
        f"SELECT t1.key, {position}, t1.col_version, t1.db_version, t1.site_id, "
        f"t1.seq FROM {info.clock} AS t1{where}{tail}"
    )
    return [
        _new(Change, (name, (r := rows[k])[0], cids[i], r[i], cv, dbv, sites[s], r[1], seq))
        for k, i, cv, dbv, s, seq in conn.execute(sql, bindings)
    ]


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
    AND site_id IS NOT ?``. Read in one transaction, so that its statements (a few per
    table) see the same database."""
    with gc_paused(), conn:
        out = _changes_since(conn, db_version, exclude_site, limit, tables)
    return out


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
    tail = " ORDER BY t1.db_version, t1.seq" + (f" LIMIT {int(limit)}" if limit is not None else "")
    for name in names:
        info = read_table_info(conn, name)
        out.extend(_table_changes(conn, info, where, bindings, limit, tail))
    if len(names) > 1:
        out.sort(key=_ORDER)
    if limit is not None:
        del out[limit:]
    return out


_ORDER = itemgetter(5, 8)  # (db_version, seq) of a Change


def _table_changes(
    conn: apsw.Connection,
    info: TableInfo,
    where: str,
    bindings: tuple[Any, ...],
    limit: int | None,
    tail: str,
) -> list[Change]:
    """One table's changes, read the way the read's size makes cheapest (same result)."""
    n = _count(conn, info, where, bindings, limit)
    keys = _table_keys(conn, info)
    if n and n >= keys * (PASS_PER_KEY + PASS_PER_COLUMN * len(info.non_pks)):
        try:
            return _rows_by_pass(conn, info, where, bindings, tail, keys)
        except (KeyError, IndexError):
            pass  # something only the joins handle: read with them
    cls = None
    if n * SCAN_FRACTION >= keys * max(1, len(info.non_pks)) > 0:
        cls = sentinels(conn, info)
    sql = table_select(info, where, with_cl=cls is None) + tail
    return _rows(conn, info, sql, bindings, cls)


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
