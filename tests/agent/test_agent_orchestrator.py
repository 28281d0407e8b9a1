"""``[orchestrator]`` in the agent's config: the Machines API is served next to corrosion's API,
and machine rows published by one worker replicate to another worker's local replica."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from agent_helpers import agent_config, rows, seed_addr
from support import start_machine, wait_for

from corrosion import Agent
from orchestrator.publish import MACHINES_SCHEMA

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_machine_started_on_one_worker_is_visible_on_another(tmp_path):
    cfg = agent_config(
        tmp_path,
        "w1",
        orchestrator={
            "machines_path": str(tmp_path / "machines"),
            "driver": "fake",
            "worker": "w1",
        },
    )
    (tmp_path / "machines.sql").write_text(MACHINES_SCHEMA)  # every node needs the same schema
    other = agent_config(tmp_path, "w2", with_api=False)
    async with Agent(cfg) as w1:
        other = dataclasses.replace(
            agent_config(tmp_path, "w2", [seed_addr(w1)], with_api=False),
            db=dataclasses.replace(
                other.db, schema_paths=(*other.db.schema_paths, tmp_path / "machines.sql")
            ),
        )
        async with Agent(other) as w2:
            mid = await start_machine(w1.api_addrs[0])
            host, port = w1.api_addrs[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as api:
                # corrosion's API is still there, on the same address
                assert (await api.get("/v1/health")).status_code == 200

            async def replicated() -> bool:
                got = await rows(w2, "SELECT id, app, state, worker FROM machines")
                return got == [(mid, "web", "started", "w1")]

            await wait_for(replicated, what="the started machine's row on the other worker")


def test_invalid_orchestrator_section_fails_at_load(tmp_path):
    from corrosion import ConfigError

    with pytest.raises(ConfigError, match=r"\[orchestrator\]: machines_path is required"):
        agent_config(tmp_path, "bad", with_api=False, orchestrator={"driver": "fake"})
    with pytest.raises(ConfigError, match=r"\[orchestrator\]: driver must be one of"):
        agent_config(
            tmp_path,
            "bad",
            with_api=False,
            orchestrator={"machines_path": "/tmp/x", "driver": "nope"},
        )
