"""The triggers that record local writes in the clock tables.

cr-sqlite's triggers call into C (``crsql_after_insert`` ...), which then runs the clock statements.
Ours are the clock statements themselves, written in SQL, so a local write costs no Python beyond
the small state functions (``crsql_next_db_version()``, ``crsql_increment_and_get_seq()``,
``crsql_internal_sync_bit()``). The statements are the ones cr-sqlite runs, in the same order, so
that seqs and versions come out identical:

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

All triggers are ``WHEN crsql_internal_sync_bit() = 0``: merges set the bit around their writes.

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


def _match(info: TableInfo, src: str, alias: str = "") -> str:
    prefix = alias + "." if alias else ""
    return " AND ".join(f"{prefix}{ident(c.name)} = +{src}.{ident(c.name)}" for c in info.pks)


def _key_of(info: TableInfo, src: str) -> str:
    return f"(SELECT __crsql_key FROM {info.pks_table} WHERE {_match(info, src)})"


def _changed(col: str) -> str:
    """cr-sqlite's ``compare != 0``: a different storage class, or different bytes."""
    c = ident(col)
    return f"(NEW.{c} IS NOT OLD.{c} COLLATE BINARY OR typeof(NEW.{c}) IS NOT typeof(OLD.{c}))"


def _create_record(info: TableInfo, src: str, extra_where: str = "") -> str:
    """mark_locally_created: sentinel cl 1, or bump to the next odd cl."""
    where = _match(info, src)
    if extra_where:
        where += " AND " + extra_where
    return (
        f"INSERT INTO {info.clock} (key, col_name, col_version, db_version, seq, site_id) "
        f"SELECT __crsql_key, {S}, 1, {NDV}, {SEQ}, 0 FROM {info.pks_table} WHERE {where} "
        "ON CONFLICT DO UPDATE SET "
        "col_version = CASE col_version % 2 WHEN 0 THEN col_version + 1 ELSE col_version + 2 END, "
        "db_version = excluded.db_version, seq = excluded.seq, site_id = 0;"
    )


def _delete_record(info: TableInfo, src: str, extra_where: str = "") -> str:
    """mark_locally_deleted: sentinel cl 2, or +1 (no parity check, as upstream)."""
    where = _match(info, src)
    if extra_where:
        where += " AND " + extra_where
    return (
        f"INSERT INTO {info.clock} (key, col_name, col_version, db_version, seq, site_id) "
        f"SELECT __crsql_key, {S}, 2, {NDV}, {SEQ}, 0 FROM {info.pks_table} WHERE {where} "
        "ON CONFLICT DO UPDATE SET col_version = col_version + 1, "
        "db_version = excluded.db_version, seq = excluded.seq, site_id = 0;"
    )


def _column_clocks(info: TableInfo, names_sql: str) -> str:
    """mark_locally_updated for each column produced by ``names_sql`` (in its order)."""
    return (
        f"INSERT INTO {info.clock} (key, col_name, col_version, db_version, seq, site_id) "
        f"SELECT k.__crsql_key, c.name, 1, {NDV}, {SEQ}, 0 "
        f"FROM {info.pks_table} AS k, ({names_sql}) AS c WHERE {_match(info, 'NEW', 'k')} "
        "ON CONFLICT DO UPDATE SET col_version = col_version + 1, "
        "db_version = excluded.db_version, seq = excluded.seq, site_id = 0;"
    )


def _ensure_key(info: TableInfo, src: str, where: str = "") -> str:
    cols = idents(info.pk_names)
    vals = ", ".join(f"{src}.{ident(c)}" for c in info.pk_names)
    tail = f" WHERE {where}" if where else ""
    return f"INSERT OR IGNORE INTO {info.pks_table} ({cols}) SELECT {vals}{tail};"


def insert_trigger(info: TableInfo) -> str:
    body = []
    if not info.non_pks:
        body.append(_ensure_key(info, "NEW"))
        body.append(_create_record(info, "NEW"))
    else:
        # Re-insert of a known pk: one seq, taken even if there is no sentinel to bump.
        body.append(f"SELECT {SEQ} FROM {info.pks_table} WHERE {_match(info, 'NEW')};")
        body.append(
            f"UPDATE {info.clock} SET "
            "col_version = CASE col_version % 2 WHEN 0 THEN col_version + 1 "
            "ELSE col_version + 2 END, "
            f"db_version = {NDV}, seq = crsql_get_seq() - 1, site_id = 0 "
            f"WHERE key = {_key_of(info, 'NEW')} AND col_name = {S};"
        )
        body.append(_ensure_key(info, "NEW"))
        names = " UNION ALL ".join(f"SELECT {literal(c.name)} AS name" for c in info.non_pks)
        body.append(_column_clocks(info, names))
    return _trigger(info, "itrig", "INSERT", body)


def update_trigger(info: TableInfo) -> str:
    body = [f"SELECT {NDV};", _ensure_key(info, "NEW")]
    pk_changed = "(" + " OR ".join(_changed(c.name) for c in info.pks) + ")"
    body.append(_ensure_key(info, "OLD", pk_changed))
    body.append(_delete_record(info, "OLD", pk_changed))
    body.append(
        f"UPDATE OR REPLACE {info.clock} SET key = {_key_of(info, 'NEW')}, "
        f"db_version = {NDV}, seq = {SEQ}, site_id = 0 "
        f"WHERE key = {_key_of(info, 'OLD')} AND col_name != {S} AND {pk_changed};"
    )
    body.append(_create_record(info, "NEW", pk_changed))
    if info.non_pks:
        names = " UNION ALL ".join(
            f"SELECT {literal(c.name)} AS name WHERE {_changed(c.name)}" for c in info.non_pks
        )
        body.append(_column_clocks(info, names))
    return _trigger(info, "utrig", "UPDATE", body)


def delete_trigger(info: TableInfo) -> str:
    body = [
        _ensure_key(info, "OLD"),
        _delete_record(info, "OLD"),
        f"DELETE FROM {info.clock} WHERE key = {_key_of(info, 'OLD')} AND col_name != {S};",
    ]
    return _trigger(info, "dtrig", "DELETE", body)


def _trigger(info: TableInfo, suffix: str, event: str, body: list[str]) -> str:
    name = ident(f"{info.name}__crsql_{suffix}")
    stmts = "\n  ".join(body)
    return (
        f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON {info.quoted} "
        f"WHEN crsql_internal_sync_bit() = 0 BEGIN\n  {stmts}\nEND"
    )


def trigger_names(table: str) -> tuple[str, str, str]:
    return (f"{table}__crsql_itrig", f"{table}__crsql_utrig", f"{table}__crsql_dtrig")


def create_triggers_sql(info: TableInfo) -> list[str]:
    return [insert_trigger(info), update_trigger(info), delete_trigger(info)]


def drop_triggers_sql(table: str) -> list[str]:
    return [f"DROP TRIGGER IF EXISTS {ident(n)}" for n in trigger_names(table)]
