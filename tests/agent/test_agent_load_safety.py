"""Load safety of the HTTP API: per-route concurrency limits (503 beyond them, the open streams
unaffected, the counts in /metrics) and api.endpoint_name (421 for a misdirected request)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from agent_helpers import agent_config
from support import wait_for

from corrosion import Agent, Config, ConfigError

pytestmark = pytest.mark.anyio

LIMIT = 3


def client(agent: Agent, **kwargs) -> httpx.AsyncClient:
    host, port = agent.api_addrs[0]
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30, **kwargs)


class Stream:
    """One open NDJSON response, read line by line."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next_event(self) -> dict:
        with anyio.fail_after(60):
            while True:
                line = await self.lines.__anext__()
                if line.strip():
                    return json.loads(line)


@contextlib.asynccontextmanager
async def open_stream(http: httpx.AsyncClient, method: str, path: str, body) -> AsyncIterator:
    async with http.stream(method, path, json=body) as response:
        yield response


async def metrics(agent: Agent) -> str:
    host, port = agent.metrics_addr
    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.get(f"http://{host}:{port}/metrics")).text


def sample(text: str, name: str, labels: str) -> float:
    prefix = f"{name}{{{labels}}} "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"no sample {prefix!r}"
    return float(lines[0][len(prefix) :])


async def test_streams_beyond_the_limit_get_503_and_the_open_ones_go_on(tmp_path):
    cfg = agent_config(
        tmp_path,
        "a",
        api={"addr": "127.0.0.1:0", "concurrency_limit": LIMIT},
        telemetry={"prometheus": {"addr": "127.0.0.1:0"}},
    )
    async with Agent(cfg) as agent, client(agent) as http, contextlib.AsyncExitStack() as stack:
        streams = []
        for i in range(LIMIT):  # distinct queries: three subscriptions, three streams
            sql = f"SELECT k, v FROM kv WHERE n >= {i}"
            response = await stack.enter_async_context(
                open_stream(http, "POST", "/v1/subscriptions", sql)
            )
            assert response.status_code == 200
            stream = Stream(response)
            assert "columns" in await stream.next_event()
            assert "eoq" in await stream.next_event()
            streams.append(stream)

        # a burst of concurrent requests beyond the limit: each refused at once
        refused: list[httpx.Response] = []

        async def one_more() -> None:
            refused.append(await http.post("/v1/subscriptions", json="SELECT k FROM kv"))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one_more)
        assert [r.status_code for r in refused] == [503] * 4
        error = refused[0].json()["error"]
        assert "limit 3" in error and "api.concurrency_limit" in error
        assert refused[0].headers["retry-after"] == "1"

        # other routes have their own slots; the open streams carry on
        assert (await http.post("/v1/queries", json="SELECT 1")).status_code == 200
        await agent.execute([("INSERT INTO kv (k, v, n) VALUES (?, ?, ?)", ["x", "y", 5])])
        for stream in streams:
            assert (await stream.next_event())["change"][0] == "insert"

        text = await metrics(agent)
        route = 'route="subscriptions"'
        assert sample(text, "corro_api_concurrency_limit", route) == LIMIT
        assert sample(text, "corro_api_requests_in_flight", route) == LIMIT
        assert sample(text, "corro_api_requests_refused_total", route) == 4
        streams_label = 'protocol="http",source="subscriptions"'
        assert sample(text, "corro_api_active_streams", streams_label) == LIMIT

        # one stream ends: its slot is free again
        await stack.aclose()

        async def admitted() -> bool:
            async with open_stream(http, "POST", "/v1/subscriptions", "SELECT k FROM kv") as r:
                return r.status_code == 200

        await wait_for(admitted, what="a slot freed by the closed streams")


async def test_update_watches_are_limited_too(tmp_path):
    cfg = agent_config(tmp_path, "a", api={"addr": "127.0.0.1:0", "concurrency_limit": 1})
    async with (
        Agent(cfg) as agent,
        client(agent) as http,
        open_stream(http, "POST", "/v1/updates/kv", None) as first,
    ):
        assert first.status_code == 200
        second = await http.post("/v1/updates/items")
        assert second.status_code == 503
        assert "updates" in second.json()["error"]
        await agent.execute([("INSERT INTO kv (k) VALUES (?)", ["k1"])])
        assert (await Stream(first).next_event())["notify"] == ["update", ["k1"]]


async def test_a_misdirected_request_gets_421(tmp_path):
    api = {"addr": "127.0.0.1:0", "endpoint_name": "node-a", "authz": {"bearer-token": "s3"}}
    cfg = agent_config(tmp_path, "a", api=api)
    async with Agent(cfg) as agent, client(agent) as http:
        token = {"authorization": "Bearer s3"}
        header = "x-corrosion-requested-endpoint-name"
        wrong = await http.get("/v1/health", headers={**token, header: "node-b"})
        assert wrong.status_code == 421
        assert "node-b" in wrong.json()["error"] and "node-a" in wrong.json()["error"]
        # checked before the token, as corrosion does
        assert (await http.get("/v1/health", headers={header: "node-b"})).status_code == 421
        assert (await http.get("/v1/health", headers={header: "node-a"})).status_code == 401
        assert (
            await http.get("/v1/health", headers={**token, header: "node-a"})
        ).status_code == 200
        assert (await http.get("/v1/health", headers=token)).status_code == 200  # no header: ok
        # a write meant for another node changes nothing
        insert = [["INSERT INTO kv (k) VALUES (?)", ["nope"]]]
        refused = await http.post(
            "/v1/transactions", json=insert, headers={**token, header: "node-b"}
        )
        assert refused.status_code == 421
        assert [r async for r in agent.query("SELECT k FROM kv")] == []


@pytest.mark.parametrize(
    ("api", "message"),
    [
        ({"concurrency_limit": 0}, "api.concurrency_limit: 0 is out of range"),
        ({"concurrency_limit": "many"}, "api.concurrency_limit: expected an integer"),
        ({"endpoint_name": 3}, "api.endpoint_name: expected a string"),
    ],
)
def test_bad_limits_are_config_errors(api, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_mapping({"db": {"path": "x.db"}, "api": api})
