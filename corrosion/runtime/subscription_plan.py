"""Which subscriptions can be re-evaluated incrementally, and the queries that do it.

A subscription whose query is one plain ``SELECT`` over inner-joined tables (with ``WHERE``,
``ORDER BY``, any deterministic scalar expression) gets a *plan*: the query with the primary key
columns of every table it reads appended as hidden columns (as corrosion rewrites its
subscriptions' queries). A result row is then a function of the source rows named by its hidden
key alone, so after a change only the rows whose key holds a changed primary key can differ:
the plan's ``restricted`` query recomputes exactly those (``WHERE <hidden key> IN (...)``,
which SQLite pushes down to the tables' primary key indexes).

Every other shape keeps the full re-run, because a change to one row can change result rows
that do not contain it: aggregates, ``GROUP BY``, ``DISTINCT``, window functions, subqueries
(views and CTEs included), ``LIMIT``/``OFFSET``, compound selects, outer and natural joins,
table-valued functions, a table read twice (self-joins), tables without a declared primary
key, and non-deterministic or time-dependent functions. The decision is SQLite's wherever it
can tell: its authorizer reports every ``SELECT`` (subqueries, views, CTEs each add one), table
and function; ``pragma_function_list`` says which functions are deterministic; the query's
bytecode (``EXPLAIN``) shows aggregation; the prepared rewrite must give the original's columns
with the same origins. The few keywords SQLite does not report (``DISTINCT``, ``LIMIT``, join
kinds, windows) are looked for in the query's tokens, where any occurrence, even a harmless
one, means the full re-run: a wrong guess can only cost speed, never correctness.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apsw

TOKEN = re.compile(
    r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?"""  # quoted, kept as is
    r"|--[^\n]*|/\*(?:.|\n)*?(?:\*/|$)"  # comments, dropped
    r"|\s+"  # spacing, dropped
    r"|[\w$]+"  # keywords, names, numbers, parameters' names
    r"|.",  # punctuation, one character each
    re.DOTALL,
)

HIDDEN = "__corro_k"  # the hidden key columns' names: __corro_k0, __corro_k1, ...
_PARAM = "__corro_p"  # the restricted query's named parameters (when the query's are named)
_CHUNK = 400  # primary keys per restricted query (SQLite's parameter limit is far above)

# Keywords of shapes that need the full re-run (anywhere in the query, as bare words).
_FULL_RERUN_WORDS = {
    "DISTINCT": "DISTINCT",
    "GROUP": "GROUP BY",
    "HAVING": "HAVING",
    "WINDOW": "a window function",
    "OVER": "a window function",
    "FILTER": "an aggregate",
    "LIMIT": "LIMIT",
    "OFFSET": "OFFSET",
    "UNION": "a compound select",
    "INTERSECT": "a compound select",
    "EXCEPT": "a compound select",
    "LEFT": "an outer join",
    "RIGHT": "an outer join",
    "FULL": "an outer join",
    "OUTER": "an outer join",
    "NATURAL": "a natural join",
    "WITH": "a common table expression",
    "VALUES": "a VALUES list",
    "INDEXED": "INDEXED BY",
    "CURRENT_TIME": "the current time",
    "CURRENT_DATE": "the current time",
    "CURRENT_TIMESTAMP": "the current time",
}
# Deterministic for SQLite, but their result depends on the clock when given 'now'.
_TIME_FUNCTIONS = {"date", "time", "datetime", "julianday", "unixepoch", "strftime", "timediff"}
_AGGREGATE_OPCODES = {"AggStep", "AggStep1", "AggFinal", "AggValue", "AggInverse", "Count"}
_SQLITE_DETERMINISTIC = 0x800
# Words that end a FROM item's name where an alias could be.
_NOT_ALIAS = {"ON", "USING", "JOIN", "INNER", "CROSS", "WHERE", "ORDER", "NOT", "INDEXED"}


@dataclass(frozen=True)
class Source:
    """A table of the query's FROM clause: its primary key, as the hidden columns
    ``hidden[0]..`` of a result row."""

    table: str  # the name in the schema (as changes name it)
    pk: tuple[str, ...]
    hidden: tuple[int, ...]  # positions of its key in the hidden key


@dataclass(frozen=True)
class Plan:
    """How to re-evaluate a subscription from the primary keys a change touched."""

    sql: str  # the query, its hidden key columns appended after the client's
    width: int  # the client's columns
    sources: tuple[Source, ...]
    named: bool  # the query's parameters are named (bound from a dict)

    def restricted(self, source: int, pks: Sequence[tuple], params: Any) -> list[tuple[str, Any]]:
        """The statements (with their parameters) giving every result row whose ``source``
        table row has one of the primary keys ``pks``, hidden key included."""
        hidden = [f'"{HIDDEN}{i}"' for i in self.sources[source].hidden]
        out = []
        for start in range(0, len(pks), _CHUNK):
            chunk = pks[start : start + _CHUNK]
            values = [v for pk in chunk for v in pk]
            if self.named:
                marks = [f":{_PARAM}{i}" for i in range(len(values))]
                bound: Any = dict(params or {}) | {f"{_PARAM}{i}": v for i, v in enumerate(values)}
            else:
                marks = ["?"] * len(values)
                bound = [*(params or ()), *values]
            if len(hidden) == 1:
                cond = f"{hidden[0]} IN ({','.join(marks)})"
            else:
                n = len(hidden)
                rows = ",".join(
                    "(" + ",".join(marks[i : i + n]) + ")" for i in range(0, len(marks), n)
                )
                cond = f"({','.join(hidden)}) IN (VALUES {rows})"
            out.append((f"SELECT * FROM ({self.sql}) WHERE {cond}", bound))
        return out


@dataclass
class Inspected:
    """What SQLite reported while preparing a query (its authorizer)."""

    selects: int = 0
    functions: set[str] | None = None
    tables: set[str] | None = None


def plan_for(
    conn: apsw.Connection,
    sql: str,
    params: Any,
    description: Sequence[tuple],
    inspected: Inspected,
) -> Plan | str:
    """The plan of a subscription's query (``description``: its prepared
    ``description_full``; ``inspected``: what the authorizer saw preparing it), or why it
    needs the full re-run."""
    if inspected.selects != 1:
        return "a subquery, view or compound select"
    tokens = [
        (m.group(), m.start())
        for m in TOKEN.finditer(sql)
        if not m.group().isspace() and not m.group().startswith(("--", "/*"))
    ]
    while tokens and tokens[-1][0] == ";":
        tokens.pop()
    if not tokens:
        return "no statement"
    # the text up to its last token: a trailing comment would swallow what is added after it
    last, at = tokens[-1]
    sql = sql[: at + len(last)]
    words = [t.upper() for t, _ in tokens]
    for word in words:
        if word in _FULL_RERUN_WORDS:
            return _FULL_RERUN_WORDS[word]
    if not words or words[0] != "SELECT" or words.count("SELECT") != 1:
        return "not a single SELECT"
    if _aggregates(conn, sql, params):
        return "an aggregate"
    for name in sorted(inspected.functions or ()):
        why = _function_problem(conn, name)
        if why:
            return why
    from_at = _top_level(words, "FROM")
    if from_at is None:
        return "no table"
    items = _from_items(tokens, words, from_at)
    if isinstance(items, str):
        return items
    sources: list[Source] = []
    hidden_sql: list[str] = []
    seen: set[str] = set()
    for table_token, ref in items:
        table = _schema_table(conn, table_token)
        if table is None:
            return f"{table_token} is not a table"
        if table.lower() in seen:
            return f"{table} is read twice"
        seen.add(table.lower())
        pk = tuple(
            r[0]
            for r in conn.execute(
                "SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", (table,)
            )
        )
        if not pk:
            return f"{table} has no primary key"
        first = len(hidden_sql)
        for i, col in enumerate(pk):
            hidden_sql.append(f'{ref}."{_escape_identifier(col)}" AS "{HIDDEN}{first + i}"')
        sources.append(Source(table, pk, tuple(range(first, first + len(pk)))))
    if {s.table.lower() for s in sources} != {t.lower() for t in inspected.tables or ()}:
        return "it reads tables its FROM clause does not name"
    if any(d[0].startswith(HIDDEN) for d in description):
        return f"a column is named {HIDDEN}..."
    at = tokens[from_at][1]
    sql = f"{sql[:at]},{','.join(hidden_sql)} {sql[at:]}"
    try:
        rewritten = _description(conn, sql, params)
    except apsw.Error as exc:
        return f"the rewritten query does not prepare ({exc})"
    width = len(description)
    if [tuple(d) for d in rewritten[:width]] != [tuple(d) for d in description]:
        return "the rewritten query's columns differ"
    return Plan(sql, width, tuple(sources), isinstance(params, dict))


@contextlib.contextmanager
def unguarded(conn: apsw.Connection) -> Iterator[None]:
    """The agent's own statements on a reader (whose guard checks everything it runs): the
    plan's probes, and the restricted queries' transaction around a query already checked."""
    guard = conn.authorizer
    conn.authorizer = None
    try:
        yield
    finally:
        conn.authorizer = guard


def _escape_identifier(name: str) -> str:
    return name.replace('"', '""')


def _top_level(words: list[str], word: str, start: int = 0) -> int | None:
    depth = 0
    for i in range(start, len(words)):
        w = words[i]
        if w == "(":
            depth += 1
        elif w == ")":
            depth -= 1
        elif depth == 0 and w == word:
            return i
    return None


def _from_items(
    tokens: list[tuple[str, int]], words: list[str], from_at: int
) -> list[tuple[str, str]] | str:
    """The (table as written, how the query refers to it) of each FROM item, or why not."""
    items: list[tuple[str, str]] = []
    i = from_at + 1
    n = len(words)
    while True:
        if i >= n or not _is_name(tokens[i][0]):
            return "an unexpected FROM clause"
        table = tokens[i][0]
        i += 1
        if i < n and words[i] == ".":
            if table.strip('"[]`').lower() != "main" or i + 1 >= n:
                return "a table of another database"
            table = tokens[i + 1][0]
            i += 2
        if i < n and words[i] == "(":
            return "a table-valued function"
        ref = table
        if i < n and words[i] == "AS":
            i += 1
            if i >= n or not _is_name(tokens[i][0]):
                return "an unexpected FROM clause"
            ref = tokens[i][0]
            i += 1
        elif i < n and _is_name(tokens[i][0]) and words[i] not in _NOT_ALIAS:
            ref = tokens[i][0]
            i += 1
        items.append((table, ref))
        # the join constraint (ON ... / USING (...)) up to the next item or the end of FROM
        depth = 0
        while i < n:
            w = words[i]
            if w == "(":
                depth += 1
            elif w == ")":
                depth -= 1
            elif depth == 0 and w in (",", "JOIN", "WHERE", "ORDER"):
                break
            i += 1
        if i >= n or words[i] in ("WHERE", "ORDER"):
            return items
        i += 1  # past "," or "JOIN" (an INNER or CROSS before it was skipped above)


def _is_name(token: str) -> bool:
    return token[:1] in ('"', "[", "`") or bool(re.fullmatch(r"[A-Za-z_][\w$]*", token))


def _schema_table(conn: apsw.Connection, token: str) -> str | None:
    name = token
    if token[:1] == '"' and token.endswith('"') and len(token) > 1:
        name = token[1:-1].replace('""', '"')
    elif token[:1] == "`" and token.endswith("`") and len(token) > 1:
        name = token[1:-1].replace("``", "`")
    elif token[:1] == "[" and token.endswith("]"):
        name = token[1:-1]
    row = conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = ? COLLATE NOCASE",
        (name,),
    ).fetchall()
    return str(row[0][0]) if row else None


def _function_problem(conn: apsw.Connection, name: str) -> str | None:
    if name.lower() in _TIME_FUNCTIONS:
        return f"{name}() can depend on the clock"
    flags = conn.execute(
        "SELECT type, flags FROM pragma_function_list WHERE name = ? COLLATE NOCASE", (name,)
    ).fetchall()
    scalar = [f for t, f in flags if t == "s" and isinstance(f, int)]
    if not scalar or any(not f & _SQLITE_DETERMINISTIC for f in scalar):
        return f"{name}() is not deterministic"
    return None


def _aggregates(conn: apsw.Connection, sql: str, params: Any) -> bool:
    cursor = conn.cursor()
    try:
        ops = {r[1] for r in cursor.execute("EXPLAIN " + sql, params, can_cache=False)}
    except apsw.Error:
        return True
    return bool(ops & _AGGREGATE_OPCODES)


def _description(conn: apsw.Connection, sql: str, params: Any) -> list[tuple]:
    info: dict[str, Any] = {}

    def trace(cur: apsw.Cursor, _sql: str, _bindings: Any) -> bool:
        info["full"] = cur.description_full
        return False

    cursor = conn.cursor()
    cursor.exec_trace = trace
    try:
        cursor.execute(sql, params, can_cache=False)
    except apsw.ExecTraceAbort:
        pass
    finally:
        cursor.exec_trace = None
    return list(info["full"])
