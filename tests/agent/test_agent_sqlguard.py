"""The API cannot break a node: what clients' SQL may do (corrosion/core/sqlguard.py) and ?timeout=.

Every refused statement kind is sent through an authenticated ``POST /v1/transactions`` (or
``/v1/queries``): 400 with the remedy, nothing changed (tables, rows, bookkeeping, members, no
file), and the node starts again on the same database and config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import apsw
import httpx
import pytest
from agent_helpers import agent_config, rows

from corrosion import Agent, Config, QueryTimeout, TransactionRefused, TransactionTimeout

pytestmark = pytest.mark.anyio

TOKEN = "t0ken"
# counts to a billion: minutes of work, so only a timeout ends it
SLOW = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
    "SELECT count(*) FROM c"
)
MEMBER = (b"\x01" * 16, "127.0.0.1:1", "ALIVE", b"meta")
SCHEMA_REMEDY = "corrosion reload"
ONE_TX = "a request is one transaction already"

# (statements, what the error must say); {tmp} is the test's directory
REFUSED_TRANSACTIONS: list[tuple[list[Any], list[str]]] = [
    (["CREATE TABLE local_only (id INTEGER PRIMARY KEY, v TEXT)"], ["CREATE TABLE local_only"]),
    (["DROP TABLE kv"], ["DROP TABLE kv", "--allow-destructive"]),
    (["ALTER TABLE kv ADD COLUMN extra TEXT"], ["ALTER TABLE kv", SCHEMA_REMEDY]),
    (["CREATE INDEX kv_v ON kv (v)"], ["CREATE INDEX kv_v", SCHEMA_REMEDY]),
    (["DROP INDEX kv__crsql_clock_dbv_idx"], ["DROP INDEX", SCHEMA_REMEDY]),
    (["CREATE VIEW v AS SELECT k FROM kv"], ["CREATE VIEW v", SCHEMA_REMEDY]),
    (["CREATE TEMP TABLE scratch (a)"], ["CREATE TEMP TABLE scratch", SCHEMA_REMEDY]),
    (["CREATE TRIGGER tr AFTER INSERT ON kv BEGIN SELECT 1; END"], ["CREATE TRIGGER tr"]),
    (["CREATE VIRTUAL TABLE f USING fts5(body)"], ["CREATE VIRTUAL TABLE f"]),
    (["DELETE FROM __corro_members"], ["DELETE on __corro_members", "internal"]),
    (["UPDATE __corro_bookkeeping SET end_version = 99"], ["__corro_bookkeeping", "internal"]),
    (["UPDATE kv__crsql_clock SET col_version = 99"], ["kv__crsql_clock", "internal"]),
    (["DELETE FROM crsql_site_id"], ["crsql_site_id", "internal"]),
    (
        ["INSERT INTO crsql_changes VALUES ('kv', x'010b01', 'v', 1, 1, 1, NULL, 1, 0)"],
        ["crsql_changes", "internal"],
    ),
    (["UPDATE sqlite_master SET sql = ''"], ["sqlite_master", "internal"]),
    (["ATTACH DATABASE '{tmp}/attached.db' AS other"], ["ATTACH", "corrosion backup"]),
    (["DETACH DATABASE main"], ["DETACH"]),
    (["VACUUM"], ["VACUUM"]),
    (["VACUUM INTO '{tmp}/copy.db'"], ["VACUUM", "corrosion backup"]),
    (["PRAGMA journal_mode = DELETE"], ["PRAGMA journal_mode = DELETE"]),
    (["PRAGMA foreign_keys = ON"], ["PRAGMA foreign_keys = ON"]),
    (["PRAGMA writable_schema = ON"], ["PRAGMA writable_schema"]),
    (["PRAGMA user_version = 7"], ["PRAGMA user_version = 7"]),
    (["PRAGMA wal_checkpoint(TRUNCATE)"], ["PRAGMA wal_checkpoint"]),
    (["ANALYZE"], ["ANALYZE"]),
    (["REINDEX"], ["REINDEX"]),
    (["BEGIN"], ["BEGIN", ONE_TX]),
    (["COMMIT"], ["COMMIT", ONE_TX]),
    (["ROLLBACK"], ["ROLLBACK", ONE_TX]),
    (["SAVEPOINT s"], ["SAVEPOINT", ONE_TX]),
    (["SELECT crsql_as_crr('kv')"], ["crsql_as_crr()"]),
    (["SELECT crsql_begin_alter('kv')"], ["crsql_begin_alter()"]),
    (["SELECT crsql_config_set('merge-equal-values', 0)"], ["crsql_config_set()"]),
    (["SELECT crsql_internal_sync_bit(1)"], ["crsql_internal_sync_bit()"]),
    (["SELECT crsql_next_db_version()"], ["crsql_next_db_version()"]),
    # a CTE named like a CRR trigger does not pass for one
    (
        [
            "WITH kv__crsql_itrig AS (SELECT crsql_internal_sync_bit(1)) "
            "SELECT * FROM kv__crsql_itrig"
        ],
        ["crsql_internal_sync_bit()"],
    ),
    (["SELECT load_extension('x')"], ["load_extension()"]),
    # the agent's own statement, word for word (prepared unchecked, cached): refused all the same
    (
        [
            [
                "INSERT OR REPLACE INTO __corro_members (actor_id, address, state, meta, "
                "updated_at) VALUES (?, ?, ?, ?, ?)",
                [[2] * 16, "10.0.0.1:1", "ALIVE", [1], 1],
            ]
        ],
        ["__corro_members", "internal"],
    ),
    # the refusal of a later statement undoes the earlier ones
    (
        ["INSERT INTO kv (k, v) VALUES ('first', 1)", "CREATE TABLE later (a)"],
        ["CREATE TABLE later"],
    ),
]


def _ids(cases: list[tuple[list[Any], list[str]]]) -> list[str]:
    return [" ; ".join(s if isinstance(s, str) else s[0] for s in stmts)[:60] for stmts, _ in cases]


def _fill(statements: list[Any], tmp: Path) -> list[Any]:
    return [s.replace("{tmp}", str(tmp)) if isinstance(s, str) else s for s in statements]


def _client(agent: Agent) -> httpx.AsyncClient:
    host, port = agent.api_addrs[0]
    return httpx.AsyncClient(
        base_url=f"http://{host}:{port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )


def _config(tmp: Path, **api: Any) -> Config:
    return agent_config(tmp, "guard", api={"authz": {"bearer-token": TOKEN}, **api})


async def _seed(agent: Agent) -> None:
    await agent.execute(
        ["INSERT INTO kv (k, v) VALUES ('kept', 1)", "INSERT INTO items (id) VALUES (1)"]
    )
    store = agent.store
    assert store is not None
    async with agent.db_lock:
        await anyio.to_thread.run_sync(store.save_member, *MEMBER)


async def _state(agent: Agent) -> dict[str, list[tuple]]:
    """What a refused statement must leave as it was."""
    return {
        "schema": await rows(agent, "SELECT type, name, sql FROM sqlite_schema ORDER BY name"),
        "kv": await rows(agent, "SELECT * FROM kv ORDER BY k"),
        "clock": await rows(agent, "SELECT * FROM kv__crsql_clock ORDER BY key, col_name"),
        "members": await rows(agent, "SELECT actor_id, address, meta FROM __corro_members"),
        "booked": await rows(agent, "SELECT * FROM __corro_bookkeeping ORDER BY start_version"),
        "pragmas": await rows(agent, "SELECT * FROM pragma_user_version, pragma_journal_mode"),
    }


@pytest.mark.parametrize(
    ("statements", "says"), REFUSED_TRANSACTIONS, ids=_ids(REFUSED_TRANSACTIONS)
)
async def test_refused_transaction_changes_nothing_and_node_restarts(tmp_path, statements, says):
    cfg = _config(tmp_path)
    async with Agent(cfg) as agent:
        await _seed(agent)
        before = await _state(agent)
        files_before = sorted(p.name for p in tmp_path.iterdir())
        async with _client(agent) as client:
            resp = await client.post("/v1/transactions", json=_fill(statements, tmp_path))
        assert resp.status_code == 400, resp.text
        body = resp.json()
        assert body["version"] is None and body["actor_id"] == agent.actor_id.hex()
        error = body["results"][0]["error"]
        for part in says:
            assert part in error, error
        assert await _state(agent) == before
        # the same through the embedded API
        with pytest.raises(TransactionRefused):
            await agent.execute(_fill(statements, tmp_path))
        assert await _state(agent) == before
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == files_before
    )  # no ATTACH / VACUUM INTO file
    async with Agent(cfg) as again:
        assert await _state(again) == before
        await again.execute(["INSERT INTO kv (k, v) VALUES ('after', 2)"])
        assert await rows(again, "SELECT v FROM kv WHERE k = 'after'") == [(2,)]


async def test_write_to_a_table_that_does_not_replicate_is_refused(tmp_path):
    async with Agent(_config(tmp_path)) as agent:
        # a table made behind the agent's back (not in the schema files)
        raw = apsw.Connection(str(agent.config.db.path))
        raw.execute("CREATE TABLE local_only (a INTEGER PRIMARY KEY, b TEXT)")
        raw.close()
        async with _client(agent) as client:
            for sql in [
                "INSERT INTO local_only VALUES (1, 'x')",
                "UPDATE local_only SET b = 'y'",
                "DELETE FROM local_only",
            ]:
                resp = await client.post("/v1/transactions", json=[sql])
                assert resp.status_code == 400, sql
                error = resp.json()["results"][0]["error"]
                assert "local_only is not one" in error and "schema files" in error
            # reading it is fine
            resp = await client.post("/v1/transactions", json=["SELECT * FROM local_only"])
            assert resp.status_code == 200
        assert await rows(agent, "SELECT count(*) FROM local_only") == [(0,)]


async def test_dml_on_replicated_tables_still_works(tmp_path):
    async with Agent(_config(tmp_path)) as agent:
        await _seed(agent)
        async with _client(agent) as client:
            resp = await client.post(
                "/v1/transactions",
                json=[
                    "INSERT INTO kv (k, v) VALUES ('a', 1)",
                    "INSERT INTO kv (k, v) VALUES ('a', 2) "
                    "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                    "REPLACE INTO kv (k, v) VALUES ('b', 3)",
                    "INSERT OR REPLACE INTO kv (k, v) VALUES ('b', 4)",
                    # reading internal tables (and a CTE) to write a replicated one
                    "INSERT INTO kv (k, v) SELECT 'members', count(*) FROM __corro_members",
                    "WITH n(x) AS (SELECT 10) INSERT INTO items (id, body) SELECT x, 'cte' FROM n",
                    "UPDATE items SET owner = 'me' WHERE id IN (SELECT id FROM items)",
                    "DELETE FROM items WHERE id = 1",
                    "INSERT INTO kv (k, v) VALUES ('ret', 5) RETURNING k",
                    # reads inside the transaction
                    "SELECT count(*) FROM kv",
                    "SELECT * FROM __corro_bookkeeping",
                    "PRAGMA table_info(kv)",
                    "SELECT crsql_db_version(), crsql_site_id()",
                ],
            )
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["version"] == 2  # _seed wrote version 1
            assert [r["rows_affected"] for r in body["results"]][:4] == [1, 1, 1, 1]
        assert await rows(agent, "SELECT k, v FROM kv ORDER BY k") == [
            ("a", 2),
            ("b", 4),
            ("kept", 1),
            ("members", 1),
            ("ret", 5),
        ]
        assert await rows(agent, "SELECT id, body, owner FROM items") == [(10, "cte", "me")]
        # the triggers still recorded every change: the clock tables have them
        changed = await rows(
            agent, "SELECT DISTINCT db_version FROM kv__crsql_clock ORDER BY db_version"
        )
        assert changed == [(1,), (2,)]


NOT_READONLY = "statement is not readonly"
WRITE_IN_A_QUERY = (
    "statement is not readonly: writes go through POST /v1/transactions (corrosion exec)"
)
REFUSED_QUERIES: list[tuple[str, str]] = [
    ("ATTACH DATABASE '{tmp}/attached.db' AS other", "ATTACH"),
    ("VACUUM INTO '{tmp}/copy.db'", NOT_READONLY),  # SQLite: it writes
    ("PRAGMA foreign_keys = OFF", "PRAGMA foreign_keys = OFF"),
    ("PRAGMA case_sensitive_like = ON", "PRAGMA case_sensitive_like"),
    ("BEGIN", "not allowed in a query"),
    ("SAVEPOINT s", "not allowed in a query"),
    ("SELECT crsql_as_crr('kv')", "crsql_as_crr()"),
    ("INSERT INTO kv (k) VALUES ('x')", NOT_READONLY),
    ("CREATE TABLE z (a)", NOT_READONLY),
]


@pytest.mark.parametrize(("sql", "says"), REFUSED_QUERIES, ids=[q for q, _ in REFUSED_QUERIES])
async def test_refused_query(tmp_path, sql, says):
    async with Agent(_config(tmp_path)) as agent:
        await _seed(agent)
        before = await _state(agent)
        files_before = sorted(p.name for p in tmp_path.iterdir())
        sql = sql.replace("{tmp}", str(tmp_path))
        async with _client(agent) as client:
            resp = await client.post("/v1/queries", json=sql)
            assert resp.status_code == 400, resp.text
            assert says in resp.json()["error"]
            if says == NOT_READONLY:  # corrosion's words first, then what to do instead
                assert resp.json()["error"] == WRITE_IN_A_QUERY
            resp = await client.post("/v1/subscriptions", json=sql)
            assert resp.status_code == 400, resp.text
            if says == NOT_READONLY:
                assert resp.json()["error"] == WRITE_IN_A_QUERY
            # the pooled read connections are as they were: reads work, foreign keys still on
            resp = await client.post("/v1/queries", json="PRAGMA foreign_keys")
            assert resp.status_code == 200 and '"row":[1,[0]]' in resp.text.replace(" ", "")
        assert await _state(agent) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before


async def test_reading_pragmas_and_internal_tables_in_queries(tmp_path):
    async with Agent(_config(tmp_path)) as agent:
        await _seed(agent)
        async with _client(agent) as client:
            for sql in [
                "PRAGMA table_info(kv)",
                "SELECT name FROM pragma_table_info('kv')",
                "PRAGMA user_version",
                "SELECT * FROM pragma_page_count",
                "SELECT count(*) FROM __corro_members",
                "SELECT * FROM crsql_changes",
            ]:
                resp = await client.post("/v1/queries", json=sql)
                assert resp.status_code == 200, (sql, resp.text)
                assert '"eoq"' in resp.text, sql


async def test_query_timeout(tmp_path):
    async with Agent(_config(tmp_path)) as agent:
        async with _client(agent) as client:
            resp = await client.post("/v1/queries?timeout=0.2", json=SLOW)
            assert resp.status_code == 500
            assert resp.json()["error"] == (
                "the query did not finish within its timeout of 0.2 s and was interrupted (the "
                "timeout parameter sets it: ?timeout= or --timeout, default api.query_timeout; "
                "0 for none)"
            )
            for bad in ("abc", "-1", "inf", "nan"):
                resp = await client.post(f"/v1/queries?timeout={bad}", json="SELECT 1")
                assert resp.status_code == 400 and "timeout" in resp.json()["error"], bad
            # 0 is "no limit": a quick query is unaffected
            resp = await client.post("/v1/queries?timeout=0", json="SELECT 1")
            assert resp.status_code == 200 and '"row"' in resp.text
            # the reader that was interrupted serves the next query
            resp = await client.post("/v1/queries", json="SELECT count(*) FROM kv")
            assert resp.status_code == 200
        with pytest.raises(QueryTimeout):
            await rows_with_timeout(agent, SLOW, 0.2)


async def rows_with_timeout(agent: Agent, sql: str, timeout: float) -> list[tuple]:
    return [r async for r in agent.query(sql, timeout=timeout)]


async def test_query_timeout_default_comes_from_config(tmp_path):
    async with Agent(_config(tmp_path, query_timeout=0.2)) as agent, _client(agent) as client:
        resp = await client.post("/v1/queries", json=SLOW)
        assert resp.status_code == 500 and "timeout of 0.2 s" in resp.json()["error"]
        resp = await client.post("/v1/subscriptions", json=SLOW)
        assert resp.status_code == 400 and "timeout of 0.2 s" in resp.json()["error"]
        assert "(api.query_timeout sets it; 0 for none)" in resp.json()["error"]


async def test_timed_out_transaction_changes_nothing(tmp_path):
    async with Agent(_config(tmp_path)) as agent:
        await _seed(agent)
        before = await _state(agent)
        statements = [
            "INSERT INTO kv (k, v) VALUES ('written', 1)",
            "UPDATE kv SET v = 100 WHERE k = 'kept'",
            f"INSERT INTO items (id, body) SELECT 2, ({SLOW})",
        ]
        async with _client(agent) as client:
            resp = await client.post("/v1/transactions?timeout=0.2", json=statements)
            assert resp.status_code == 500
            body = resp.json()
            assert body["version"] is None
            assert "timeout of 0.2 s" in body["results"][0]["error"]
            assert "nothing was applied" in body["results"][0]["error"]
            # the time it ran before the deadline stopped it, not a made-up 0.0
            assert body["time"] >= 0.2
            assert await _state(agent) == before
            # the writer and its lock are free again, and the bookkeeping goes on from version 1
            resp = await client.post(
                "/v1/transactions", json=["INSERT INTO kv (k) VALUES ('next')"]
            )
            assert resp.status_code == 200 and resp.json()["version"] == 2
            resp = await client.post("/v1/transactions?timeout=x", json=["SELECT 1"])
            assert resp.status_code == 400
        with pytest.raises(TransactionTimeout):
            await agent.execute(statements, timeout=0.2)
        with pytest.raises(TransactionTimeout):
            await agent.execute_commit(statements, timeout=0.2)
        assert await rows(agent, "SELECT k FROM kv ORDER BY k") == [("kept",), ("next",)]
        assert await rows(agent, "SELECT max(end_version) FROM __corro_bookkeeping") == [(2,)]


async def test_transaction_timeout_default_comes_from_config(tmp_path):
    async with Agent(_config(tmp_path, transaction_timeout=0.2)) as agent:
        with pytest.raises(TransactionTimeout):
            await agent.execute([f"INSERT INTO items (id, body) SELECT 2, ({SLOW})"])
        # None: no limit for this call (a quick one)
        await agent.execute(["INSERT INTO items (id) VALUES (3)"], timeout=None)
        assert await rows(agent, "SELECT id FROM items") == [(3,)]
