"""The cluster schema on real agents on loopback: a schema version proposed on one node reaches
the others and data for its new column flows with no per-node reload; a concurrent proposal is
refused with a message naming the winner; a node down during the change catches up on restart;
a version a node cannot apply stops it loudly without stopping replication."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest
from agent_helpers import SCHEMA, agent_config, cluster, rows, seed_addr
from support import wait_for

from corrosion import Agent, TransactionRefused
from corrosion.core.cluster_schema import ProposalRefused
from corrosion.runtime.schema_flow import SchemaConflict
from corrosion.surfaces.metrics import collect, render, table_rows

pytestmark = pytest.mark.anyio

WITH_COLOR = SCHEMA.replace("n INTEGER DEFAULT 0)", "n INTEGER DEFAULT 0, color TEXT)")
WITH_SIZE = SCHEMA.replace("n INTEGER DEFAULT 0)", "n INTEGER DEFAULT 0, size INTEGER)")


def columns(agent: Agent, table: str = "kv") -> list[str]:
    assert agent.store is not None
    return [r[1] for r in agent.store.conn.execute(f"PRAGMA table_info({table})")]


async def table_rows_of(agent: Agent) -> dict[str, int]:
    return await anyio.to_thread.run_sync(table_rows, agent)


def runs(agent: Agent) -> int:
    return agent.schema.status.running.version


async def test_a_schema_change_reaches_every_node_and_its_column_replicates(tmp_path):
    async with cluster(tmp_path, 3) as (a, b, c):
        result = await a.schema.propose(WITH_COLOR, wait=60)
        assert result["new"] and result["version"] == 1 and result["unconfirmed"] == []
        assert result["changes"] == ["added column kv.color"]
        for x in (a, b, c):  # confirmed: every member runs it, no reload anywhere
            assert runs(x) == 1 and "color" in columns(x)
        await a.execute([["INSERT INTO kv (k, v, color) VALUES ('x', 1, 'red')", []]])
        await c.execute([["INSERT INTO kv (k, v, color) VALUES ('y', 2, 'blue')", []]])
        for x in (a, b, c):
            await wait_for(
                lambda x=x: rows(x, "SELECT k, color FROM kv ORDER BY k"),
                what="the new column's data everywhere",
            )
        await wait_for(
            lambda: all(
                x.store.conn.execute("SELECT k, color FROM kv ORDER BY k").fetchall()
                == [("x", "red"), ("y", "blue")]
                for x in (a, b, c)
            ),
            what="the new column's data on every node",
        )
        # each node reports the version it runs: health, metrics, cluster members
        async with httpx.AsyncClient(
            base_url=f"http://{b.api_addrs[0][0]}:{b.api_addrs[0][1]}"
        ) as h:
            health = (await h.get("/v1/health")).json()["response"]
            assert health["schema"]["version"] == 1 and health["schema"]["blocked"] is None
            shown = (await h.get("/v1/schema")).json()
            assert "color TEXT" in shown["schema"]
        assert "\ncorro_schema_version 1\n" in render(collect(b))
        await wait_for(
            lambda: {m.schema_version for m in b.members()} == {1},
            what="every member to advertise version 1",
        )
        # the versions table is the agent's: clients cannot write or drop it
        for sql in ("DELETE FROM __corro_schema_versions", "DROP TABLE __corro_schema_versions"):
            with pytest.raises(TransactionRefused, match="not allowed"):
                await b.execute([[sql, []]])
        assert "__corro_schema_versions" not in await table_rows_of(b)
        # the same text again is no new version
        again = await b.schema.propose(WITH_COLOR)
        assert not again["new"] and again["version"] == 1


async def test_a_concurrent_proposal_is_refused_and_names_the_winner(tmp_path):
    async with cluster(tmp_path, 2) as (a, b):
        b.faults.isolated = True  # a partition: both propose version 1 without seeing the other
        await wait_for(lambda: a.alive_members() == 0, what="a to see b down")
        first = await a.schema.propose(WITH_COLOR)
        assert first["version"] == 1

        refused: list[SchemaConflict] = []

        async def propose_on_b() -> None:
            try:
                await b.schema.propose(WITH_SIZE, wait=120)
            except SchemaConflict as exc:
                refused.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(propose_on_b)
            await wait_for(lambda: "size" in columns(b), what="b's own proposal to apply on b")
            b.faults.isolated = False  # heal: each side learns the other's version 1
        assert refused, "b's proposal was not refused"
        message = str(refused[0])
        assert "schema version 1 went to a concurrent proposal" in message
        assert a.actor_id.hex() in message and "re-base" in message
        # b moved to the winner: the loser's column is gone, the winner's is there
        await wait_for(lambda: "color" in columns(b), what="b to run the winner")
        assert "size" not in columns(b) and "size" not in columns(a)
        assert runs(a) == runs(b) == 1
        assert a.schema.status.running == b.schema.status.running
        await b.execute([["INSERT INTO kv (k, v, color) VALUES ('z', 1, 'green')", []]])
        await wait_for(
            lambda: (
                a.store.conn.execute("SELECT color FROM kv WHERE k = 'z'").fetchall()
                == [("green",)]
            ),
            what="data for the winner's column from the former loser",
        )
        # a proposal on top of the winner goes through
        both = WITH_COLOR.replace("color TEXT)", "color TEXT, size INTEGER)")
        rebased = await b.schema.propose(both, wait=60)
        assert rebased["version"] == 2 and rebased["unconfirmed"] == []


async def test_a_node_down_during_the_change_catches_up_on_restart(tmp_path):
    async with cluster(tmp_path, 2) as (a, _b):
        await a.schema.propose(SCHEMA, wait=60)
        cfg_c = agent_config(tmp_path, "n2", [seed_addr(a)])
        async with Agent(cfg_c) as c:
            await wait_for(lambda: runs(c) == 1, what="c to run version 1")
        # c is down: the change and writes to the new column happen without it
        result = await a.schema.propose(WITH_COLOR, wait=60)
        assert result["version"] == 2 and result["unconfirmed"] == []  # c left: not waited for
        await a.execute([["INSERT INTO kv (k, v, color) VALUES ('x', 1, 'red')", []]])
        async with Agent(agent_config(tmp_path, "n2", [seed_addr(a)])) as c:
            # its files still say version 1's schema: it follows the cluster, and says so
            await wait_for(lambda: runs(c) == 2, what="c to catch up on the schema")
            await wait_for(
                lambda: c.store.conn.execute("SELECT color FROM kv").fetchall() == [("red",)],
                what="c to receive the new column's data",
            )
            assert c.schema.status.drift is not None
            assert c.pending_schema.versions == 0


async def test_a_version_a_node_cannot_apply_stops_it_loudly_and_replication_goes_on(
    tmp_path, caplog
):
    async with cluster(tmp_path, 2) as (a, b):
        await a.schema.propose(SCHEMA, wait=60)
        # a table of the same name made on b behind the agent's back, with a column version 2
        # does not have: applying version 2 there would drop it, which it may not
        async with b.db_lock:
            with b.store.conn:
                b.store.conn.execute("CREATE TABLE extra (id INTEGER PRIMARY KEY, x TEXT)")
        caplog.set_level(logging.ERROR, "corrosion.schema")
        extra = "CREATE TABLE extra (id INTEGER NOT NULL PRIMARY KEY, y TEXT NOT NULL DEFAULT '');"
        await a.schema.propose(SCHEMA + extra + WITH_COLOR.replace("kv (", "kv2 (", 1))
        await wait_for(lambda: b.schema.status.blocked is not None, what="b to stop on v2")
        assert "cannot apply version 2" in b.schema.status.blocked
        assert any("cluster schema stopped" in r.getMessage() for r in caplog.records)
        async with httpx.AsyncClient(
            base_url=f"http://{b.api_addrs[0][0]}:{b.api_addrs[0][1]}"
        ) as h:
            resp = await h.get("/v1/health")
            assert resp.status_code == 503 and "schema:" in resp.json()["response"]["failed"][0]
        assert "\ncorro_schema_blocked 1\n" in render(collect(b))
        # replication of what b can serve goes on; what needs v2 is kept, not lost
        await a.execute([["INSERT INTO kv (k, v) VALUES ('after', 1)", []]])
        await a.execute([["INSERT INTO kv2 (k, v) VALUES ('new', 1)", []]])
        await wait_for(
            lambda: b.store.conn.execute("SELECT k FROM kv").fetchall() == [("after",)],
            what="b to go on replicating kv",
        )
        await wait_for(lambda: b.pending_schema.versions == 1, what="b to keep the kv2 write")
        with pytest.raises(ProposalRefused, match="must apply that first"):
            await b.schema.propose(SCHEMA + "CREATE TABLE other (id INTEGER NOT NULL PRIMARY KEY);")
        # the operator removes the obstacle; the next proposal (or reload, or restart) retries
        async with b.db_lock:
            with b.store.conn:
                b.store.conn.execute("DROP TABLE extra")
        head = a.schema.status.head
        assert head is not None
        again = await b.schema.propose(head.sql)
        assert not again["new"] and again["version"] == 2
        assert b.schema.status.blocked is None and runs(b) == 2
        assert b.pending_schema.versions == 0
        assert b.store.conn.execute("SELECT k FROM kv2").fetchall() == [("new",)]


async def test_a_files_node_records_the_cluster_schema_but_follows_its_files(tmp_path):
    async with cluster(tmp_path, 1) as (a,):
        files_node = agent_config(tmp_path, "n1", [seed_addr(a)], db={"schema_source": "files"})
        async with Agent(files_node) as b:
            await wait_for(lambda: a.alive_members() == 1, what="b to join")
            await a.schema.propose(WITH_COLOR, wait=1)
            await a.execute([["INSERT INTO kv (k, v, color) VALUES ('x', 1, 'red')", []]])
            await wait_for(
                lambda: b.schema.status.head is not None and b.schema.status.drift is not None,
                what="b to record version 1 and see its files differ",
            )
            assert "(db.schema_source = 'files'" in b.schema.status.drift
            assert runs(b) == 0 and "color" not in columns(b)
            await wait_for(lambda: b.pending_schema.versions == 1, what="b to keep the write")
            health = b.schema.status.to_json()
            assert health["source"] == "files" and health["cluster_version"] == 1
