"""``corrosion exec`` / ``corrosion query`` and ``Client`` against a real agent."""

from __future__ import annotations

import anyio
import pytest
from cli_helpers import api_of, cli, node_mapping, rows, short_tmp, write_config

from corrosion import Agent, Config
from corrosion.surfaces.client import Client, ClientError

pytestmark = pytest.mark.anyio


@pytest.fixture
async def node():
    with short_tmp() as base:
        async with Agent(Config.from_mapping(node_mapping(base, "api"))) as agent:
            yield agent


@pytest.fixture
async def secured():
    with short_tmp() as base:
        data = node_mapping(base, "sec", api={"authz": {"bearer-token": "s3cret"}})
        async with Agent(Config.from_mapping(data)) as agent:
            data["api"]["addr"] = api_of(agent)
            yield agent, write_config(base / "config.toml", data)


async def test_exec_then_query_prints_rows_like_corrosion(node):
    addr = api_of(node)
    result = await cli(
        "--api-addr", addr, "exec", "INSERT INTO todos (id, title, data) VALUES (?, ?, x'00ff')",
        "--param", "1", "--param", "first|todo",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == "Rows affected: 1\n"
    result = await cli(
        "exec", "INSERT INTO todos (id, title) VALUES (2, 'second'), (3, 'third')",
        "--api-addr", addr, "--timer",
    )  # fmt: skip
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "Rows affected: 2"
    assert lines[1].startswith("Run Time: real ")
    assert await rows(node, "SELECT count(*) FROM todos") == [(3,)]

    result = await cli(
        "query",
        "--api-addr",
        addr,
        "--columns",
        "SELECT id, title, done, data FROM todos ORDER BY id",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "id|title|done|data",
        "1|first|todo|0|x'00ff'",
        "2|second|0|",
        "3|third|0|",
    ]
    result = await cli(
        "query", "SELECT title FROM todos WHERE id = ?", "--param", "2",
        "--timer", "--api-addr", addr,
    )  # fmt: skip
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "second"
    assert result.stdout.splitlines()[1].startswith("time: ")


async def test_failures_exit_non_zero_with_the_servers_error(node):
    addr = api_of(node)
    result = await cli("--api-addr", addr, "exec", "INSERT INTO nope VALUES (1)")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "no such table: nope" in result.stderr
    result = await cli("--api-addr", addr, "query", "DELETE FROM todos")
    assert result.exit_code == 1
    assert "statement is not readonly: writes go through POST /v1/transactions" in result.stderr
    assert "(corrosion exec)" in result.stderr
    result = await cli("--api-addr", addr, "query", "SELEC 1")
    assert result.exit_code == 1
    assert "syntax error" in result.stderr
    # a failed transaction applied nothing
    assert await rows(node, "SELECT count(*) FROM todos") == [(0,)]


async def test_exec_refuses_schema_changes_and_both_take_a_timeout(node):
    addr = api_of(node)
    result = await cli("--api-addr", addr, "exec", "CREATE TABLE local_only (a)")
    assert result.exit_code == 1
    assert "CREATE TABLE local_only is not allowed" in result.stderr
    assert "corrosion reload" in result.stderr
    slow = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
        "SELECT count(*) FROM c"
    )
    # the message names the CLI's option as well as the HTTP parameter
    hint = "the timeout parameter sets it: ?timeout= or --timeout, default api.{}_timeout"
    result = await cli("--api-addr", addr, "query", "--timeout", "0.2", slow)
    assert result.exit_code == 1 and "timeout of 0.2 s" in result.stderr
    assert hint.format("query") in result.stderr
    result = await cli(
        "--api-addr", addr, "exec", "--timeout", "0.2",
        f"INSERT INTO todos (id, title) SELECT 1, ({slow})",
    )  # fmt: skip
    assert result.exit_code == 1 and "timeout of 0.2 s" in result.stderr
    assert hint.format("transaction") in result.stderr
    assert await rows(node, "SELECT count(*) FROM todos") == [(0,)]
    result = await cli(
        "--api-addr", addr, "exec", "--timeout", "0", "INSERT INTO todos (id) VALUES (1)"
    )
    assert result.exit_code == 0, result.output


async def test_bearer_token_comes_from_the_config(secured):
    agent, config = secured
    result = await cli("-c", str(config), "exec", "INSERT INTO todos (id) VALUES (7)")
    assert result.exit_code == 0, result.output
    result = await cli("query", "SELECT id FROM todos", "-c", str(config))
    assert result.stdout == "7\n"
    # --api-addr alone (no config with the token): refused by the agent
    result = await cli(
        "-c", str(config.parent / "absent.toml"), "--api-addr", api_of(agent), "query", "SELECT 1"
    )
    assert result.exit_code == 1
    assert "unauthorized" in result.stderr


async def test_token_flag_and_environment_variable(secured):
    agent, config = secured
    elsewhere = ["-c", str(config.parent / "absent.toml"), "--api-addr", api_of(agent)]
    result = await cli(*elsewhere, "exec", "INSERT INTO todos (id) VALUES (8)", "--token", "s3cret")
    assert result.exit_code == 0, result.output
    result = await cli(
        *elsewhere, "query", "SELECT id FROM todos", env={"CORROSION_TOKEN": "s3cret"}
    )
    assert (result.exit_code, result.stdout) == (0, "8\n")
    # a wrong token, from the flag (over the config's right one) or the environment: one line
    for args, env in [
        (["-c", str(config), "--token", "wrong"], None),
        (elsewhere, {"CORROSION_TOKEN": "wrong"}),
    ]:
        result = await cli(*args, "query", "SELECT id FROM todos", env=env)
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.startswith("error: unauthorized: the agent at http://127.0.0.1:")
        assert "refused the bearer token (pass --token, set CORROSION_TOKEN" in result.stderr
        assert result.stderr.count("\n") == 1
    result = await cli(*elsewhere, "exec", "DELETE FROM todos")
    assert result.stderr.startswith("error: unauthorized: the agent at ")
    assert "requires a bearer token" in result.stderr
    assert await rows(agent, "SELECT id FROM todos") == [(8,)]


async def test_python_client_streams_rows(node):
    def use_client() -> tuple[dict, list, list]:
        with Client(api_of(node)) as client:
            answer = client.execute(
                [
                    ["INSERT INTO todos (id, title) VALUES (?, ?)", [i, f"t{i}"]]
                    for i in range(1, 1201)
                ]
            )
            streamed = list(client.query("SELECT id, title FROM todos WHERE id <= ?", [3]))
            events = [k for k, _ in client.query_events("SELECT id FROM todos")]
            with pytest.raises(ClientError) as err:
                client.execute(["INSERT INTO todos (id) VALUES (1)"])  # duplicate pk
            assert err.value.status == 500 and "UNIQUE" in err.value.message
            with pytest.raises(ClientError) as err:
                list(client.query("UPDATE todos SET done = 1"))
            assert err.value.status == 400
            status, health = client.health()
            assert status == 200 and health["gaps"] == 0
            return answer, streamed, events

    answer, streamed, events = await anyio.to_thread.run_sync(use_client)
    assert answer["results"][0]["rows_affected"] == 1
    assert len(answer["results"]) == 1200
    assert answer["actor_id"] == node.actor_id.hex()
    assert streamed == [[1, "t1"], [2, "t2"], [3, "t3"]]
    assert events[0] == "columns" and events[-1] == "eoq"
    assert events.count("row") == 1200
