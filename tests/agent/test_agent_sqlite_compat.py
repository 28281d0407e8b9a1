"""The files a node writes open in standard SQLite: Python's stdlib ``sqlite3`` module reads every
table of a running agent's database (WAL), of the same database after the agent stops, of a
machine's step log and of a ``corrosion backup`` copy, and the ``sqlite3`` shell reads the backup;
all pass ``integrity_check``. Everything stored in their schemas re-parses in the stdlib module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import apsw
import pytest
from agent_helpers import agent_config, rows
from stdlib_readers import (
    check_parses_in_stdlib,
    read_everything,
    sqlite3_shell,
    store_pre_fix_utrig,
    stored_schema,
)
from support import start_machine, wait_for

import crdt
from corrosion import Agent
from corrosion.runtime.extensions import load_extensions
from crdt.schema import apply_schema
from orchestrator.publish import MACHINES_SCHEMA

pytestmark = pytest.mark.anyio

WRITES = [
    "INSERT INTO kv (k, v) VALUES ('a', 1), ('b', 'two'), ('c', x'03')",
    "UPDATE kv SET k = 'z' WHERE k = 'a'",  # pk change
    "DELETE FROM kv WHERE k = 'b'",
    "INSERT INTO items (id, body, owner) VALUES (1, 'one', 'me'), (2, 'two', NULL)",
    "UPDATE items SET body = 'uno' WHERE id = 1",
]


def schema_of(path: Path) -> list[tuple[str, str, str]]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return stored_schema(conn)
    finally:
        conn.close()


def corrosion_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a separate process (PYTHONPATH is inherited)."""
    return subprocess.run(
        [sys.executable, "-m", "corrosion", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )


async def test_stdlib_reads_a_running_agent_its_step_log_and_its_backup(tmp_path):
    machines = tmp_path / "machines"
    orchestrator = {"machines_path": str(machines), "driver": "fake", "worker": "w1"}
    cfg = agent_config(tmp_path, "n1", orchestrator=orchestrator)
    db_path = cfg.db.path
    async with Agent(cfg, extensions=load_extensions(cfg)) as agent:
        await agent.execute(WRITES)
        mid = await start_machine(agent.api_addrs[0])

        async def machine_row() -> bool:
            return await rows(agent, "SELECT state FROM machines WHERE id = ?", (mid,)) == [
                ("started",)
            ]

        await wait_for(machine_row, what="the machine's row in the agent's database")
        assert (Path(str(db_path) + "-wal")).exists()  # read while the agent holds it, in WAL

        live = await anyio.to_thread.run_sync(read_everything, db_path)
        assert sorted(live["kv"]) == [("c", b"\x03", 0), ("z", 1, 0)]
        assert live["items"] == [(1, "uno", "me"), (2, "two", None)]
        assert [r[:2] for r in live["machines"]] == [(mid, "web")]
        assert {"__corro_bookkeeping", "crsql_site_id", "kv__crsql_clock"} <= set(live)
        step_log = machines / f"{mid}.sqlite"
        log = await anyio.to_thread.run_sync(read_everything, step_log)
        assert [r[1] for r in log["runs"]] and log["events"]

        out = tmp_path / "backup.db"
        done = await anyio.to_thread.run_sync(
            corrosion_cli, "backup", str(out), "-c", "/nonexistent", "--db-path", str(db_path)
        )
        assert done.returncode == 0, done.stderr

    stopped = read_everything(db_path)
    assert {k: stopped[k] for k in ("kv", "items")} == {k: live[k] for k in ("kv", "items")}
    copy = read_everything(out)
    assert {k: copy[k] for k in ("kv", "items")} == {k: live[k] for k in ("kv", "items")}
    # the agent's tables, the CRRs (the user's and the machines table) and the step log's
    check_parses_in_stdlib(schema_of(db_path) + schema_of(step_log))

    shell = sqlite3_shell(out, "PRAGMA integrity_check; SELECT k FROM kv ORDER BY k;")
    assert shell.split() == ["ok", "c", "z"]


def test_backup_of_a_database_from_an_earlier_release_opens_in_standard_sqlite(tmp_path):
    """A stopped database whose triggers an earlier release stored: its backup is readable."""
    db_path = tmp_path / "old.db"
    conn = crdt.connect(str(db_path), wal=True)
    try:
        apply_schema(conn, MACHINES_SCHEMA)
        conn.execute("INSERT INTO machines (id, app) VALUES ('m1', 'web')")
        with conn:
            store_pre_fix_utrig(conn, "machines")
    finally:
        conn.close()
    out = tmp_path / "backup.db"
    done = corrosion_cli("backup", str(out), "-c", "/nonexistent", "--db-path", str(db_path))
    assert done.returncode == 0, done.stderr
    assert read_everything(out)["machines"][0][:2] == ("m1", "web")
    assert sqlite3_shell(out, "PRAGMA integrity_check;").split() == ["ok"]
