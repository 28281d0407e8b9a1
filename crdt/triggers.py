"""The triggers that record local writes in the clock tables.

cr-sqlite's triggers call into C (``crsql_after_insert`` ...), which then runs the clock statements.
Ours are the clock statements themselves, written in SQL, so a local write costs no Python beyond
the small state functions (``crsql_next_db_version()``, ``crsql_increment_and_get_seq()``,
``crsql_internal_sync_bit()``). The statements are the ones cr-sqlite runs, in the same order, so
that seqs and versions come out identical.

Why the version and seq stay in Python: a call costs ~0.15 us, and keeping them in a table that
every row reads and writes instead costs as much (on the 100k-row bench, inserts 5% slower and
single-column updates 5% faster, before anything empties the table when a transaction ends,
which SQLite offers no hook for: a commit hook may not run SQL). What a local write costs
is the B-tree writes (lookaside row and index entry, one clock row and one version-index entry
per column) and running each trigger's sub-program, whose frame SQLite sets up per row.

INSERT (``after_insert``)
    pk-only table: create or revive the sentinel (cl 1, or the next odd cl).
    Otherwise: if the pk tuple was seen before (re-insert after delete, INSERT OR REPLACE), take
    one seq and bump an existing sentinel to the next odd cl (the seq is taken even when there is
    no sentinel); then every non-pk column gets col_version 1, or +1 if it has a clock.
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


# Every statement below is conflict-free (UPDATE what exists, INSERT ... WHERE NOT EXISTS), never
# an upsert or OR IGNORE: inside a trigger, SQLite replaces a body statement's conflict policy with
# the outer statement's (an ``INSERT OR REPLACE INTO t`` would turn the lookaside's OR IGNORE into
# REPLACE and mint a new key), so the triggers must not depend on one.


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


def _create_record(info: TableInfo, src: str, where: str = "") -> list[str]:
    """mark_locally_created: sentinel cl 1, or bump to the next odd cl."""
    return _sentinel_upsert(info, src, where, 1, _NEXT_ODD)


def _delete_record(info: TableInfo, src: str, where: str = "") -> list[str]:
    """mark_locally_deleted: sentinel cl 2, or +1 (no parity check, as upstream)."""
    return _sentinel_upsert(info, src, where, 2, "col_version + 1")


def _seq_by_position(info: TableInfo) -> tuple[str, str]:
    """SQL for 'this column's position among the non-pk columns', by name and as VALUES rows."""
    pos = (
        "CASE col_name "
        + " ".join(f"WHEN {literal(c.name)} THEN {i}" for i, c in enumerate(info.non_pks))
        + " END"
    )
    values = ", ".join(f"({literal(c.name)}, {i})" for i, c in enumerate(info.non_pks))
    return pos, values


GUARD = "crsql_internal_local_write()"


def _exists_key(info: TableInfo, src: str) -> str:
    return f"EXISTS (SELECT 1 FROM {info.pks_table} WHERE {_match(info, src)})"


def insert_triggers(info: TableInfo) -> list[str]:
    """Two triggers, split on whether the pk tuple was seen before. The re-insert trigger is
    created last so that it fires first (SQLite fires a table's triggers newest first): were the
    fresh-insert trigger first, the key it creates would make the re-insert trigger fire too."""
    fresh: list[str] = [
        f"INSERT INTO {info.pks_table} ({idents(info.pk_names)}) "
        f"VALUES ({', '.join('NEW.' + ident(c) for c in info.pk_names)});"
    ]
    again: list[str] = []
    if not info.non_pks:
        fresh.append(
            f"INSERT INTO {info.clock} {CLOCK_COLS} "
            f"VALUES (last_insert_rowid(), {S}, 1, {NDV}, {SEQ}, 0);"
        )
        again.extend(_create_record(info, "NEW"))
    else:
        rows = ", ".join(
            f"(last_insert_rowid(), {literal(c.name)}, 1, {NDV}, {SEQ}, 0)" for c in info.non_pks
        )
        fresh.append(f"INSERT INTO {info.clock} {CLOCK_COLS} VALUES {rows};")
        # A known pk: one seq for the create record, taken even if there is no sentinel to bump.
        again.append(f"SELECT {SEQ};")
        again.append(
            f"UPDATE {info.clock} SET col_version = {_NEXT_ODD}, db_version = {NDV}, "
            f"seq = crsql_get_seq() - 1, site_id = 0 "
            f"WHERE key = {_key_of(info, 'NEW')} AND col_name = {S};"
        )
        # Every non-pk column is written, column i taking seq (current + i): set-based statements
        # for existing and new clocks give the same seqs as upstream's column-by-column loop.
        pos, values = _seq_by_position(info)
        names = ", ".join(literal(c.name) for c in info.non_pks)
        again.append(
            f"UPDATE {info.clock} SET col_version = col_version + 1, db_version = {NDV}, "
            f"seq = crsql_get_seq() + {pos}, site_id = 0 "
            f"WHERE key = {_key_of(info, 'NEW')} AND col_name IN ({names});"
        )
        again.append(
            f"INSERT INTO {info.clock} {CLOCK_COLS} "
            f"SELECT k.__crsql_key, c.column1, 1, {NDV}, crsql_get_seq() + c.column2, 0 "
            f"FROM {info.pks_table} AS k, (VALUES {values}) AS c "
            f"WHERE {_match(info, 'NEW', 'k')} AND NOT EXISTS (SELECT 1 FROM {info.clock} AS x "
            "WHERE x.key = k.__crsql_key AND x.col_name = c.column1);"
        )
        again.append(f"SELECT crsql_internal_advance_seq({len(info.non_pks)});")
    return [
        _trigger(info, "itrig", "INSERT", fresh, f"NOT {_exists_key(info, 'NEW')}"),
        # The guard only for a known pk: a fresh insert then calls it once, in itrig. (A CASE,
        # since SQLite may evaluate ``EXISTS (...) AND f()`` right side first.)
        _trigger(
            info,
            "itrig_again",
            "INSERT",
            again,
            guard=f"CASE WHEN {_exists_key(info, 'NEW')} THEN {GUARD} ELSE 0 END = 1",
        ),
    ]


def update_triggers(info: TableInfo) -> list[str]:
    """One ``UPDATE OF <column>`` trigger per non-pk column, created in reverse column order so
    that they fire in column order (seqs follow columns, as upstream), and the pk trigger created
    last so that a pk change moves the clocks before the columns are bumped at the new key.

    Each trigger's guard stamps the pending db_version, so an UPDATE that changes nothing still
    advances it, as upstream. A column whose value did not change gets no clock write."""
    out: list[str] = []
    # The key's lookup only when the UPDATE found no clock: the CASE gives NULL otherwise, and
    # SQLite skips an index seek on NULL (``changes() = 0`` as a WHERE term would be tested after
    # the seek, a lookup wasted on every update). The CASE drops NEW's affinity, as ``+`` does.
    first, *rest = info.pks
    no_clock = _and(
        f"k.{ident(first.name)} = CASE WHEN changes() = 0 THEN NEW.{ident(first.name)} END",
        *(f"k.{ident(c.name)} = +NEW.{ident(c.name)}" for c in rest),
    )
    for c in reversed(info.non_pks):
        name = literal(c.name)
        changed = _changed(c.name)
        body = [
            f"UPDATE {info.clock} SET col_version = col_version + 1, db_version = {NDV}, "
            f"seq = {SEQ}, site_id = 0 "
            f"WHERE key = {_key_of(info, 'NEW')} AND col_name = {name} AND {changed};",
            # no clock yet (a column added by ALTER and never written): start one
            f"INSERT INTO {info.clock} {CLOCK_COLS} "
            f"SELECT k.__crsql_key, {name}, 1, {NDV}, {SEQ}, 0 FROM {info.pks_table} AS k "
            f"WHERE {changed} AND {no_clock};",
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
    when: str = "",
    of: list[str] | None = None,
    guard: str = f"{GUARD} = 1",
) -> str:
    name = ident(f"{info.name}__crsql_{suffix}")
    stmts = "\n  ".join(body)
    event_sql = f"{event} OF {idents(of)}" if of else event
    cond = _and(guard, when)
    return (
        f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event_sql} ON {info.quoted} "
        f"WHEN {cond} BEGIN\n  {stmts}\nEND"
    )


def create_triggers_sql(info: TableInfo) -> list[str]:
    """In creation order, which matters: see insert_triggers and update_triggers."""
    return [*insert_triggers(info), *update_triggers(info), delete_trigger(info)]


TRIGGER_INFIX = "__crsql_"  # every trigger crdt creates has it: <table>__crsql_* or __crsql_*


def trigger_prefix(table: str) -> str:
    return f"{table}{TRIGGER_INFIX}"
