"""The triggers that record local writes in the clock tables.

cr-sqlite's triggers call into C (``crsql_after_insert`` ...), which then runs the clock statements.
Ours are the clock statements themselves, written in SQL, so a local write costs no Python beyond
the small state functions (``crsql_next_db_version()``, ``crsql_internal_take_seqs(n)``,
``crsql_internal_local_write()``). The statements write what cr-sqlite writes, so that seqs and
versions come out identical.

Why the version and seq stay in Python: a call costs ~0.15 us, and keeping them in a table that
every row reads and writes instead costs as much (on the 100k-row bench, inserts 5% slower and
single-column updates 5% faster, before anything empties the table when a transaction ends,
which SQLite offers no hook for: a commit hook may not run SQL). What a local write costs
is the B-tree writes (lookaside row and index entry, one clock row and one version-index entry
per column) and running each trigger's sub-program, whose frame SQLite sets up per row; every
write statement in a body costs its cursors even when its WHERE is false (~7k instructions in
callgrind, as much as a call), so the insert's body has as few as its two paths allow.

INSERT (``after_insert``)
    pk-only table: create or revive the sentinel (cl 1, or the next odd cl).
    Otherwise: if the pk tuple was seen before (re-insert after delete, INSERT OR REPLACE), take
    one seq and bump an existing sentinel to the next odd cl (the seq is taken even when there is
    no sentinel); then every non-pk column gets col_version 1, or +1 if it has a clock. A row's
    column clocks take consecutive seqs from one ``crsql_internal_take_seqs(n)`` call.
UPDATE (``after_update``)
    Always advance the pending db_version (so a no-op UPDATE still moves it, as upstream).
    If any pk value changed: the old key gets a delete record (cl +1, or 2), its column clocks move
    to the new key, the new key gets a create record. **Deviation:** upstream moves the clocks with
    their old db_version/seq/site, so a peer that already synced past those versions never learns
    the values under the new key (a convergence hole); we re-stamp moved clocks with this
    transaction's db_version, a fresh seq and the local site.
    Then each non-pk column whose value changed (cr-sqlite's type-sensitive comparison: storage
    class and bytes) gets col_version + 1.
DELETE (``after_delete``)
    The sentinel becomes cl 2 (or +1), and the row's column clocks are dropped.

All triggers are ``WHEN crsql_internal_local_write() = 1``, which is 0 while the sync bit is
set: merges set the bit around their writes.

Lookaside matches use ``pk = +NEW.pk``: the unary ``+`` strips the NEW value's affinity, so the
comparison against the untyped lookaside column keeps using its index (without it every write
scans the lookaside table and inserts become quadratic).
"""

from __future__ import annotations

from .sqlutil import ident, idents, literal
from .tableinfo import SENTINEL, TableInfo

S = literal(SENTINEL)
NDV = "crsql_next_db_version()"
SEQ = "crsql_increment_and_get_seq()"
CLOCK_COLS = "(key, col_name, col_version, db_version, seq, site_id)"


def _match(info: TableInfo, src: str, alias: str = "") -> str:
    prefix = alias + "." if alias else ""
    return " AND ".join(f"{prefix}{ident(c.name)} = +{src}.{ident(c.name)}" for c in info.pks)


def _key_of(info: TableInfo, src: str) -> str:
    return f"(SELECT __crsql_key FROM {info.pks_table} WHERE {_match(info, src)})"


def _and(*conds: str) -> str:
    return " AND ".join(c for c in conds if c)


def _changed(col: str) -> str:
    """cr-sqlite's ``compare != 0``: a different storage class, or different bytes."""
    c = ident(col)
    return f"(NEW.{c} IS NOT OLD.{c} COLLATE BINARY OR typeof(NEW.{c}) IS NOT typeof(OLD.{c}))"


# No statement below has an OR clause: inside a trigger, SQLite replaces a body statement's
# conflict policy with the outer statement's (an ``INSERT OR REPLACE INTO t`` would turn the
# lookaside's OR IGNORE into REPLACE and mint a new key). An upsert's ``ON CONFLICT`` keeps its
# own resolution for its target whatever the outer statement says (the insert trigger's two).


def _ensure_key(info: TableInfo, src: str, where: str = "") -> str:
    cols = idents(info.pk_names)
    vals = ", ".join(f"{src}.{ident(c)}" for c in info.pk_names)
    missing = f"NOT EXISTS (SELECT 1 FROM {info.pks_table} WHERE {_match(info, src)})"
    return f"INSERT INTO {info.pks_table} ({cols}) SELECT {vals} WHERE {_and(where, missing)};"


def _sentinel_upsert(info: TableInfo, src: str, where: str, initial: int, bump: str) -> list[str]:
    """Set the sentinel of ``src``'s key: ``bump`` it if it exists, else create it at ``initial``.
    Exactly one of the two statements writes, so exactly one seq is taken."""
    return [
        f"UPDATE {info.clock} SET col_version = {bump}, db_version = {NDV}, seq = {SEQ}, "
        f"site_id = 0 WHERE {_and('key = ' + _key_of(info, src), 'col_name = ' + S, where)};",
        f"INSERT INTO {info.clock} {CLOCK_COLS} SELECT k.__crsql_key, {S}, {initial}, {NDV}, "
        f"{SEQ}, 0 FROM {info.pks_table} AS k WHERE "
        + _and(
            _match(info, src, "k"),
            where,
            f"NOT EXISTS (SELECT 1 FROM {info.clock} AS c "
            f"WHERE c.key = k.__crsql_key AND c.col_name = {S})",
        )
        + ";",
    ]


_NEXT_ODD = "CASE col_version % 2 WHEN 0 THEN col_version + 1 ELSE col_version + 2 END"


def _create_record(info: TableInfo, src: str, where: str) -> list[str]:
    """mark_locally_created: sentinel cl 1, or bump to the next odd cl."""
    return _sentinel_upsert(info, src, where, 1, _NEXT_ODD)


def _delete_record(info: TableInfo, src: str, where: str = "") -> list[str]:
    """mark_locally_deleted: sentinel cl 2, or +1 (no parity check, as upstream)."""
    return _sentinel_upsert(info, src, where, 2, "col_version + 1")


GUARD = "crsql_internal_local_write()"


def _match_when(info: TableInfo, cond: str, alias: str) -> str:
    """``alias``'s pk equals NEW's, but only when ``cond`` holds: the first pk column is compared
    with a CASE that gives NULL otherwise, and SQLite skips an index seek on NULL (a ``cond``
    WHERE term would be tested after the seek, a lookup wasted on every row). The CASE drops
    NEW's affinity, as ``+`` does."""
    first, *rest = info.pks
    return _and(
        f"{alias}.{ident(first.name)} = CASE WHEN {cond} THEN NEW.{ident(first.name)} END",
        *(f"{alias}.{ident(c.name)} = +NEW.{ident(c.name)}" for c in rest),
    )


def _take_seqs(n: int) -> str:
    """The first of ``n`` consecutive seqs taken for one row: an uncorrelated scalar subquery, so
    SQLite calls it once per run of the statement, however many clock rows use it."""
    return f"(SELECT crsql_internal_take_seqs({n}))"


def _positions(names: list[str], first: int = 0) -> str:
    return ", ".join(f"({literal(n)}, {i})" for i, n in enumerate(names, first))


def insert_triggers(info: TableInfo) -> list[str]:
    """One trigger (each trigger a table has costs every row a sub-program frame). Its key insert
    is also the test of whether the pk was seen before: ``ON CONFLICT DO NOTHING`` leaves a known
    key alone, and ``changes()`` then reads 1 for a new pk, 0 for a known one. (An upsert keeps its
    own policy under an outer ``INSERT OR REPLACE``; an ``OR IGNORE`` would turn into REPLACE.)

    A new pk: every non-pk column gets a clock at col_version 1 (a pk-only table: the sentinel at
    cl 1), column i taking the i-th of the row's seqs. A known pk (re-insert after delete, INSERT
    OR REPLACE): one seq for the create record, taken even if there is no sentinel to bump, then
    every non-pk column gets col_version 1, or +1 if it has a clock; after that upsert
    ``changes()`` is the number of columns, which gates the sentinel's bump. Both paths' lookups
    are gated on ``changes()``, so a new pk costs them no index seek."""
    cols, vals = idents(info.pk_names), ", ".join(f"NEW.{ident(c)}" for c in info.pk_names)
    names = [c.name for c in info.non_pks] or [SENTINEL]
    body = [
        f"INSERT INTO {info.pks_table} ({cols}) VALUES ({vals}) ON CONFLICT DO NOTHING;",
        f"INSERT INTO {info.clock} {CLOCK_COLS} "
        f"SELECT last_insert_rowid(), c.column1, 1, (SELECT {NDV}), "
        f"{_take_seqs(len(names))} + c.column2, 0 "
        f"FROM (VALUES {_positions(names)}) AS c WHERE changes() = 1;",
    ]
    upsert = (
        "ON CONFLICT (key, col_name) DO UPDATE SET col_version = {bump}, "
        "db_version = excluded.db_version, seq = excluded.seq, site_id = 0;"
    )
    again = _match_when(info, "changes() = 0", "k")
    if not info.non_pks:
        body.append(
            f"INSERT INTO {info.clock} {CLOCK_COLS} "
            f"SELECT k.__crsql_key, {S}, 1, (SELECT {NDV}), {_take_seqs(1)}, 0 "
            f"FROM {info.pks_table} AS k WHERE {again} " + upsert.format(bump=_NEXT_ODD)
        )
    else:
        n = len(names)
        body.append(
            f"INSERT INTO {info.clock} {CLOCK_COLS} "
            f"SELECT k.__crsql_key, c.column1, 1, (SELECT {NDV}), {_take_seqs(n + 1)} + c.column2, "
            f"0 FROM {info.pks_table} AS k, (VALUES {_positions(names, 1)}) AS c WHERE {again} "
            + upsert.format(bump="col_version + 1")
        )
        body.append(
            f"UPDATE {info.clock} SET col_version = {_NEXT_ODD}, db_version = {NDV}, "
            f"seq = crsql_get_seq() - {n + 1}, site_id = 0 WHERE key = (SELECT __crsql_key "
            f"FROM {info.pks_table} AS k WHERE {_match_when(info, f'changes() = {n}', 'k')}) "
            f"AND col_name = {S};"
        )
    return [_trigger(info, "itrig", "INSERT", body)]


def update_triggers(info: TableInfo) -> list[str]:
    """One ``UPDATE OF <column>`` trigger per non-pk column, created in reverse column order so
    that they fire in column order (seqs follow columns, as upstream), and the pk trigger created
    last so that a pk change moves the clocks before the columns are bumped at the new key.

    Each trigger's guard stamps the pending db_version, so an UPDATE that changes nothing still
    advances it, as upstream. A column whose value did not change gets no clock write."""
    out: list[str] = []
    for c in reversed(info.non_pks):
        # one upsert: bump the column's clock, or start one (a column added by ALTER and never
        # written); one statement is cheaper than an UPDATE and a guarded INSERT (~4 % a row)
        body = [
            f"INSERT INTO {info.clock} {CLOCK_COLS} "
            f"SELECT k.__crsql_key, {literal(c.name)}, 1, {NDV}, {SEQ}, 0 "
            f"FROM {info.pks_table} AS k WHERE {_match(info, 'NEW', 'k')} AND {_changed(c.name)} "
            "ON CONFLICT (key, col_name) DO UPDATE SET col_version = col_version + 1, "
            "db_version = excluded.db_version, seq = excluded.seq, site_id = 0;"
        ]
        out.append(_trigger(info, f"utrig_{c.name}", "UPDATE", body, of=[c.name]))
    pk_changed = "(" + " OR ".join(_changed(c.name) for c in info.pks) + ")"
    body = [_ensure_key(info, "NEW", pk_changed), _ensure_key(info, "OLD", pk_changed)]
    body.extend(_delete_record(info, "OLD", pk_changed))
    # Move the column clocks to the new key, re-stamped (the convergence fix, see above). If the
    # new key still has column clocks (a live row replaced by UPDATE OR REPLACE without
    # recursive triggers: its delete was never recorded), the row now there is a local write
    # over them: moved clocks must outrank them, and the new key's other clocks are re-stamped
    # as local writes of the values now in the row. Otherwise peers holding the replaced row's
    # clocks would keep its values.
    new_key, old_key = _key_of(info, "NEW"), _key_of(info, "OLD")
    # The target is named in full, not aliased: SQLite 3.40 and older reject ``UPDATE t AS m`` in
    # a trigger body, and a schema it cannot parse makes the whole file unreadable to it.
    moved = f"{info.clock}.col_name"
    body.append(
        f"UPDATE {info.clock} SET col_version = col_version + 1 + "
        f"(SELECT e.col_version FROM {info.clock} AS e "
        f"WHERE e.key = {new_key} AND e.col_name = {moved}) "
        f"WHERE key = {old_key} AND col_name != {S} AND {pk_changed} AND EXISTS "
        f"(SELECT 1 FROM {info.clock} AS e WHERE e.key = {new_key} AND e.col_name = {moved});"
    )
    body.append(
        f"UPDATE {info.clock} SET col_version = col_version + 1, db_version = {NDV}, "
        f"seq = {SEQ}, site_id = 0 WHERE key = {new_key} AND col_name != {S} AND {pk_changed} "
        f"AND col_name NOT IN (SELECT col_name FROM {info.clock} WHERE key = {old_key});"
    )
    body.append(
        f"DELETE FROM {info.clock} WHERE key = {_key_of(info, 'NEW')} AND col_name != {S} "
        f"AND col_name IN (SELECT col_name FROM {info.clock} WHERE key = {_key_of(info, 'OLD')}) "
        f"AND {pk_changed};"
    )
    body.append(
        f"UPDATE {info.clock} SET key = {_key_of(info, 'NEW')}, "
        f"db_version = {NDV}, seq = {SEQ}, site_id = 0 "
        f"WHERE key = {_key_of(info, 'OLD')} AND col_name != {S} AND {pk_changed};"
    )
    body.extend(_create_record(info, "NEW", pk_changed))
    out.append(_trigger(info, "utrig", "UPDATE", body, of=list(info.pk_names)))
    return out


def delete_trigger(info: TableInfo) -> str:
    body = [_ensure_key(info, "OLD"), *_delete_record(info, "OLD")]
    body.append(f"DELETE FROM {info.clock} WHERE key = {_key_of(info, 'OLD')} AND col_name != {S};")
    return _trigger(info, "dtrig", "DELETE", body)


def _trigger(
    info: TableInfo,
    suffix: str,
    event: str,
    body: list[str],
    of: list[str] | None = None,
) -> str:
    name = ident(f"{info.name}__crsql_{suffix}")
    stmts = "\n  ".join(body)
    event_sql = f"{event} OF {idents(of)}" if of else event
    return (
        f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event_sql} ON {info.quoted} "
        f"WHEN {GUARD} = 1 BEGIN\n  {stmts}\nEND"
    )


def create_triggers_sql(info: TableInfo) -> list[str]:
    """In creation order, which matters: see insert_triggers and update_triggers."""
    return [*insert_triggers(info), *update_triggers(info), delete_trigger(info)]


TRIGGER_INFIX = "__crsql_"  # every trigger crdt creates has it: <table>__crsql_* or __crsql_*


def trigger_prefix(table: str) -> str:
    return f"{table}{TRIGGER_INFIX}"
