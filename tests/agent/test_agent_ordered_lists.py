"""Ordered lists through the agent: a schema file makes a table an ordered list
(``SELECT crsql_fract_as_ordered(...)``), clients write it over HTTP (``pos`` = -1 / 1 to the
front / end, the ``<table>_fractindex`` view to insert or move after a row), and every node
agrees on the order."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from agent_helpers import cluster, rows
from support import wait_for

from corrosion import Agent

pytestmark = pytest.mark.anyio

LIST_SCHEMA = """
CREATE TABLE todo_items (
    id INTEGER NOT NULL PRIMARY KEY,
    list TEXT NOT NULL DEFAULT '',
    pos,
    title TEXT
);
CREATE INDEX todo_items_by_pos ON todo_items (list, pos);
SELECT crsql_fract_as_ordered('todo_items', 'pos', 'list');
"""
ORDER = "SELECT id FROM todo_items WHERE list = ? ORDER BY pos, id"


def list_schema(base: Path) -> dict[str, list[str]]:
    path = base / "lists" / "todo.sql"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LIST_SCHEMA)
    return {"schema_paths": [str(path)]}


def client(agent: Agent) -> httpx.AsyncClient:
    host, port = agent.api_addrs[0]
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30)


async def transact(agent: Agent, *statements: object) -> None:
    async with client(agent) as http:
        resp = await http.post("/v1/transactions", json=list(statements))
    assert resp.status_code == 200, resp.text


async def ids(agent: Agent, name: str) -> list[int]:
    return [r[0] for r in await rows(agent, ORDER, (name,))]


async def in_order(agent: Agent, name: str, want: list[int]) -> bool:
    return await ids(agent, name) == want


async def test_clients_keep_an_ordered_list_that_every_node_agrees_on(tmp_path):
    async with cluster(tmp_path, 2, db=list_schema(tmp_path)) as (a, b):
        await transact(
            a,
            "INSERT INTO todo_items (id, list, pos, title) VALUES (1, 'home', 1, 'milk')",
            "INSERT INTO todo_items (id, list, pos, title) VALUES (2, 'home', 1, 'bread')",
            ["INSERT INTO todo_items (id, list, pos, title) VALUES (?, 'home', -1, ?)", [3, "tea"]],
        )
        assert await ids(a, "home") == [3, 1, 2]
        # after a given row, through the view; then a move after another row, and to the front
        await transact(
            a,
            "INSERT INTO todo_items_fractindex (id, list, title, after_id) "
            "VALUES (4, 'home', 'eggs', 1)",
        )
        assert await ids(a, "home") == [3, 1, 4, 2]
        await transact(b, "UPDATE todo_items_fractindex SET after_id = 4 WHERE id = 3")
        await transact(b, "UPDATE todo_items SET pos = -1 WHERE id = 2")
        want = [2, 1, 4, 3]
        for node in (a, b):
            await wait_for(lambda n=node: in_order(n, "home", want), what=f"order {want}")
            # every position is a key (text), none a -1 / 1 left for the triggers to replace
            keys = await rows(node, "SELECT DISTINCT typeof(pos) FROM todo_items")
            assert keys == [("text",)]
            assert not await rows(node, "SELECT id FROM todo_items WHERE pos IN ('-1', '1')")
        # a client can compute keys (read-only), but not re-make the list
        async with client(a) as http:
            resp = await http.post("/v1/queries", json="SELECT crsql_fract_key_between('a ', 'a!')")
            assert resp.status_code == 200, resp.text
            assert [json.loads(line) for line in resp.text.splitlines()][1]["row"][1] == ["a P"]
            resp = await http.post(
                "/v1/transactions", json=["SELECT crsql_fract_as_ordered('todo_items', 'title')"]
            )
            assert resp.status_code == 400
            assert "crsql_fract_as_ordered()" in resp.json()["results"][0]["error"]


async def test_concurrent_appends_converge_and_the_schema_applies_once(tmp_path):
    async with cluster(tmp_path, 2, db=list_schema(tmp_path)) as (a, b):
        for i in range(5):  # both append to one list at once: keys may tie, ids break ties
            await transact(a, f"INSERT INTO todo_items (id, list, pos) VALUES ({10 + i}, 'x', 1)")
            await transact(b, f"INSERT INTO todo_items (id, list, pos) VALUES ({20 + i}, 'x', 1)")
        table = "SELECT id, list, pos, title FROM todo_items ORDER BY id"
        await wait_for(lambda: both_equal(a, b, table), what="both nodes to hold the same 10 rows")
        assert len(await rows(a, table)) == 10
        assert await ids(a, "x") == await ids(b, "x")
        # the same files again change nothing; the list's triggers survive a reload
        assert await a.reload_schema() == []
        await transact(a, "INSERT INTO todo_items (id, list, pos) VALUES (30, 'x', -1)")
        assert (await ids(a, "x"))[0] == 30


async def both_equal(a: Agent, b: Agent, sql: str) -> bool:
    return len(await rows(a, sql)) == 10 and await rows(a, sql) == await rows(b, sql)
