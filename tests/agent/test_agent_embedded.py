"""Embedded mode on both anyio backends: two agents in one application replicate, answer
queries as async iterators, and leave the cluster when they shut down."""

from __future__ import annotations

import pytest
from agent_helpers import agent_config, rows, seed_addr
from support import wait_for

import swim
from corrosion import Agent, TransactionError

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def test_embedded_agents_replicate_and_leave(tmp_path, anyio_backend):
    a = Agent(agent_config(tmp_path, "a", with_api=False))
    async with a:
        b_cfg = agent_config(tmp_path, "b", [seed_addr(a)], with_api=False)
        async with Agent(b_cfg) as b:
            await wait_for(
                lambda: a.alive_members() == 1 and b.alive_members() == 1,
                what="the two agents to meet",
            )
            result = await a.execute([["INSERT INTO kv (k, v) VALUES (?, ?)", ["x", 1]]])
            assert result.version == 1
            with pytest.raises(TransactionError, match="no such table"):
                await a.execute(["INSERT INTO kv (k) VALUES ('y')", "SELECT * FROM nope"])

            async def arrived() -> bool:
                return await rows(b, "SELECT k, v FROM kv") == [("x", 1)]

            await wait_for(arrived, what="the write to replicate")
            assert [(m.is_self, m.state) for m in b.members()] == [
                (True, "alive"),
                (False, "alive"),
            ]
            b_addr = b.swim.address
        # b left gracefully: a sees it LEFT, not just failed
        await wait_for(
            lambda: any(
                m.addr == b_addr and m.state == swim.State.LEFT for m in a.swim.all_members()
            ),
            what="b's leave to reach a",
        )
        assert await rows(a, "SELECT count(*) FROM kv") == [(1,)]
