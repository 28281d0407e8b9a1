"""Ordered lists on CRRs: cr-sqlite 0.16.3's fractional indexing (``crsql_fract_*``).

A list's order lives in a text column of order keys: strings that sort (bytewise) in list order,
so that moving or inserting an item writes only that item's key and concurrent edits merge like
any other column. ``SELECT crsql_fract_as_ordered('t', 'pos', 'list_id', ...)`` prepares a CRR
for it:

* inserting ``pos = -1`` (``1``) into ``t`` prepends (appends) to the item's list, the list being
  the rows with the same grouping columns; updating ``pos`` to ``-1`` / ``1`` moves a row to the
  front / end;
* the view ``t_fractindex`` (the table's columns plus ``after_<pk>`` for each primary-key column)
  inserts after a given row (``INSERT INTO t_fractindex (..., after_id) VALUES (..., 3)``) and
  moves a row after another (``UPDATE t_fractindex SET after_id = 3 WHERE id = 5``); with no
  such row, it prepends.

Keys are generated exactly as cr-sqlite generates them (base-95 keys over printable ASCII with a
variable-length integer part, ``key_between``), so the same operations give the same keys on
either implementation. Two replicas appending concurrently can produce the same key; rows sharing a
key tie (order them by a primary key too), and inserting after one of them first moves it down
(``crsql_fract_fix_conflict_return_old_key``), as upstream does.

Deviations (docs/crdt-compatibility.md): a call with bad arguments changes nothing (upstream drops
the previous view and trigger first), the table must be a CRR and the order column neither a
primary-key nor a grouping column, re-running replaces the move trigger as well, the triggers
match rows by primary key rather than ``_rowid_`` (so WITHOUT ROWID tables work), and the
conflict fix works for composite primary keys (upstream's SQL for them does not parse).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import apsw

from .errors import CrdtError
from .sqlutil import ident, literal
from .tableinfo import is_crr, read_table_info, table_exists

# The base-95 digits, in byte order: every printable ASCII character.
DIGITS = "".join(chr(c) for c in range(32, 127))
_DIGIT = {d: i for i, d in enumerate(DIGITS)}
# An integer part is a head letter giving its length, then digits: "a" + 1 digit is the
# smallest non-negative integer, "A" + 26 digits the smallest of all (not itself a valid key).
INTEGER_ZERO = "a "
SMALLEST_INTEGER = "A" + " " * 26


class FractIndexError(CrdtError):
    """An order key or an argument of a ``crsql_fract_*`` function is invalid."""


# -- keys ------------------------------------------------------------------------------------


def _integer_length(head: str) -> int:
    if "a" <= head <= "z":
        return ord(head) - ord("a") + 2
    if "A" <= head <= "Z":
        return ord("Z") - ord(head) + 2
    raise FractIndexError("head is out of range")


def _integer_part(key: str) -> str:
    if not key:
        raise FractIndexError("order key is empty")
    n = _integer_length(key[0])
    if n > len(key):
        raise FractIndexError("integer part of key is too long")
    return key[:n]


def _validate_key(key: str) -> None:
    bad = next((ch for ch in key if ch not in _DIGIT), None)
    if bad is not None:
        raise FractIndexError(f"order key {key!r} has {bad!r}, not a printable ASCII character")
    if key == SMALLEST_INTEGER:
        raise FractIndexError("Key is too small")
    if key[len(_integer_part(key)) :].endswith(" "):
        raise FractIndexError("Fractional part should not end with ' ' (space)")


def _step_digits(digits: str, up: bool) -> tuple[str, bool]:
    """Add (or subtract) one to a base-95 digit string; return it and whether it overflowed."""
    out = list(digits)
    for i in range(len(out) - 1, -1, -1):
        d = _DIGIT[out[i]] + (1 if up else -1)
        if 0 <= d < len(DIGITS):
            out[i] = DIGITS[d]
            return "".join(out), False
        out[i] = DIGITS[0] if up else DIGITS[-1]
    return "".join(out), True


def _increment_integer(x: str) -> str | None:
    """The next integer part, None past the largest."""
    head, digits = x[0], x[1:]
    digits, carry = _step_digits(digits, up=True)
    if not carry:
        return head + digits
    if head == "Z":
        return INTEGER_ZERO
    if head == "z":
        return None
    new_head = chr(ord(head) + 1)
    # lowercase heads grow by a digit going up, uppercase ones shrink
    digits = digits + DIGITS[0] if new_head > "a" else digits[:-1]
    return new_head + digits


def _decrement_integer(x: str) -> str | None:
    """The previous integer part, None below the smallest."""
    head, digits = x[0], x[1:]
    digits, borrow = _step_digits(digits, up=False)
    if not borrow:
        return head + digits
    if head == "a":
        return "Z" + DIGITS[-1]
    if head == "A":
        return None
    new_head = chr(ord(head) - 1)
    digits = digits + DIGITS[-1] if new_head < "Z" else digits[:-1]
    return new_head + digits


def _midpoint(a: str, b: str | None) -> str:
    """A fraction strictly between fractions ``a`` and ``b`` (None: 1)."""
    if b is not None and a >= b:
        raise FractIndexError("midpoint - a must be before b")
    if a.endswith(" ") or (b is not None and b.endswith(" ")):
        raise FractIndexError("midpoint - a or b must not end with ' ' (space)")
    if b is not None:
        # a common prefix (a padded with the zero digit) is kept as it is
        n = 0
        while (a[n] if n < len(a) else DIGITS[0]) == b[n]:
            n += 1
        if n > 0:
            return b[:n] + _midpoint(a[n:], b[n:])
    low = _DIGIT[a[0]] if a else 0
    high = _DIGIT[b[0]] if b is not None else len(DIGITS)
    if high - low > 1:
        return DIGITS[(low + high + 1) // 2]  # halves round up
    if b is not None and len(b) > 1:
        return b[0]
    return DIGITS[low] + _midpoint(a[1:], None)


def key_between(a: str | None, b: str | None) -> str:
    """An order key sorting strictly between ``a`` and ``b`` (None: the start / the end), the same
    key cr-sqlite's ``crsql_fract_key_between`` returns."""
    if a is not None:
        _validate_key(a)
    if b is not None:
        _validate_key(b)
    if a is None and b is None:
        return INTEGER_ZERO
    if a is None:
        assert b is not None
        ib = _integer_part(b)
        if ib == SMALLEST_INTEGER:
            return ib + _midpoint("", b[len(ib) :])
        if ib < b:
            return ib
        lower = _decrement_integer(ib)
        if lower is None:
            raise FractIndexError("cannot decrement anymore")
        return lower
    ia = _integer_part(a)
    if b is None:
        higher = _increment_integer(ia)
        return higher if higher is not None else ia + _midpoint(a[len(ia) :], None)
    if a >= b:
        raise FractIndexError("key_between - a must be before b")
    ib = _integer_part(b)
    if ia == ib:
        return ia + _midpoint(a[len(ia) :], b[len(ib) :])
    higher = _increment_integer(ia)
    if higher is None:
        raise FractIndexError("Cannot increment anymore")
    return higher if higher < b else ia + _midpoint(a[len(ia) :], None)


def _key_arg(value: Any) -> str | None:
    """An SQL argument as an order key: text as is, blobs as their UTF-8 text, NULL as None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise FractIndexError("order key blob is not UTF-8 text") from None
    raise FractIndexError(f"order key must be text, not {type(value).__name__} {value!r}")


# -- crsql_fract_as_ordered --------------------------------------------------------------------


def _same_list(grouping: Sequence[str], src: str = "NEW") -> str:
    """Rows in the same list as ``src``: equal grouping columns (every row when there are none)."""
    return " AND ".join(f"{ident(g)} = {src}.{ident(g)}" for g in grouping) or "1"


def _by_pk(pks: Sequence[str], src: str, prefix: str = "") -> str:
    return " AND ".join(f"{ident(p)} = {src}.{ident(prefix + p)}" for p in pks)


def _end_key(table: str, order: str, grouping: Sequence[str], front: bool) -> str:
    """The key before the list's first key (``front``) or after its last, ignoring rows whose
    order is still -1 or 1."""
    t, o = ident(table), ident(order)
    rows = f"FROM {t} WHERE {_same_list(grouping)} AND {o} != -1 AND {o} != 1"
    if front:
        return f"crsql_fract_key_between(NULL, (SELECT MIN({o}) {rows}))"
    return f"crsql_fract_key_between((SELECT MAX({o}) {rows}), NULL)"


# Merges write with the sync bit set; the base-table triggers leave their writes alone, so a merged
# row keeps the value it had at its origin (our merge upserts whole rows, so without this an
# incoming '-1' that the origin kept would be rewritten here, untracked, and the replicas differ).
# (``crsql_internal_merging()`` reads the sync bit and cannot set it, so the agent lets clients'
# statements run it)
LOCAL = "crsql_internal_merging() = 0"


def _to_end_trigger(
    name: str,
    event: str,
    position: str,
    table: str,
    order: str,
    pks: Sequence[str],
    grouping: Sequence[str],
) -> str:
    """A trigger on ``table`` giving the row a key at the front of its list when ``position``
    is -1, at the end when it is 1."""
    t, o = ident(table), ident(order)
    return (
        f"CREATE TRIGGER {ident(name)} AFTER {event} ON {t} "
        f"WHEN ({position} = -1 OR {position} = 1) AND {LOCAL} BEGIN\n"
        f"  UPDATE {t} SET {o} = CASE {position}\n"
        f"    WHEN -1 THEN {_end_key(table, order, grouping, front=True)}\n"
        f"    WHEN 1 THEN {_end_key(table, order, grouping, front=False)} END\n"
        f"  WHERE {_by_pk(pks, 'NEW')};\nEND"
    )


def _base_triggers(
    table: str, order: str, pks: Sequence[str], grouping: Sequence[str]
) -> list[str]:
    """Insert with -1 / 1 (compared as integers, so a TEXT column's '-1' counts too) and update
    to -1 / 1 (compared as they are, as upstream: a TEXT column's '-1' does not move)."""
    names = _trigger_names(table)
    o = ident(order)
    return [
        _to_end_trigger(
            names[0], "INSERT", f"CAST(NEW.{o} AS INTEGER)", table, order, pks, grouping
        ),
        _to_end_trigger(names[1], f"UPDATE OF {o}", f"NEW.{o}", table, order, pks, grouping),
    ]


def _after_key(table: str, order: str, pks: Sequence[str], grouping: Sequence[str]) -> str:
    """The order key for a row placed after the row ``NEW.after_<pk>`` names: between that row's
    key and the next key of the list when the key is unique in the list; -1 (the front) when no
    list row has it; else the conflict fix moves that row down and returns a key below it."""
    t, o = ident(table), ident(order)
    after = f"(SELECT {o} FROM {t} WHERE {_by_pk(pks, 'NEW', 'after_')})"
    fix_args = ", ".join(
        [
            literal(table),
            literal(order),
            *(literal(g) for g in grouping),
            "-1",
            *(literal(p) for p in pks),
            *(f"NEW.{ident('after_' + p)}" for p in pks),
        ]
    )
    return (
        f"CASE (SELECT count(*) FROM {t} WHERE {_same_list(grouping)} AND {o} = {after})\n"
        f"    WHEN 1 THEN crsql_fract_key_between({after}, (SELECT {o} FROM {t} "
        f"WHERE {_same_list(grouping)} AND {o} > {after} ORDER BY {o} ASC LIMIT 1))\n"
        f"    WHEN 0 THEN -1\n"
        f"    ELSE crsql_fract_fix_conflict_return_old_key({fix_args}) END"
    )


def _view_sql(table: str, pks: Sequence[str]) -> list[str]:
    afters = ", ".join(f"NULL AS {ident('after_' + p)}" for p in pks)
    return [f"CREATE VIEW {ident(table + '_fractindex')} AS SELECT *, {afters} FROM {ident(table)}"]


def _view_triggers(
    table: str, order: str, columns: Sequence[str], pks: Sequence[str], grouping: Sequence[str]
) -> list[str]:
    t, o, view = ident(table), ident(order), ident(table + "_fractindex")
    others = [c for c in columns if c != order]
    key = _after_key(table, order, pks, grouping)
    insert = (
        f"CREATE TRIGGER {ident(table + '_fractindex_insert_trig')} INSTEAD OF INSERT ON {view} "
        f"BEGIN\n  INSERT INTO {t} ({', '.join(ident(c) for c in others)}, {o}) VALUES ("
        f"{', '.join('NEW.' + ident(c) for c in others)},\n    {key});\nEND"
    )
    sets = ", ".join(f"{ident(c)} = NEW.{ident(c)}" for c in others)
    update = (
        f"CREATE TRIGGER {ident(table + '_fractindex_update_trig')} INSTEAD OF UPDATE ON {view} "
        f"BEGIN\n  UPDATE {t} SET {sets},\n    {o} = {key}\n  WHERE {_by_pk(pks, 'NEW')};\nEND"
    )
    return [insert, update]


def _trigger_names(table: str) -> list[str]:
    """The base table's triggers: prepend/append on insert, move to either end on update."""
    return [f"__crsql_{table}_fractindex_pend_trig", f"__crsql_{table}_fractindex_ezmove"]


def as_ordered(conn: apsw.Connection, table: str, order: str, *grouping: str) -> None:
    """Make ``table`` (a CRR) an ordered list by its ``order`` column, one list per distinct
    value of the ``grouping`` columns. Idempotent; running it again with other columns replaces
    the triggers and the view. Nothing changes when an argument is wrong."""
    for what, value in (("table", table), ("order column", order)):
        if not isinstance(value, str):
            raise FractIndexError(f"crsql_fract_as_ordered: the {what} name must be text")
    if not all(isinstance(g, str) for g in grouping):
        raise FractIndexError("crsql_fract_as_ordered: grouping column names must be text")
    if not table_exists(conn, table):
        raise FractIndexError(f"crsql_fract_as_ordered: table {table!r} does not exist")
    if not is_crr(conn, table):
        raise FractIndexError(
            f"crsql_fract_as_ordered: table {table!r} is not a CRR; "
            f"run SELECT crsql_as_crr({literal(table)}) first"
        )
    columns = cast(
        "list[str]",
        [r[0] for r in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))],
    )
    for col in (order, *grouping):
        if col not in columns:
            raise FractIndexError(f"crsql_fract_as_ordered: table {table!r} has no column {col!r}")
    pks = read_table_info(conn, table).pk_names
    if order in pks:
        raise FractIndexError(
            f"crsql_fract_as_ordered: order column {order!r} is part of the primary key of "
            f"{table!r}; order by a column of its own"
        )
    if order in grouping or len(set(grouping)) != len(grouping):
        raise FractIndexError(
            "crsql_fract_as_ordered: each column may appear once, and the order column is not "
            "a grouping column"
        )
    with conn:  # SAVEPOINT: all or nothing
        remove_ordering(conn, table)
        for sql in _ordering_sql(conn, table, order, grouping):
            conn.execute(sql)


def _ordering_sql(
    conn: apsw.Connection, table: str, order: str, grouping: Sequence[str]
) -> list[str]:
    """What ``as_ordered`` creates, in creation order (the arguments already checked)."""
    columns = cast(
        "list[str]",
        [r[0] for r in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))],
    )
    pks = read_table_info(conn, table).pk_names
    # Creation order matters: SQLite fires a table's triggers newest first, and the insert
    # trigger firing before or after the CRR's decides the clocks' seqs.
    return [
        *_base_triggers(table, order, pks, grouping),
        *_view_sql(table, pks),
        *_view_triggers(table, order, columns, pks, grouping),
    ]


def _ordering_objects(conn: apsw.Connection, table: str) -> list[str]:
    """The SQL of ``table``'s ordering triggers and view as stored, in ``_ordering_sql``'s
    order (empty when the table is not ordered)."""
    view = table + "_fractindex"
    names = [*_trigger_names(table), view, view + "_insert_trig", view + "_update_trig"]
    rows = dict(
        cast(
            "list[tuple[str, str]]",
            conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type IN ('trigger', 'view') "
                f"AND name IN ({', '.join('?' * len(names))})",
                names,
            ).fetchall(),
        )
    )
    return [rows[n] for n in names if n in rows]


def is_ordered(conn: apsw.Connection, table: str) -> bool:
    """Whether ``crsql_fract_as_ordered`` made ``table`` an ordered list."""
    return bool(_ordering_objects(conn, table))


def is_ordered_as(conn: apsw.Connection, table: str, order: str, *grouping: str) -> bool:
    """Whether ``table`` is an ordered list by ``order`` and ``grouping`` exactly as
    ``as_ordered`` would make it now (false after its columns changed, say), so that a schema
    applied twice does nothing the second time."""
    return _ordering_objects(conn, table) == _ordering_sql(conn, table, order, grouping)


def remove_ordering(conn: apsw.Connection, table: str) -> None:
    """Drop ``table``'s ordering triggers and view; its rows and order keys stay."""
    with conn:
        for name in _trigger_names(table):
            conn.execute(f"DROP TRIGGER IF EXISTS {ident(name)}")
        conn.execute(f"DROP VIEW IF EXISTS {ident(table + '_fractindex')}")  # and its triggers


def _fix_conflict(conn: apsw.Connection, *args: Any) -> str:
    """``crsql_fract_fix_conflict_return_old_key(table, order, grouping..., -1, pk names...,
    pk values...)``: the row to insert after shares its key with another row of its list; move
    it just below its old key and return a key between its new and old keys."""
    if len(args) < 4:
        raise FractIndexError("Too few arguments to crsql_fract_fix_conflict_return_old_key")
    table, order = args[0], args[1]
    sep = next((i for i in range(2, len(args)) if isinstance(args[i], int)), len(args))
    grouping, rest = args[2:sep], args[sep + 1 :]
    if not rest or len(rest) % 2:
        raise FractIndexError(
            "Incorrect number of primary keys and values provided. Must have at least 1 "
            "primary key."
        )
    pk_names, pk_values = rest[: len(rest) // 2], list(rest[len(rest) // 2 :])
    if not all(isinstance(n, str) for n in (table, order, *grouping, *pk_names)):
        raise FractIndexError("crsql_fract_fix_conflict_return_old_key: names must be text")
    t, o = ident(table), ident(order)
    where = " AND ".join(f"{ident(p)} = ?" for p in pk_names)
    row = conn.execute(f"SELECT {o} FROM {t} WHERE {where}", pk_values).fetchone()
    if row is None:
        raise FractIndexError(
            f"crsql_fract_fix_conflict_return_old_key: no row of {table!r} with that primary key"
        )
    target = row[0]
    if grouping:
        on = " AND ".join(f"{t}.{ident(g)} = __crsql_list.{ident(g)}" for g in grouping)
        lists = ", ".join(ident(g) for g in grouping)
        source = f"{t} JOIN (SELECT {lists} FROM {t} WHERE {where}) AS __crsql_list ON {on}"
        params = [*pk_values, target]
    else:
        source, params = t, [target]
    below = conn.execute(
        f"SELECT {t}.{o} FROM {source} WHERE {t}.{o} < ? ORDER BY {t}.{o} DESC LIMIT 1", params
    ).fetchone()
    target_key = _key_arg(target)
    moved = key_between(_key_arg(below[0]) if below else None, target_key)
    conn.execute(f"UPDATE {t} SET {o} = ? WHERE {where}", [moved, *pk_values])
    return key_between(moved, target_key)


def register(conn: apsw.Connection) -> None:
    """Register the ``crsql_fract_*`` functions on ``conn`` (``crdt.connect`` does)."""
    # apsw's stubs type a scalar function as taking *args only; fixed arities are valid
    f: Callable[..., None] = conn.create_scalar_function

    def as_ordered_sql(*args: Any) -> None:
        if len(args) < 2:
            raise FractIndexError(
                "Must provide at least 2 arguments -- the table name and the column to order by"
            )
        as_ordered(conn, *args)

    f("crsql_fract_as_ordered", as_ordered_sql, -1, flags=apsw.SQLITE_DIRECTONLY)
    f(
        "crsql_fract_key_between",
        lambda a, b: key_between(_key_arg(a), _key_arg(b)),
        2,
        deterministic=True,
        flags=apsw.SQLITE_INNOCUOUS,
    )
    f(
        "crsql_fract_fix_conflict_return_old_key",
        lambda *args: _fix_conflict(conn, *args),
        -1,
        flags=apsw.SQLITE_INNOCUOUS,
    )
