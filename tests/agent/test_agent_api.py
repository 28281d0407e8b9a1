"""The HTTP API: corrosion's paths, statement forms, JSON shapes, NDJSON framing, errors, auth."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from agent_helpers import agent_config, rows

from corrosion import Agent, QueryError

pytestmark = pytest.mark.anyio


@pytest.fixture
async def node(tmp_path):
    async with Agent(agent_config(tmp_path, "api")) as agent:
        host, port = agent.api_addrs[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
            yield agent, client


@pytest.fixture
async def secured(tmp_path):
    cfg = agent_config(tmp_path, "sec", api={"authz": {"bearer-token": "s3cret"}})
    async with Agent(cfg) as agent:
        host, port = agent.api_addrs[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
            yield agent, client


def ndjson(resp: httpx.Response) -> list[dict]:
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert resp.text.endswith("\n")
    return [json.loads(line) for line in resp.text.splitlines()]


async def test_every_statement_form(node):
    agent, client = node
    resp = await client.post(
        "/v1/transactions",
        json=[
            "INSERT INTO kv (k, v) VALUES ('plain', 1)",
            ["INSERT INTO kv (k, v) VALUES (?, ?)", ["positional", 2]],
            ["INSERT INTO kv (k, v) VALUES (:k, :v)", {"k": "named", "v": 3}],
            {"query": "INSERT INTO kv (k, v) VALUES (?, ?)", "params": ["object", 4]},
            {
                "query": "INSERT INTO kv (k, v) VALUES (:k, :v)",
                "named_params": {"k": "objn", "v": 5},
            },
            ["INSERT INTO kv (k, v) VALUES (?, ?)", ["types", [1, 2, 255]]],
            ["UPDATE kv SET n = ? WHERE k = 'plain'", [True]],
        ],
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"results", "time", "version", "actor_id"}
    assert [r["rows_affected"] for r in body["results"]] == [1, 1, 1, 1, 1, 1, 1]
    assert all(isinstance(r["time"], float) for r in body["results"])
    assert body["version"] == 1 and body["actor_id"] == agent.actor_id.hex()
    assert await rows(agent, "SELECT k, v, n FROM kv ORDER BY k") == [
        ("named", 3, 0),
        ("object", 4, 0),
        ("objn", 5, 0),
        ("plain", 1, 1),
        ("positional", 2, 0),
        ("types", b"\x01\x02\xff", 0),
    ]
    # a transaction that changes nothing replicated gets no version
    resp = await client.post("/v1/transactions", json=["UPDATE kv SET v = v WHERE k = 'zzz'"])
    assert resp.json()["version"] is None


async def test_reads_in_a_transaction_affect_no_rows(node):
    """SQLite's changes() keeps the last write's count through a SELECT; the answer must not."""
    agent, client = node
    await agent.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", i]] for i in range(5)])
    resp = await client.post("/v1/transactions", json=["SELECT 1"])
    assert [r["rows_affected"] for r in resp.json()["results"]] == [0]
    resp = await client.post(
        "/v1/transactions",
        json=[
            "DELETE FROM kv WHERE v >= 2",
            "SELECT count(*) FROM kv",
            "UPDATE kv SET n = 1",
            "DELETE FROM kv WHERE k = 'none'",
            # one text, several statements: the writes' own rows, the read's none
            "UPDATE kv SET n = 2 WHERE v = 0; SELECT 1; UPDATE kv SET n = 3",
        ],
    )
    assert resp.status_code == 200, resp.text
    # the CRR triggers' clock rows are not counted, as in SQLite's changes()
    assert [r["rows_affected"] for r in resp.json()["results"]] == [3, 0, 2, 0, 3]


async def test_failing_statement_rolls_back_everything(node):
    agent, client = node
    resp = await client.post(
        "/v1/transactions",
        json=["INSERT INTO kv (k, v) VALUES ('a', 1)", "INSERT INTO nope VALUES (1)"],
    )
    assert resp.status_code == 500
    body = resp.json()
    assert "no such table: nope" in body["results"][0]["error"] and body["version"] is None
    assert set(body) == {"results", "time", "version", "actor_id"}  # corrosion's shape
    assert isinstance(body["time"], float) and body["time"] > 0  # the time it took
    assert await rows(agent, "SELECT count(*) FROM kv") == [(0,)]
    for bad in ([], "not a list", [{"params": [1]}], [["SELECT ?", "x"]], [42]):
        resp = await client.post("/v1/transactions", json=bad)
        assert resp.status_code == 400, bad
        assert "error" in resp.json()
    resp = await client.post("/v1/transactions", content=b"{not json")
    assert resp.status_code == 400
    resp = await client.post("/v1/transactions", json=["COMMIT"])
    assert resp.status_code == 400  # refused: a request is one transaction (test_agent_sqlguard)


async def test_a_body_of_no_statement_form_is_named_as_json_names_it(node):
    """What a client sent is described in JSON's words (a number, null), not Python's (int,
    NoneType), on each route that takes statements."""
    _, client = node
    named = {5: "a number", 2.5: "a number", None: "null", True: "a boolean"}
    for value, name in named.items():
        for path in ("/v1/queries", "/v1/subscriptions"):
            resp = await client.post(path, content=json.dumps(value))
            assert resp.status_code == 400, (path, value)
            assert resp.json() == {"error": f"a statement cannot be {name}"}, (path, value)
        resp = await client.post("/v1/transactions", content=json.dumps([value]))
        assert resp.json() == {"error": f"a statement cannot be {name}"}, value
        resp = await client.post("/v1/transactions", content=json.dumps(value))
        assert resp.json() == {"error": f"expected a JSON array of statements, got {name}"}
    for value, name in (({"query": "SELECT 1"}, "an object"), ("SELECT 1", "a string")):
        resp = await client.post("/v1/transactions", content=json.dumps(value))
        assert resp.json() == {"error": f"expected a JSON array of statements, got {name}"}
    resp = await client.post("/v1/transactions", content=b"[]")
    assert resp.status_code == 400 and "non-empty" in resp.json()["error"]


async def test_queries_stream_ndjson(node):
    agent, client = node
    await agent.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", i]] for i in range(600)])
    await agent.execute([["INSERT INTO kv (k, v) VALUES ('blob', ?)", [b"\x00\xff"]]])
    lines = ndjson(await client.post("/v1/queries", json="SELECT k, v FROM kv ORDER BY k"))
    assert lines[0] == {"columns": ["k", "v"]}
    assert "eoq" in lines[-1] and isinstance(lines[-1]["eoq"]["time"], float)
    data = lines[1:-1]
    assert len(data) == 601
    assert [d["row"][0] for d in data] == list(range(1, 602))
    assert data[0]["row"][1] == ["blob", [0, 255]]
    lines = ndjson(await client.post("/v1/queries", json=["SELECT v FROM kv WHERE k = ?", ["k7"]]))
    assert lines[1] == {"row": [1, [7]]}
    lines = ndjson(
        await client.post(
            "/v1/queries", json={"query": "SELECT :x AS x", "named_params": {"x": "y"}}
        )
    )
    assert lines[:2] == [{"columns": ["x"]}, {"row": [1, ["y"]]}]
    lines = ndjson(await client.post("/v1/queries", json="SELECT * FROM kv WHERE 0"))
    assert lines[0] == {"columns": ["k", "v", "n"]} and "eoq" in lines[1]


async def test_queries_encode_every_kind_of_value_as_corrosion(node):
    """Reals as Python writes them, big integers exactly, text ASCII-escaped, blobs as byte
    arrays, infinities as text: the exact bytes, through the fast encoder and its fallback."""
    _agent, client = node
    sql = (
        "SELECT 1.5, 1e16, 1e-05, 9223372036854775807, -9223372036854775808, 'é ☃ 𝄞', "
        "char(127) || 'a\"b\\' || char(9), x'00ff', NULL, 9e999, -9e999, 'plain', 42"
    )
    resp = await client.post("/v1/queries", json=sql)
    assert resp.status_code == 200
    assert resp.content.split(b"\n")[1] == (
        b'{"row":[1,[1.5,1e+16,1e-05,9223372036854775807,-9223372036854775808,'
        b'"\\u00e9 \\u2603 \\ud834\\udd1e","\\u007fa\\"b\\\\\\t",[0,255],null,"inf","-inf",'
        b'"plain",42]]}'
    )
    resp = await client.post("/v1/queries", json="SELECT 'plain', 42, x'01', NULL")
    assert resp.content.split(b"\n")[1] == b'{"row":[1,["plain",42,[1],null]]}'


async def test_queries_refuse_writes_and_bad_sql(node):
    agent, client = node
    for write in [
        "INSERT INTO kv (k) VALUES ('x')",
        "DELETE FROM kv",
        "CREATE TABLE z (a)",
        "UPDATE kv SET v = 1",
    ]:
        resp = await client.post("/v1/queries", json=write)
        assert resp.status_code == 400, write
        assert resp.json() == {
            "error": "statement is not readonly: writes go through POST /v1/transactions "
            "(corrosion exec)"
        }
    assert await rows(agent, "SELECT count(*) FROM kv") == [(0,)]
    resp = await client.post("/v1/queries", json="SELECT * FROM missing")
    assert resp.status_code == 400 and "no such table" in resp.json()["error"]
    resp = await client.post("/v1/queries", json="SELECT 1; SELECT 2")
    assert resp.status_code == 400


async def test_health_members_and_table_stats(node):
    agent, client = node
    resp = await client.get("/v1/health")
    assert resp.status_code == 200
    assert resp.json() == {
        "response": {
            "gaps": 0,
            "members": 0,
            "p99_lag": 0.0,
            "queue_size": 0,
            "pending_schema": {"versions": 0, "missing": {}},
            "not_in_schema": [],
            "schema": {  # no cluster schema version yet: the node runs its files
                "source": "cluster",
                "version": 0,
                "hash": "",
                "cluster_version": 0,
                "cluster_hash": "",
                "blocked": None,
                "drift": None,
                "losing_proposals": [],
            },
            "failed": [],
        }
    }
    agent.store.bookie.get(b"\x01" * 16).held.add(5, 5)  # versions 1..4 are now gaps
    resp = await client.get("/v1/health?gaps=3")
    assert resp.status_code == 503
    assert resp.json()["response"]["failed"] == ["gaps: 4 > 3"]
    assert (await client.get("/v1/health?gaps=4")).status_code == 200
    assert (await client.get("/v1/health?gaps=0&failure_status=500")).status_code == 500
    assert (await client.get("/v1/health?gaps=x")).status_code == 400
    # a misspelled threshold is refused, not ignored
    resp = await client.get("/v1/health?gapz=0")
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "'gapz'" in error
    for known in ("gaps", "max_queue", "p99_lag", "queue_size", "pending_schema", "failure_status"):
        assert known in error
    # a version committed 30 s ago at its origin and applied now: 30 s of lag
    agent.lag.record(time.time(), int((time.time() - 30) * 1000) << 16)
    lag = (await client.get("/v1/health")).json()["response"]["p99_lag"]
    assert 29 < lag < 60
    resp = await client.get("/v1/health?p99_lag=10&gaps=4")
    assert resp.status_code == 503
    assert resp.json()["response"]["failed"] == [f"p99_lag: {lag:g} > 10"]
    assert (await client.get("/v1/health?p99_lag=100")).status_code == 200
    # with queue_size, lag alone is not unhealthy while the queue is short
    assert (await client.get("/v1/health?p99_lag=10&queue_size=5")).status_code == 200
    (own,) = (await client.get("/v1/cluster/members")).json()
    assert (own["actor_id"], own["self"]) == (agent.actor_id.hex(), True)
    await agent.execute(["INSERT INTO kv (k) VALUES ('a')", "INSERT INTO items (id) VALUES (1)"])
    resp = await client.post("/v1/table_stats", json={"tables": ["kv", "items", "missing"]})
    assert resp.json() == {"total_row_count": 2, "invalid_tables": ["missing"]}


async def test_bearer_token(secured):
    _agent, client = secured
    assert (await client.get("/v1/health")).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert (await client.post("/v1/queries", json="SELECT 1", headers=bad)).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/v1/queries", json="SELECT 1", headers=ok)).status_code == 200


async def test_updates_stream_reports_changed_rows(tmp_path):
    from agent_helpers import seed_addr, wait_for

    a_cfg = agent_config(tmp_path, "u1")
    async with Agent(a_cfg) as a:
        b = Agent(agent_config(tmp_path, "u2", [seed_addr(a)], with_api=False))
        async with b:
            await wait_for(lambda: a.alive_members() == 1, what="the agents to meet")
            host, port = a.api_addrs[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
                assert (await client.post("/v1/updates/nope")).status_code == 404
                async with client.stream("POST", "/v1/updates/kv") as resp:
                    assert resp.status_code == 200
                    lines = resp.aiter_lines()
                    await a.execute(["INSERT INTO kv (k, v) VALUES ('local', 1)"])
                    assert json.loads(await lines.__anext__()) == {"notify": ["update", ["local"]]}
                    await b.execute(["INSERT INTO kv (k, v) VALUES ('remote', 2)"])
                    assert json.loads(await lines.__anext__()) == {"notify": ["update", ["remote"]]}
                    await a.execute(["DELETE FROM kv WHERE k = 'local'"])
                    assert json.loads(await lines.__anext__()) == {"notify": ["delete", ["local"]]}
                    await a.execute(["INSERT INTO items (id) VALUES (1)"])  # another table
                    await a.execute(["UPDATE kv SET v = 3 WHERE k = 'remote'"])
                    assert json.loads(await lines.__anext__()) == {"notify": ["update", ["remote"]]}
            await wait_for(lambda: not len(a.updates), what="the watcher to be released")


async def test_queries_report_an_error_after_rows_were_streamed(node):
    """A runtime error past the first batch ends the stream with an error line, not a torn
    response; the embedded query raises QueryError, not a raw SQLite error."""
    agent, client = node
    await agent.execute(
        [["INSERT INTO kv (k, n) VALUES (?, ?)", [f"k{i:04d}", i]] for i in range(1200)]
    )
    # abs() of the smallest integer overflows: only on the last row, well past 512 rows
    sql = (
        "SELECT k, abs(CASE WHEN n = 1199 THEN -9223372036854775808 ELSE n END) FROM kv ORDER BY k"
    )
    lines = ndjson(await client.post("/v1/queries", json=sql))
    assert lines[0] == {
        "columns": ["k", "abs(CASE WHEN n = 1199 THEN -9223372036854775808 ELSE n END)"]
    }
    assert all("row" in line for line in lines[1:-1]) and len(lines) - 2 >= 512
    assert "overflow" in lines[-1]["error"]
    with pytest.raises(QueryError, match="overflow"):
        async for _row in agent.query(sql):
            pass


async def test_queries_name_the_columns_of_the_current_schema(node, tmp_path):
    agent, client = node
    await agent.execute(["INSERT INTO kv (k, v) VALUES ('a', 1)"])
    first = ndjson(await client.post("/v1/queries", json="SELECT * FROM kv"))
    schema = tmp_path / "schema" / "schema.sql"
    schema.write_text(
        schema.read_text().replace("n INTEGER DEFAULT 0", "n INTEGER DEFAULT 0, extra TEXT")
    )
    assert await agent.reload_schema()
    again = ndjson(await client.post("/v1/queries", json="SELECT * FROM kv"))
    assert again[0]["columns"] == first[0]["columns"] + ["extra"]
    assert len(again[1]["row"][1]) == len(again[0]["columns"])
