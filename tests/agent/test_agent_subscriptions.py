"""/v1/subscriptions: a query's rows, then its changes (local and replicated), resumable."""

from __future__ import annotations

import json

import httpx
import pytest
from agent_helpers import agent_config, seed_addr
from support import wait_for

from corrosion import Agent
from corrosion.runtime.subscriptions import Subscription, normalize_sql

pytestmark = pytest.mark.anyio


async def next_json(lines) -> dict:
    return json.loads(await lines.__anext__())


async def test_subscription_streams_rows_then_changes(tmp_path):
    async with Agent(agent_config(tmp_path, "s1")) as a:
        b = Agent(agent_config(tmp_path, "s2", [seed_addr(a)], with_api=False))
        async with b:
            await wait_for(lambda: a.alive_members() == 1, what="the agents to meet")
            await a.execute(["INSERT INTO kv (k, v) VALUES ('a', 1), ('b', 2)"])
            host, port = a.api_addrs[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as c:
                sql = ["SELECT k, v FROM kv WHERE v > ?", [0]]
                async with c.stream("POST", "/v1/subscriptions", json=sql) as resp:
                    assert resp.status_code == 200
                    sid = resp.headers["corro-query-id"]
                    lines = resp.aiter_lines()
                    assert await next_json(lines) == {"columns": ["k", "v"]}
                    assert await next_json(lines) == {"row": [1, ["a", 1]]}
                    assert await next_json(lines) == {"row": [2, ["b", 2]]}
                    eoq = await next_json(lines)
                    assert eoq["eoq"]["change_id"] == 0
                    await a.execute(["UPDATE kv SET v = 10 WHERE k = 'a'"])
                    assert await next_json(lines) == {"change": ["update", 1, ["a", 10], 1]}
                    await b.execute(["INSERT INTO kv (k, v) VALUES ('c', 3)"])  # replicated
                    assert await next_json(lines) == {"change": ["insert", 3, ["c", 3], 2]}
                    await a.execute(["UPDATE kv SET v = -1 WHERE k = 'b'"])  # leaves the result
                    assert await next_json(lines) == {"change": ["delete", 2, ["b", 2], 3]}
                    await a.execute(["INSERT INTO items (id) VALUES (1)"])  # not read: no event
                    await a.execute(["DELETE FROM kv WHERE k = 'c'"])
                    assert await next_json(lines) == {"change": ["delete", 3, ["c", 3], 4]}
                # the same query shares the subscription; resume from a change id
                async with c.stream("GET", f"/v1/subscriptions/{sid}?from=2") as resp:
                    lines = resp.aiter_lines()
                    assert await next_json(lines) == {"change": ["delete", 2, ["b", 2], 3]}
                    assert await next_json(lines) == {"change": ["delete", 3, ["c", 3], 4]}
                assert (await c.get("/v1/subscriptions/nope")).status_code == 404
                resp = await c.post("/v1/subscriptions", json="DELETE FROM kv")
                assert resp.status_code == 400 and "readonly" in resp.json()["error"]
                resp = await c.post("/v1/subscriptions", json="SELECT * FROM missing")
                assert resp.status_code == 400


def test_rows_without_keys_are_identified_by_content():
    sub = Subscription("x", "", (), ["v"], {"kv"}, None)
    sub.load([(1,), (1,), (2,)])
    events = sub.diff([(1,), (3,)])
    assert [(e.kind, e.row) for e in events] == [
        ("delete", (1,)),
        ("delete", (2,)),
        ("insert", (3,)),
    ]
    assert sorted(sub.rows.values()) == [(1,), (3,)]
    keyed = Subscription("y", "", (), ["k", "v"], {"kv"}, [0])
    keyed.load([("a", 1)])
    assert [(e.kind, e.rowid) for e in keyed.diff([("a", 1.0)])] == [("update", 1)]


async def test_query_hash_is_the_normalised_sql_not_the_subscription_id(tmp_path):
    """corro-query-hash: the same normalised SQL (and parameters) gives the same hash, on any
    agent; two spellings of it share one subscription; other SQL or parameters differ."""

    async def open_sub(client: httpx.AsyncClient, statement) -> tuple[str, str]:
        async with client.stream("POST", "/v1/subscriptions", json=statement) as resp:
            assert resp.status_code == 200
            return resp.headers["corro-query-id"], resp.headers["corro-query-hash"]

    async with Agent(agent_config(tmp_path, "h1")) as a, Agent(agent_config(tmp_path, "h2")) as b:
        urls = [f"http://{h}:{p}" for h, p in (a.api_addrs[0], b.api_addrs[0])]
        async with (
            httpx.AsyncClient(base_url=urls[0], timeout=30) as ca,
            httpx.AsyncClient(base_url=urls[1], timeout=30) as cb,
        ):
            sid, h = await open_sub(ca, "SELECT k, v FROM kv WHERE v > 1")
            assert h != sid and len(h) == 32
            respelled = "SELECT k,v\n  FROM kv -- the same query\n WHERE v>1 ;"
            assert await open_sub(ca, respelled) == (sid, h)  # shared
            other_id, other_hash = await open_sub(cb, respelled)
            assert other_hash == h and other_id != sid  # another agent, the same hash
            different = [
                "SELECT k, v FROM kv WHERE v > 2",
                "select k, v from kv where v > 1",  # keyword case shows in column names
                ["SELECT k, v FROM kv WHERE v > ?", [1]],
                ["SELECT k, v FROM kv WHERE v > ?", [2]],
                "SELECT k, v FROM kv WHERE v > 1 AND k != 'a  b'",
                "SELECT k, v FROM kv WHERE v > 1 AND k != 'a b'",
            ]
            hashes = {h} | {(await open_sub(ca, s))[1] for s in different}
            assert len(hashes) == 1 + len(different)


def test_normalize_sql_keeps_what_changes_the_meaning():
    assert normalize_sql("SELECT  a.b ,c\n/* x */FROM t -- y\n;;") == "SELECT a.b,c FROM t"
    assert normalize_sql("SELECT a.b, c FROM t") == "SELECT a.b,c FROM t"
    # a blob literal is not a column aliased by a string; 1e3 is not 1 aliased e3
    assert normalize_sql("SELECT x'00'") != normalize_sql("SELECT x '00'")
    assert normalize_sql("SELECT 1e3") != normalize_sql("SELECT 1 e3")
    assert normalize_sql("SELECT 'a  -- b'") == "SELECT 'a  -- b'"
    assert normalize_sql('SELECT "a  b" FROM [t  u]') == 'SELECT "a  b" FROM [t  u]'
