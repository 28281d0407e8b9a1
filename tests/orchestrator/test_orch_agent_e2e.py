"""End to end with the real agent: two corrosion agents gossiping on loopback; worker 1 runs an
orchestrator (``[orchestrator]`` section, process driver, real processes) behind its API; worker
2 runs the proxy over its own local replica. A machine started on worker 1 gets the traffic sent
to worker 2's proxy as soon as its row replicates; stopping it takes it out of rotation."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from support import free_port, wait_for

from corrosion import Agent, Config
from orchestrator.drivers import ProcessDriver
from orchestrator.extension import from_config
from orchestrator.proxy import Proxy, SqliteReplica
from orchestrator.publish import MACHINES_SCHEMA

pytestmark = pytest.mark.anyio

GOSSIP_KEY = "b3JjaGVzdHJhdG9yIGUyZTogYSBnb3NzaXAga2V5ISE="  # the agents' shared key (32 bytes)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def config(base: Path, name: str, seeds: list[str], **sections) -> Config:
    """An agent on loopback; without an orchestrator it needs the machines table in its own
    schema files (an agent with one adds the table itself)."""
    schema = base / "schema.sql"
    schema.write_text(MACHINES_SCHEMA)
    paths = [] if "orchestrator" in sections else [str(schema)]
    data = {
        "db": {"path": str(base / name / "state.db"), "schema_paths": paths},
        "gossip": {
            "addr": "127.0.0.1:0",
            "bootstrap": seeds,
            "preset": "local",
            "encryption_keys": [GOSSIP_KEY],
        },
        "perf": {"min_sync_backoff": 0.2, "max_sync_backoff": 1.0},
        "api": {"addr": "127.0.0.1:0"},
        **sections,
    }
    return Config.from_mapping(data)


async def test_machine_on_worker1_is_reachable_through_worker2s_proxy(tmp_path):
    port = free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.txt").write_text("served by a machine on w1\n")
    machine_config = {
        "image": "busybox",
        "init": {"exec": [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                          "--directory", str(www)]},
        "services": [{"protocol": "tcp", "internal_port": port}],
        "stop_config": {"timeout": "2s"},
    }  # fmt: skip
    orch_section = {
        "machines_path": str(tmp_path / "w1" / "machines"),
        "state_path": str(tmp_path / "w1" / "instances"),
        "driver": "process",
        "worker": "w1",
    }
    try:
        w1_config = config(tmp_path, "w1", [], orchestrator=orch_section)
        async with Agent(w1_config, extensions=[from_config(orch_section)]) as w1:
            host, gport = w1.swim.address
            async with Agent(config(tmp_path, "w2", [f"{host}:{gport}"])) as w2:
                reader = SqliteReplica(w2.config.db.path)
                proxy = Proxy(reader, domain="internal", retry_delay=0.05, connect_attempts=40)
                api_host, api_port = w1.api_addrs[0]
                async with (
                    httpx.AsyncClient(base_url=f"http://{api_host}:{api_port}", timeout=60) as api,
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy),
                                      base_url="http://web.internal") as via_w2,
                ):  # fmt: skip
                    assert (await via_w2.get("/index.txt")).status_code == 503
                    r = await api.post("/v1/apps/web/machines", json={"config": machine_config})
                    assert r.status_code == 200, r.text
                    mid = r.json()["id"]
                    r = await api.get(f"/v1/apps/web/machines/{mid}/wait",
                                      params={"state": "started", "timeout": 60})  # fmt: skip
                    assert r.status_code == 200, r.text

                    async def served():
                        r = await via_w2.get("/index.txt")
                        return r if r.status_code == 200 else None

                    r = await wait_for(served)
                    assert r.text == "served by a machine on w1\n"
                    assert r.headers["fly-machine-id"] == mid and r.headers["fly-worker"] == "w1"

                    assert (await api.post(f"/v1/apps/web/machines/{mid}/stop")).status_code == 200

                    async def gone():
                        return (await via_w2.get("/index.txt")).status_code == 503

                    await wait_for(gone)
                    r = await api.delete(f"/v1/apps/web/machines/{mid}")
                    assert r.status_code == 200, r.text
                    r = await api.get(f"/v1/apps/web/machines/{mid}/wait",
                                      params={"state": "destroyed", "timeout": 60})  # fmt: skip
                    assert r.status_code == 200

                    async def row_deleted():
                        return not [x async for x in w2.query("SELECT id FROM machines")]

                    await wait_for(row_deleted)

                    # the worker's own routes, served with the agent's API: cordon shows on w2;
                    # with api.addr on port 0, what it announces is the port it was given
                    assert (await api.get("/v1/worker")).json()["cordoned"] is False
                    bound = f"http://{api_host}:{api_port}"

                    async def w2_sees_api_url():
                        rows = [x async for x in w2.query("SELECT api_url FROM workers")]
                        return rows == [(bound,)]

                    await wait_for(w2_sees_api_url)
                    assert (await api.get("/v1/worker")).json()["api_url"] == bound
                    r = await api.post("/v1/worker/cordon")
                    assert r.status_code == 200 and r.json()["cordoned"] is True, r.text

                    async def w2_sees_cordon():
                        rows = [x async for x in w2.query("SELECT cordoned FROM workers")]
                        return rows == [(1,)]

                    await wait_for(w2_sees_cordon)
                reader.close()
    finally:
        await ProcessDriver(tmp_path / "w1" / "instances").destroy_all()
