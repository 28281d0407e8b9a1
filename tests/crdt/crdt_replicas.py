"""Paired replicas for differential tests: the same operations on our engine and on the real
cr-sqlite, with each side's site ids mapped to node indexes so their outputs can be compared."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import crdt

_names = itertools.count()

SCHEMAS = {
    "t1": "CREATE TABLE t1 (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER, c REAL)",
    # pk order (k2, k1) differs from column order; w is NOT NULL with a default
    "t2": "CREATE TABLE t2 (k1 TEXT NOT NULL, v ANY, k2 INTEGER NOT NULL, "
    "w TEXT NOT NULL DEFAULT 'dflt', PRIMARY KEY (k2, k1))",
    "t3": "CREATE TABLE t3 (a INTEGER NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b))",
    "t4": "CREATE TABLE t4 (id TEXT PRIMARY KEY NOT NULL, n)",
}
PKS = {"t1": ("id",), "t2": ("k2", "k1"), "t3": ("a", "b"), "t4": ("id",)}
NON_PKS = {"t1": ("a", "b", "c"), "t2": ("v", "w"), "t3": (), "t4": ("n",)}


@dataclass
class Side:
    """One implementation's set of nodes."""

    dbs: list[Any]
    sites: list[bytes] = field(default_factory=list)

    def site_index(self, site: bytes | None) -> Any:
        if site is None:
            return None
        try:
            return self.sites.index(site)
        except ValueError:
            return ("unknown", site)


class OursDb:
    def __init__(self, recursive_triggers: bool) -> None:
        self.conn = crdt.connect()
        if recursive_triggers:
            self.conn.execute("PRAGMA recursive_triggers = ON")

    def execute(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        rows: list[tuple] = []
        # run statements one by one like the oracle; keep the last non-empty result
        cur = self.conn.cursor()
        result = cur.execute(sql, params).fetchall()
        if result:
            rows = result
        return rows


def make_pair(oracle, n: int, tables: list[str], recursive_triggers: bool = False):
    ours = Side([OursDb(recursive_triggers) for _ in range(n)])
    theirs = Side([oracle.open(f"db{next(_names)}") for _ in range(n)])
    for side in (ours, theirs):
        for db in side.dbs:
            if recursive_triggers:
                db.execute("PRAGMA recursive_triggers = ON")
            for t in tables:
                db.execute(SCHEMAS[t])
                db.execute(f"SELECT crsql_as_crr('{t}')")
            side.sites.append(db.execute("SELECT crsql_site_id()")[0][0])
    return ours, theirs


def close_pair(ours: Side, theirs: Side) -> None:
    for db in ours.dbs:
        db.conn.close()
    for db in theirs.dbs:
        db.close()


def snapshot(side: Side, i: int, tables: list[str]) -> dict:
    db = side.dbs[i]
    changes = sorted(
        (
            (t, pk, cid, _norm(val), cv, dbv, side.site_index(site), cl, seq)
            for t, pk, cid, val, cv, dbv, site, cl, seq in db.execute("SELECT * FROM crsql_changes")
        ),
        key=lambda r: (r[0], r[1], r[2]),
    )
    base = {t: db.execute(f"SELECT * FROM {t} ORDER BY {', '.join(PKS[t])}") for t in tables}
    base = {t: [tuple(_norm(v) for v in row) for row in rows] for t, rows in base.items()}
    return {
        "changes": changes,
        "db_version": db.execute("SELECT crsql_db_version()")[0][0],
        "base": base,
    }


def _norm(v: Any) -> Any:
    # tag the storage class so 1 and 1.0 do not compare equal
    return (type(v).__name__, v)
