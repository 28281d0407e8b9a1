"""Reading our database files the way users' tools do -- Python's stdlib ``sqlite3`` module and the
``sqlite3`` shell, whose SQLite may be as old as 3.37 -- never through apsw's bundled SQLite."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import apsw
import pytest

# Syntax and functions SQLite added in 3.38-3.40: the stdlib SQLite here (3.40) accepts them, a
# 3.37 reader would reject the whole file. Stored SQL must not use them.
NEWER_THAN_337 = {
    "-> / ->> (3.38)": re.compile(r"->"),
    "unixepoch() (3.38)": re.compile(r"\bunixepoch\s*\(", re.I),
    "format() (3.38)": re.compile(r"\bformat\s*\(", re.I),
    "IS [NOT] DISTINCT FROM (3.39)": re.compile(r"\bDISTINCT\s+FROM\b", re.I),
    "RIGHT / FULL JOIN (3.39)": re.compile(r"\b(RIGHT|FULL)\s+(OUTER\s+)?JOIN\b", re.I),
}


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def read_tables(conn: sqlite3.Connection | apsw.Connection) -> dict[str, list[tuple]]:
    """Every table's and view's rows, by name (sorted, so they compare across readers)."""
    names = conn.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name"
    ).fetchall()
    return {
        n: sorted(conn.execute(f"SELECT * FROM {quote(n)}").fetchall(), key=repr) for (n,) in names
    }


def read_everything(path: str | Path) -> dict[str, list[tuple]]:
    """Open ``path`` read-only with the stdlib module, check its integrity and read every table
    and view."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return read_tables(db)
    finally:
        db.close()


def stored_schema(conn: apsw.Connection) -> list[tuple[str, str, str]]:
    """(type, name, sql) of everything in sqlite_master that has SQL, in creation order."""
    return conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"
    ).fetchall()


def check_parses_in_stdlib(schema: list[tuple[str, str, str]]) -> None:
    """Re-create every stored statement in an in-memory stdlib database (a trigger's body only
    has to parse there: the functions it calls are looked up when it fires), and look for
    syntax newer than 3.37 that this stdlib SQLite would still accept."""
    assert schema, "nothing stored"
    db = sqlite3.connect(":memory:")
    try:
        for kind, name, sql in schema:
            try:
                db.execute(sql)
            except sqlite3.Error as exc:
                pytest.fail(f"stdlib sqlite3 {sqlite3.sqlite_version} rejects {kind} {name}: {exc}")
            for what, pattern in NEWER_THAN_337.items():
                assert not pattern.search(sql), f"{kind} {name} uses {what}: {sql}"
    finally:
        db.close()


def store_pre_fix_utrig(conn: apsw.Connection, table: str) -> None:
    """Put back the pk-update trigger as releases before the fix wrote it: the clock table
    aliased (``UPDATE <clock> AS m``), which SQLite 3.40 and older cannot parse."""
    name = f"{table}__crsql_utrig"
    clock = f'"{table}__crsql_clock"'
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    old = sql.replace(
        f"UPDATE {clock} SET col_version = col_version + 1 + ",
        f"UPDATE {clock} AS m SET col_version = m.col_version + 1 + ",
    ).replace(f"{clock}.col_name", "m.col_name")
    assert old != sql
    conn.execute(f'DROP TRIGGER "{name}"')
    conn.execute(old)


def sqlite3_shell(path: str | Path, sql: str) -> str:
    """Run the ``sqlite3`` shell read-only on ``path``; skips when the shell is not installed."""
    shell = shutil.which("sqlite3")
    if shell is None:
        pytest.skip("the sqlite3 shell is not installed")
    done = subprocess.run(
        [shell, "-readonly", "-bail", str(path), sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout
