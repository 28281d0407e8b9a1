"""CRDT convergence: after heal and quiet, every live node's database is the same.

:class:`CrdtConvergence` is a liveness checker that only needs a way to reach each node's
database connection (``db_of``) and, optionally, its count of missing versions (``gaps_of``,
the agent's bookkeeping). It compares, per CRR table, the rows ordered by primary key and the
clock metadata that decides future merges (per cell: column version and causal length). Local
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

__all__ = ["CrdtConvergence", "database_digest"]


def database_digest(conn: Any) -> str:
    """A digest of every CRR table's rows and of the merge-relevant clock metadata."""
    h = hashlib.blake2b(digest_size=16)
    for table in sorted(crr_tables(conn)):
        h.update(table.encode())
        for row in conn.execute(f'SELECT * FROM "{table}" ORDER BY 1, 2'):
            h.update(repr(row).encode())
    meta = sorted(
        (c.table, c.pk, c.cid, c.col_version, c.cl, repr(c.val))
        for c in crdt.changes_since(conn, 0)
    )
    h.update(repr(meta).encode())
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

    def digests(self, world: World) -> dict[str, str]:
        out = {}
        for node in world.nodes:
            if node.up and (conn := self.db_of(node)) is not None:
                out[node.name] = database_digest(conn)
        return out

    def problems(self, world: World) -> list[str]:
        digests = self.digests(world)
        out = []
        if len(set(digests.values())) > 1:
            groups: dict[str, list[str]] = {}
            for name, d in digests.items():
                groups.setdefault(d, []).append(name)
            out.append("databases differ: " + " | ".join(",".join(g) for g in groups.values()))
        if self.gaps_of is not None:
            for node in world.nodes:
                if node.up and (gaps := self.gaps_of(node)):
                    out.append(f"{node.name} still misses {gaps} version(s)")
        return out
