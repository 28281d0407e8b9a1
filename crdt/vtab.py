"""``crsql_changes``: the eponymous virtual table through which SQL users read and merge changes.

Reads push constraints on ``cid, col_version, db_version, site_id, cl, seq`` into the generated
query (as cr-sqlite does), and the rows come in ``(db_version, seq)`` order unless the statement
asks for another. Unlike cr-sqlite we leave any ``ORDER BY`` to SQLite, so ``ORDER BY db_version
DESC`` really is descending (upstream applies only the last term's direction).

``INSERT INTO crsql_changes VALUES (...)`` merges each row as it arrives (see merge.py); UPDATE and
DELETE are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import apsw

from .changes import COLUMNS, TAIL_EXPRS, from_clause, value_expr
from .errors import CrdtError
from .merge import merge_one_in_statement
from .sqlutil import ident, literal
from .state import CrrState
from .tableinfo import crr_tables, read_table_info

SCHEMA = (
    "CREATE TABLE x([table] TEXT NOT NULL, [pk] BLOB NOT NULL, [cid] TEXT NOT NULL, [val] ANY, "
    "[col_version] INTEGER NOT NULL, [db_version] INTEGER NOT NULL, [site_id] BLOB NOT NULL, "
    "[cl] INTEGER NOT NULL, [seq] INTEGER NOT NULL)"
)
ROWID_STRIDE = 10**13

# column index -> SQL expression inside the per-table select
_PUSHABLE = {
    2: "t1.col_name",
    4: "t1.col_version",
    5: "t1.db_version",
    6: "site_tbl.site_id",
    7: "COALESCE(t2.col_version, 1)",
    8: "t1.seq",
}
_BINARY_OPS = {
    apsw.SQLITE_INDEX_CONSTRAINT_EQ: "=",
    apsw.SQLITE_INDEX_CONSTRAINT_GT: ">",
    apsw.SQLITE_INDEX_CONSTRAINT_GE: ">=",
    apsw.SQLITE_INDEX_CONSTRAINT_LT: "<",
    apsw.SQLITE_INDEX_CONSTRAINT_LE: "<=",
    apsw.SQLITE_INDEX_CONSTRAINT_NE: "!=",
    apsw.SQLITE_INDEX_CONSTRAINT_IS: "IS",
    apsw.SQLITE_INDEX_CONSTRAINT_ISNOT: "IS NOT",
}
_UNARY_OPS = {
    apsw.SQLITE_INDEX_CONSTRAINT_ISNULL: "IS NULL",
    apsw.SQLITE_INDEX_CONSTRAINT_ISNOTNULL: "IS NOT NULL",
}


def _per_table_sql(conn: apsw.Connection, table_index: int, name: str, where: str) -> str:
    info = read_table_info(conn, name)
    pk_vals = ", ".join(f"pk_tbl.{ident(c)}" for c in info.pk_names)
    return (
        f"SELECT {literal(name)}, crsql_pack_columns({pk_vals}), t1.col_name, {value_expr(info)}, "
        f"{TAIL_EXPRS}, {table_index * ROWID_STRIDE} + t1.key{from_clause(info)}{where}"
    )


class ChangesModule:
    """The apsw module object: one table object per connection."""

    def __init__(self, conn: apsw.Connection, state: CrrState) -> None:
        self.conn = conn
        self.state = state

    def Connect(
        self,
        connection: apsw.Connection,
        modulename: str,
        databasename: str,
        tablename: str,
        *args: apsw.SQLiteValue,
    ) -> tuple[str, ChangesTable]:
        return SCHEMA, ChangesTable(self.conn, self.state)

    Create = Connect


class ChangesTable:
    def __init__(self, conn: apsw.Connection, state: CrrState) -> None:
        self.conn = conn
        self.state = state

    def BestIndex(
        self, constraints: Sequence[tuple[int, int]], orderbys: Sequence[tuple[int, int]]
    ) -> tuple[list[Any], int, str, bool, float]:
        used: list[Any] = []
        plan: list[str] = []
        argv = 0
        for column, op in constraints:
            expr = _PUSHABLE.get(column)
            if expr is not None and op in _BINARY_OPS:
                argv += 1
                used.append((argv - 1, True))
                plan.append(f"{column}:{op}")
            elif expr is not None and op in _UNARY_OPS:
                used.append(None)
                plan.append(f"{column}:{op}")
            else:
                used.append(None)
        # Unary constraints need no argument but must still be applied: encode them in the plan
        # and let SQLite check them too (not omitted), which stays correct.
        cost = 1000.0 if any(c[0] == 5 for c in constraints) else 1e6
        return (used, 0, ",".join(plan), False, cost)

    def Open(self) -> ChangesCursor:
        return ChangesCursor(self)

    def Disconnect(self) -> None:
        pass

    Destroy = Disconnect

    def UpdateInsertRow(self, rowid: int | None, fields: tuple[apsw.SQLiteValue, ...]) -> int:
        if rowid is not None:
            raise CrdtError("crsql_changes rows have no settable rowid")
        merge_one_in_statement(self.conn, self.state, tuple(fields))
        return 0

    def UpdateDeleteRow(self, rowid: int) -> None:
        raise CrdtError(
            "Only INSERT and SELECT statements are allowed against the crsql changes table"
        )

    def UpdateChangeRow(
        self, rowid: int, newrowid: int, fields: tuple[apsw.SQLiteValue, ...]
    ) -> None:
        raise CrdtError(
            "Only INSERT and SELECT statements are allowed against the crsql changes table"
        )


class ChangesCursor:
    def __init__(self, table: ChangesTable) -> None:
        self.table = table
        self.rows: list[tuple[Any, ...]] = []
        self.pos = 0

    def Filter(
        self, indexnum: int, indexname: str | None, constraintargs: tuple[Any, ...] | None
    ) -> None:
        conn = self.table.conn
        conds = []
        args = list(constraintargs or ())
        bindings: list[Any] = []
        for item in indexname.split(",") if indexname else []:
            column, op = (int(x) for x in item.split(":"))
            expr = _PUSHABLE[column]
            if op in _BINARY_OPS:
                conds.append(f"{expr} {_BINARY_OPS[op]} ?")
                bindings.append(args.pop(0))
            else:
                conds.append(f"{expr} {_UNARY_OPS[op]}")
        where = (" WHERE " + " AND ".join(conds)) if conds else ""
        names = crr_tables(conn)
        if not names:
            self.rows, self.pos = [], 0
            return
        parts = [_per_table_sql(conn, i, n, where) for i, n in enumerate(names)]
        # columns: table, pk, cid, val, col_version, db_version, site_id, cl, seq, rowid
        sql = " UNION ALL ".join(parts) + " ORDER BY 6, 9"
        self.rows = conn.execute(sql, bindings * len(names)).fetchall()
        self.pos = 0

    def Eof(self) -> bool:
        return self.pos >= len(self.rows)

    def Column(self, number: int) -> apsw.SQLiteValue:
        if number == -1:
            return self.rows[self.pos][9]
        return self.rows[self.pos][number]

    def Rowid(self) -> int:
        return cast(int, self.rows[self.pos][9])

    def Next(self) -> None:
        self.pos += 1

    def Close(self) -> None:
        self.rows = []


assert len(COLUMNS) == 9
