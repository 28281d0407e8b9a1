"""Schema across a cluster: versions for a table or column a node does not have yet are kept,
reported and applied once its schema arrives (``corrosion reload`` or a restart), even across a
restart in between; ``reload`` re-reads ``db.schema_paths`` from the config file; a table the
schema files do not list never stops a node and is dropped only with ``--allow-destructive``;
the orchestrator's shipped ``machines`` schema is included by every node."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import apsw
import httpx
import pytest
from cli_helpers import api_of, cli, gossip_of, node_mapping, rows, write_config
from support import Proc, start_machine, wait_for
from test_cli_process import json_logs

from corrosion import Agent, Config
from corrosion.runtime.extensions import load_extensions
from corrosion.surfaces.metrics import collect, render
from orchestrator.publish import MACHINES_SCHEMA_PATH

pytestmark = pytest.mark.anyio

T1 = "CREATE TABLE t1 (id INTEGER NOT NULL PRIMARY KEY, a TEXT NOT NULL DEFAULT '');\n"
T1_WITH_C = (
    "CREATE TABLE t1 (id INTEGER NOT NULL PRIMARY KEY, a TEXT NOT NULL DEFAULT '', c TEXT);\n"
)
T2 = "CREATE TABLE t2 (id INTEGER NOT NULL PRIMARY KEY, b);\n"  # no affinity
KEPT_LOG = "changes for unknown table t2 kept until its schema arrives"


def sql_file(base: Path, name: str, sql: str) -> Path:
    path = base / "sql" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sql)
    return path


def node_config(
    base: Path, name: str, files: list[Path], seeds: list[str] | None = None, **sections: Any
) -> Path:
    """A config file whose db.schema_paths lists ``files`` (the agent is started from it, so
    ``corrosion reload`` re-reads it)."""
    data = node_mapping(base, name, seeds, **sections)
    data["db"]["schema_paths"] = [str(f) for f in files]
    return write_config(base / f"{name}.toml", data)


def set_schema_paths(config: Path, files: list[Path]) -> None:
    """Edit the config file as an operator would: only db.schema_paths changes."""
    data = tomllib.loads(config.read_text())
    data["db"]["schema_paths"] = [str(f) for f in files]
    write_config(config, data)


@contextlib.asynccontextmanager
async def started(config: Path, **kwargs: Any) -> AsyncIterator[Agent]:
    cfg = Config.load(config)  # hosting the extensions its tables ask for, as the CLI does
    async with Agent(cfg, extensions=load_extensions(cfg), **kwargs) as agent:
        yield agent


async def health(agent: Agent, query: str = "") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{api_of(agent)}", timeout=30) as client:
        return await client.get("/v1/health" + query)


def kept_warnings(caplog: pytest.LogCaptureFixture, what: str = KEPT_LOG) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and r.message == what)


async def test_versions_for_a_missing_table_are_kept_then_applied_on_reload(base, caplog):
    caplog.set_level(logging.INFO, logger="corrosion")
    s1, s2 = sql_file(base, "t1.sql", T1), sql_file(base, "t2.sql", T2)
    async with started(node_config(base, "a", [s1, s2])) as a:
        b_config = node_config(base, "b", [s1], [gossip_of(a)])
        async with started(b_config) as b:
            await wait_for(lambda: b.alive_members() == 1, what="b to join a")
            await a.execute(["INSERT INTO t1 (id, a) VALUES (1, 'x')"])
            # one transaction over both tables: b applies it whole, later, or not at all
            await a.execute(
                [
                    "INSERT INTO t2 (id, b) VALUES (1, 'one')",
                    "INSERT INTO t1 (id, a) VALUES (2, 'y')",
                ]
            )
            await a.execute(["INSERT INTO t2 (id, b) VALUES (2, '123')"])  # text stays text

            await wait_for(lambda: b.pending_schema.versions == 2, what="b to keep two versions")
            assert b.sync_state()["heads"] == {a.actor_id.hex(): 3}
            assert await rows(b, "SELECT id, a FROM t1 ORDER BY id") == [(1, "x")]
            report = (await health(b)).json()["response"]
            assert report["gaps"] == 0
            assert report["pending_schema"] == {"versions": 2, "missing": {"t2": 2}}
            assert (await health(b, "?pending_schema=0")).status_code == 503
            assert (await health(b, "?pending_schema=2")).status_code == 200
            assert (await health(b, "?pending_schema=x")).status_code == 400
            metrics = render(collect(b))
            assert "corro_agent_pending_schema_versions 2" in metrics
            assert 'corro_agent_pending_schema_changes{missing="t2"} 2' in metrics
            assert "corro_agent_pending_schema_kept_total 2" in metrics

            # kept versions count as received: sync rounds go by without fetching them again
            rounds = b.replicator.stats.syncs_started
            await wait_for(
                lambda: b.replicator.stats.syncs_started >= rounds + 3, what="b to sync 3 times"
            )
            assert b.pending_schema.kept_total == 2
            assert kept_warnings(caplog) == 1

            set_schema_paths(b_config, [s1, s2])
            result = await cli("-c", str(b_config), "reload")
            assert result.exit_code == 0, result.output
            assert "applied: created table t2" in result.stdout
            assert "applied: applied 2 kept versions that waited for this schema" in result.stdout

            table = "SELECT id, b, typeof(b) FROM t2 ORDER BY id"
            assert await rows(b, table) == await rows(a, table)
            assert await rows(b, table) == [(1, "one", "text"), (2, "123", "text")]
            assert await rows(b, "SELECT id, a FROM t1 ORDER BY id") == [(1, "x"), (2, "y")]
            report = (await health(b, "?pending_schema=0")).json()["response"]
            assert report["pending_schema"] == {"versions": 0, "missing": {}}
            assert (await health(b, "?pending_schema=0")).status_code == 200
            assert "corro_agent_pending_schema_applied_total 2" in render(collect(b))

            # from now on, t2 replicates like any table, both ways
            await a.execute(["UPDATE t2 SET b = 'two' WHERE id = 2"])
            await b.execute(["INSERT INTO t2 (id, b) VALUES (3, 'from b')"])

            async def converged() -> bool:
                return (
                    await rows(a, table) == await rows(b, table) and len(await rows(a, table)) == 3
                )

            await wait_for(converged, what="t2 to converge after the reload")
            assert b.pending_schema.versions == 0 and b.pending_schema.kept_total == 2


async def test_kept_versions_survive_a_restart_and_are_served_to_peers(base, caplog):
    caplog.set_level(logging.INFO, logger="corrosion")
    s1, s2 = sql_file(base, "t1.sql", T1), sql_file(base, "t2.sql", T2)
    async with started(node_config(base, "a", [s1, s2])) as a:
        await a.execute(["INSERT INTO t2 (id, b) VALUES (1, 'one')"])
        await a.execute(["INSERT INTO t1 (id, a) VALUES (1, 'x')"])
        b_config = node_config(base, "b", [s1], [gossip_of(a)])
        async with started(b_config) as b:
            await wait_for(lambda: b.pending_schema.versions == 1, what="b to keep a's version")
            await wait_for(lambda: b.sync_state()["heads"] == {a.actor_id.hex(): 2}, what="sync")
        # a is gone: only b has the kept version now
    async with started(b_config) as b:
        assert b.pending_schema.to_json() == {"versions": 1, "missing": {"t2": 1}}
        assert (await health(b, "?pending_schema=0")).status_code == 503
        assert b.sync_state()["heads"] == {a.actor_id.hex(): 2}
        assert kept_warnings(caplog) == 2  # once per run of b

        # a node that has t2 gets the kept version from b, as a sent it
        c_config = node_config(base, "c", [s1, s2], [gossip_of(b)])
        async with started(c_config) as c:
            await wait_for(
                lambda: rows(c, "SELECT id, b FROM t2"), what="the kept version to reach c"
            )
            assert await rows(c, "SELECT id, b FROM t2") == [(1, "one")]
            assert c.pending_schema.versions == 0

        set_schema_paths(b_config, [s1, s2])
        result = await cli("-c", str(b_config), "reload")
        assert result.exit_code == 0, result.output
        assert await rows(b, "SELECT id, b FROM t2") == [(1, "one")]
        assert (await health(b, "?pending_schema=0")).status_code == 200


async def test_a_missing_column_is_kept_and_applied_at_start_up(base, caplog):
    caplog.set_level(logging.INFO, logger="corrosion")
    old, new = sql_file(base, "old.sql", T1), sql_file(base, "new.sql", T1_WITH_C)
    files = {"schema_source": "files"}  # each node follows its own files: a rolling rollout
    a_config = node_config(base, "a", [old], db=files)
    async with started(a_config) as a:
        b_config = node_config(base, "b", [old], [gossip_of(a)], db=files)
        async with started(b_config) as b:
            await a.execute(["INSERT INTO t1 (id, a) VALUES (1, 'x')"])
            await wait_for(lambda: _equal(rows(b, "SELECT id, a FROM t1"), [(1, "x")]), what="b")
            # a rolls the new column out first
            set_schema_paths(a_config, [new])
            assert await a.reload_schema() == ["added column t1.c"]
            await a.execute(["UPDATE t1 SET a = 'y', c = 'see' WHERE id = 1"])
            await wait_for(lambda: b.pending_schema.versions == 1, what="b to keep the update")
            assert b.pending_schema.missing == {"t1.c": 1}
            warning = "changes for unknown column t1.c kept until its schema arrives"
            assert kept_warnings(caplog, warning) == 1
            assert await rows(b, "SELECT id, a FROM t1") == [(1, "x")]  # the version is whole
        set_schema_paths(b_config, [new])
        async with started(b_config) as b:
            assert await rows(b, "SELECT id, a, c FROM t1") == [(1, "y", "see")]
            assert b.pending_schema.versions == 0
            await a.execute(["UPDATE t1 SET c = 'again' WHERE id = 1"])
            await wait_for(
                lambda: _equal(rows(b, "SELECT c FROM t1"), [("again",)]), what="t1.c on b"
            )


async def _equal(got: Any, want: Any) -> bool:
    return await got == want


async def test_reload_rereads_schema_paths_from_the_config_file(base):
    s1, s2 = sql_file(base, "t1.sql", T1), sql_file(base, "t2.sql", T2)
    config = node_config(base, "a", [s1])
    async with started(config) as a:
        set_schema_paths(config, [s1, base / "sql" / "nowhere.sql"])
        result = await cli("-c", str(config), "reload")
        assert result.exit_code == 1
        assert "nowhere.sql" in result.stderr and "does not exist" in result.stderr
        assert a.config.db.schema_paths == (s1,)

        set_schema_paths(config, [s1, s2])
        result = await cli("-c", str(config), "reload")
        assert result.exit_code == 0, result.output
        assert result.stdout == "applied: created table t2\n"
        assert a.config.db.schema_paths == (s1, s2)
        await a.execute(["INSERT INTO t2 (id, b) VALUES (1, 'x')"])
        result = await cli("-c", str(config), "reload")
        assert result.stdout == "schema unchanged\n"


async def test_a_table_missing_from_the_schema_never_blocks_start_up(base, caplog):
    caplog.set_level(logging.INFO, logger="corrosion")
    s1 = sql_file(base, "t1.sql", T1)
    config = node_config(base, "a", [s1])
    async with started(config):
        pass
    db = apsw.Connection(str(base / "a" / "state.db"))
    db.execute("CREATE TABLE local_only (k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO local_only VALUES ('kept', 'yes')")
    db.close()
    async with started(config) as a:
        report = (await health(a)).json()["response"]
        assert report["not_in_schema"] == ["local_only"]
        assert await rows(a, "SELECT * FROM local_only") == [("kept", "yes")]
        warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
        assert any(m.startswith("table local_only is in the database but not") for m in warnings)

        result = await cli("-c", str(config), "reload")
        assert result.exit_code == 0
        assert "left alone (--allow-destructive drops it): local_only" in result.stdout
        result = await cli("-c", str(config), "reload", "--allow-destructive")
        assert result.exit_code == 0, result.output
        assert "applied: dropped table local_only" in result.stdout
        assert (await health(a)).json()["response"]["not_in_schema"] == []
        assert await rows(a, "SELECT name FROM sqlite_schema WHERE name = 'local_only'") == []


async def test_agent_process_drops_an_unlisted_table_only_with_allow_destructive(base):
    s1 = sql_file(base, "t1.sql", T1)
    config = node_config(base, "a", [s1], log={"format": "json"})
    (base / "a").mkdir()
    db = apsw.Connection(str(base / "a" / "state.db"))
    db.execute("CREATE TABLE local_only (k TEXT PRIMARY KEY, v TEXT)")
    db.close()

    async def run_agent(*flags: str) -> list[dict]:
        out = base / f"run{len(flags)}"
        out.mkdir()
        cmd = [sys.executable, "-m", "corrosion", "-c", str(config), "agent", *flags]
        proc = Proc(cmd, out)
        try:

            def up() -> bool:
                assert proc.p.poll() is None, proc.stderr()
                return any(r["msg"] == "agent started" for r in json_logs(proc.stderr()))

            await wait_for(up, what="the agent process to start")
            proc.p.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0, proc.stderr()
            return json_logs(proc.stderr())
        finally:
            proc.kill()

    def tables() -> list[str]:
        conn = apsw.Connection(str(base / "a" / "state.db"))
        try:
            found = conn.execute("SELECT name FROM sqlite_schema WHERE name = 'local_only'")
            return [name for (name,) in found]
        finally:
            conn.close()

    logs = await run_agent()
    assert [r["level"] for r in logs if "local_only" in r["msg"]] == ["WARNING"]
    assert tables() == ["local_only"]
    logs = await run_agent("--allow-destructive")
    assert any(r["msg"] == "schema applied: dropped table local_only" for r in logs)
    assert tables() == []


async def test_machines_schema_file_is_shared_by_an_orchestrator_node_and_a_plain_node(base):
    shipped = await anyio.run_process([sys.executable, "-m", "orchestrator", "schema-path"])
    assert Path(shipped.stdout.decode().strip()) == MACHINES_SCHEMA_PATH
    schema_dir = base / "shared"
    schema_dir.mkdir()
    (schema_dir / "app.sql").write_text(T1)
    (schema_dir / "machines.sql").write_text(MACHINES_SCHEMA_PATH.read_text())
    orch = {"machines_path": str(base / "machines"), "driver": "fake", "worker": "w1"}
    w1_config = node_config(base, "w1", [schema_dir], orchestrator=orch)
    async with started(w1_config) as w1:
        result = await cli("-c", str(w1_config), "reload")
        assert result.exit_code == 0, result.output
        assert result.stdout == "schema unchanged\n"
    async with started(w1_config) as w1:  # a restart with both definitions is fine too
        w2_config = node_config(base, "w2", [schema_dir], [gossip_of(w1)])
        async with started(w2_config) as w2:
            mid = await start_machine(w1.api_addrs[0])

            async def replicated() -> bool:
                got = await rows(w2, "SELECT id, app, state, worker FROM machines")
                return got == [(mid, "web", "started", "w1")]

            await wait_for(replicated, what="the machine's row on the plain node")
            assert w2.pending_schema.versions == 0
