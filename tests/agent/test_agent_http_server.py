"""The agent's HTTP listeners on asyncio, uvloop and trio (hypercorn): an embedded agent answers
real requests on one kept-alive connection, and every accepted connection has TCP_NODELAY —
without it each response written in several pieces waits for the client's delayed ACK (~23
requests/s per connection). The Machines API is served on the API's listener."""

from __future__ import annotations

import contextlib
import json
import sys
import threading

import anyio
import httpx
import pytest
from agent_helpers import agent_config
from support import wait_for

from corrosion import Agent

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request):
    if request.param[0] == "asyncio" and request.param != "asyncio":
        pytest.importorskip("uvloop")
    return request.param


async def test_api_answers_keepalive_requests_on_a_nodelay_connection(tmp_path, accepted_nodelay):
    async with Agent(agent_config(tmp_path, "a")) as agent:
        host, port = agent.api_addrs[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
            r = await client.post(
                "/v1/transactions", json=[["INSERT INTO kv (k, v) VALUES (?, ?)", ["x", 1]]]
            )
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 1
            peer = r.extensions["network_stream"].get_extra_info("client_addr")
            assert accepted_nodelay(peer) is True

            r = await client.post("/v1/queries", json="SELECT k, v FROM kv")
            assert r.status_code == 200, r.text
            lines = [json.loads(line) for line in r.text.splitlines()]
            assert lines[0] == {"columns": ["k", "v"]} and lines[1] == {"row": [1, ["x", 1]]}
            assert "eoq" in lines[2]
            r = await client.get("/v1/health")
            assert r.status_code == 200 and r.json()["response"]["gaps"] == 0
            # all three on the connection of the first: kept alive
            assert r.extensions["network_stream"].get_extra_info("client_addr") == peer


async def test_query_results_small_with_a_length_large_streamed(tmp_path):
    async with Agent(agent_config(tmp_path, "q")) as agent:
        await agent.execute(
            [["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i:05d}", "x" * 100]] for i in range(2000)]
        )
        host, port = agent.api_addrs[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
            small = await client.post("/v1/queries", json="SELECT k FROM kv WHERE k = 'k00007'")
            assert small.headers["content-length"] == str(len(small.content))
            assert small.text.splitlines()[1] == '{"row":[1,["k00007"]]}'
            large = await client.post("/v1/queries", json="SELECT k, v FROM kv ORDER BY k")
            assert "content-length" not in large.headers  # ~250 KiB: streamed, chunked
            lines = [json.loads(line) for line in large.text.splitlines()]
            rows = [line["row"] for line in lines[1:-1]]
            assert rows == [[i + 1, [f"k{i:05d}", "x" * 100]] for i in range(2000)]
            assert "eoq" in lines[-1]


async def test_a_client_leaving_a_large_result_stops_its_reading(tmp_path):
    """A client that goes away after the first line of a large result: the agent stops reading
    it ahead (its thread ends) and answers the next query."""
    async with Agent(agent_config(tmp_path, "q")) as agent:
        for start in range(0, 20_000, 5_000):
            await agent.execute(
                [
                    ["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i:05d}", "x" * 100]]
                    for i in range(start, start + 5_000)
                ]
            )
        host, port = agent.api_addrs[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
            sql = "SELECT k, v FROM kv ORDER BY k"
            async with client.stream("POST", "/v1/queries", json=sql) as resp:
                assert json.loads(await resp.aiter_lines().__anext__()) == {"columns": ["k", "v"]}
            await wait_for(
                lambda: not any(t.name == "corrosion-feed" for t in threading.enumerate()),
                what="the read-ahead thread to end",
            )
            r = await client.post("/v1/queries", json="SELECT count(*) FROM kv")
            assert r.text.splitlines()[1] == '{"row":[1,[20000]]}'


async def test_api_stops_with_a_stream_open(tmp_path):
    """An open /v1/updates stream (it never ends by itself) does not hold up the agent's
    shutdown, and the client sees its stream end."""
    async with httpx.AsyncClient(timeout=30) as client:
        async with Agent(agent_config(tmp_path, "a")) as agent:
            host, port = agent.api_addrs[0]
            stream = client.stream("POST", f"http://{host}:{port}/v1/updates/kv")
            response = await stream.__aenter__()
            assert response.status_code == 200
            await agent.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", ["x", 1]]])
            lines = response.aiter_lines()
            assert json.loads(await lines.__anext__()) == {"notify": ["update", ["x"]]}
        with anyio.fail_after(30), pytest.raises((StopAsyncIteration, httpx.HTTPError)):
            await lines.__anext__()
        await stream.__aexit__(None, None, None)


async def test_metrics_connections_have_nodelay(tmp_path, accepted_nodelay):
    cfg = agent_config(
        tmp_path, "m", with_api=False, telemetry={"prometheus": {"addr": "127.0.0.1:0"}}
    )
    async with Agent(cfg) as agent:
        host, port = agent.metrics_addr
        async with await anyio.connect_tcp(host, port) as stream:
            peer = stream.extra(anyio.abc.SocketAttribute.local_address)
            await stream.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # head not finished yet
            await wait_for(lambda: accepted_nodelay(peer) is not None, what="the accept")
            assert accepted_nodelay(peer) is True
            await stream.send(b"\r\n")
            data = b""
            with anyio.fail_after(30), contextlib.suppress(anyio.EndOfStream):
                while True:  # Connection: close
                    data += await stream.receive()
            assert data.startswith(b"HTTP/1.1 200 ") and b"\ncorro_build_info{" in data


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_api_on_trio_without_hypercorn_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hypercorn", None)  # as if not installed
    agent = Agent(agent_config(tmp_path, "t"))
    with pytest.raises(RuntimeError, match=r"needs hypercorn: pip install 'corrosion\[trio\]'"):
        await agent.start()
    assert agent.api_addrs == []


async def test_agents_started_one_after_another_in_one_process_all_answer(tmp_path):
    """An embedding application may stop an agent and start another (a restart, tests): the
    first listener's descriptor is reused by the next, which must still be polled."""
    config = agent_config(tmp_path, "again")
    for _ in range(3):
        async with Agent(config) as agent:
            host, port = agent.api_addrs[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as client:
                r = await client.get("/v1/health")
                assert r.status_code == 200, r.text
