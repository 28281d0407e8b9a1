"""CRDT convergence: after heal and quiet, every live node's database is the same, byte for byte.

:class:`CrdtConvergence` is a liveness checker that only needs a way to reach each node's
database connection (``db_of``) and, optionally, its count of missing versions (``gaps_of``,
the agent's bookkeeping). It compares :func:`table_dump`s, as ``sqldiff`` would: every CRR
table's rows ordered by primary key, each value written exactly (type included: ``1``, ``1.0``
and ``'1'`` differ), then the clock metadata that decides future merges (per cell: column
version and causal length), and reports the first line where two nodes differ. Local
``db_version``/``seq`` numbering legitimately differs, and so may the site id recorded for a
cell when two sites wrote the same value at the same column version (equal values do not
overwrite, cr-sqlite's default), so neither is compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import crdt
from crdt.tableinfo import crr_tables

from .checkers import SettlingChecker

if TYPE_CHECKING:
    from .node import SimNode
    from .world import World

__all__ = ["CrdtConvergence", "database_digest", "first_difference", "table_dump"]


def sql_literal(value: Any) -> str:
    """``value`` as an SQL literal that tells every SQLite value apart (``quote()``, with
    reals written exactly)."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"X'{value.hex().upper()}'"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, float):
        return repr(value)  # shortest repr that reads back to the same double
    return str(value)


def table_dump(conn: Any) -> list[bytes]:
    """An ordered dump of what must be equal on every node after convergence: each CRR table's
    rows by primary key (``table(pk): values``), then each cell's clock (``clock table pk cid
    col_version cl``), one line each, as bytes to compare byte for byte."""
    out: list[bytes] = []
    for table in sorted(crr_tables(conn)):
        columns = list(conn.execute(f'PRAGMA table_info("{table}")'))
        pk = [c[1] for c in sorted((c for c in columns if c[5]), key=lambda c: c[5])]
        order = ", ".join(f'"{c}"' for c in pk) or "rowid"
        width = len(pk) or 1
        for row in conn.execute(f'SELECT {order}, * FROM "{table}" ORDER BY {order}'):
            key = ", ".join(map(sql_literal, row[:width]))
            values = " | ".join(map(sql_literal, row[width:]))
            out.append(f"{table}({key}): {values}".encode())
    cells = sorted((c.table, c.pk, c.cid, c.col_version, c.cl) for c in crdt.changes_since(conn, 0))
    for table, packed, cid, col_version, cl in cells:
        out.append(f"clock {table} {sql_literal(packed)} {cid} {col_version} {cl}".encode())
    return out


def first_difference(a: list[bytes], b: list[bytes]) -> tuple[int, bytes | None, bytes | None]:
    """The first line where two dumps differ (None on a side that ended), or ``(-1, ..)``."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i, x, y
    if len(a) != len(b):
        i = min(len(a), len(b))
        return i, a[i] if i < len(a) else None, b[i] if i < len(b) else None
    return -1, None, None


def describe_difference(name_a: str, a: list[bytes], name_b: str, b: list[bytes]) -> str:
    """``first_difference`` in words (empty if the dumps are equal)."""
    i, x, y = first_difference(a, b)
    if i < 0:
        return ""

    def shown(line: bytes | None) -> str:
        return "nothing (its dump ends)" if line is None else line.decode(errors="replace")

    return f"first difference at line {i + 1}: {name_a} has {shown(x)}; {name_b} has {shown(y)}"


def database_digest(conn: Any) -> str:
    """A digest of :func:`table_dump`."""
    h = hashlib.blake2b(digest_size=16)
    for line in table_dump(conn):
        h.update(line)
        h.update(b"\n")
    return h.hexdigest()


class CrdtConvergence(SettlingChecker):
    name = "crdt-convergence"

    def __init__(
        self,
        db_of: Callable[[SimNode], Any],
        gaps_of: Callable[[SimNode], int] | None = None,
        deadline: float = 120.0,
    ) -> None:
        """``db_of(node)``: the node's connection, or None if it hosts no database."""
        self.db_of = db_of
        self.gaps_of = gaps_of
        super().__init__(deadline)

    def attach(self, world: World) -> None:
        self.world = world

    def dumps(self, world: World) -> dict[str, list[bytes]]:
        out = {}
        for node in world.nodes:
            if node.up and (conn := self.db_of(node)) is not None:
                out[node.name] = table_dump(conn)
        return out

    def problems(self, world: World) -> list[str]:
        dumps = self.dumps(world)
        out = []
        groups: dict[bytes, list[str]] = {}
        for name, dump in dumps.items():
            groups.setdefault(b"\n".join(dump), []).append(name)
        if len(groups) > 1:
            (a, *_), (b, *_) = list(groups.values())[:2]
            out.append(
                "databases differ: "
                + " | ".join(",".join(g) for g in groups.values())
                + "; "
                + describe_difference(a, dumps[a], b, dumps[b])
            )
        if self.gaps_of is not None:
            for node in world.nodes:
                if node.up and (gaps := self.gaps_of(node)):
                    out.append(f"{node.name} still misses {gaps} version(s)")
        return out
