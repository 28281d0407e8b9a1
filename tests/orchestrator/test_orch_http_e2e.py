"""End to end over a real socket: the app built from an ``[orchestrator]`` config section,
served by uvicorn, driving real processes (and real containers where runc is available)."""

from __future__ import annotations

import anyio
import httpx
import pytest
import uvicorn
from orch_helpers import require_runc
from support import free_port, wait_for

from orchestrator.config import ConfigError, OrchestratorConfig, create_app_from_config
from orchestrator.drivers import ProcessDriver, RuncDriver
from orchestrator.drivers.images import static_executable
from orchestrator.drivers.runc import INIT_CANDIDATES
from orchestrator.publish import MemoryPublisher

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"  # uvicorn serves on asyncio


def test_config_section_validation(tmp_path):
    cfg = OrchestratorConfig.from_mapping(
        {"machines_path": str(tmp_path / "m"), "driver": "fake", "worker": "w1"}
    )
    assert cfg.driver == "fake" and cfg.worker == "w1" and cfg.region == "local"
    for bad, text in [
        ({}, "machines_path"),
        ({"machines_path": "x", "driver": "kvm"}, "driver"),
        ({"machines_path": "x", "bogus": 1}, "unknown configuration key"),
        ({"machines_path": "x", "worker": 5}, "worker"),
        ({"machines_path": "x", "archive_path": 5}, "archive_path"),
        ({"machines_path": "x", "keep_runs": 0}, "keep_runs"),
        ({"machines_path": "x", "volumes_path": 5}, "volumes_path"),
    ]:
        with pytest.raises(ConfigError, match=text):
            OrchestratorConfig.from_mapping(bad)


@pytest.mark.parametrize("driver", ["process", "runc"])
async def test_served_api_runs_real_machines(tmp_path, driver):
    if driver == "runc":
        require_runc()
    # sleep has no SIGTERM handler: the process driver's supervisor and runc's tini forward the
    # stop's SIGTERM and it dies of it (tini reports 128 + 15); without tini, runc runs sleep as
    # PID 1, which ignores SIGTERM, and the stop ends in SIGKILL after the timeout
    no_init = driver == "runc" and static_executable(INIT_CANDIDATES) is None
    if driver == "process":
        expected_exit = {"signal": 15, "exit_code": None}
    elif not no_init:
        expected_exit = {"signal": None, "exit_code": 128 + 15}
    else:
        expected_exit = {"signal": 9}
    section = {
        "machines_path": str(tmp_path / "machines"),
        "archive_path": str(tmp_path / "archive"),
        "state_path": str(tmp_path / "instances"),
        "driver": driver,
        "worker": "w1",
    }
    publisher = MemoryPublisher()
    app = create_app_from_config(section, publisher=publisher, token="t0k")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    base = f"http://127.0.0.1:{port}/v1/apps/web/machines"
    headers = {"authorization": "Bearer t0k"}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            await wait_for(lambda: server.started, 30, "uvicorn to listen")
            async with httpx.AsyncClient(headers=headers, timeout=60) as client:
                config = {
                    "image": "busybox",
                    "init": {"exec": ["sh", "-c", "echo up; exec sleep 600"]},
                    "stop_config": {"timeout": "300ms" if no_init else "120s"},
                }
                r = await client.post(base, json={"config": config})
                assert r.status_code == 200, r.text
                mid = r.json()["id"]
                r = await client.get(
                    f"{base}/{mid}/wait", params={"state": "started", "timeout": 30}
                )
                assert r.status_code == 200, r.text
                machine = (await client.get(f"{base}/{mid}")).json()
                assert machine["state"] == "started"
                await wait_for(
                    lambda: publisher.rows().get(mid, {}).get("state") == "started",
                    30,
                    "the started row to be published",
                )
                r = await client.post(f"{base}/{mid}/stop")
                assert r.status_code == 200
                r = await client.get(
                    f"{base}/{mid}/wait", params={"state": "stopped", "timeout": 30}
                )
                assert r.status_code == 200
                stopped = (await client.get(f"{base}/{mid}")).json()
                exit_event = stopped["events"][0]
                assert exit_event["status"] == "stopped"
                exit_ = exit_event["request"]["exit_event"]
                assert exit_["requested_stop"], exit_
                assert {k: exit_[k] for k in expected_exit} == expected_exit, exit_
                r = await client.delete(f"{base}/{mid}")
                assert r.status_code == 200
                r = await client.get(
                    f"{base}/{mid}/wait", params={"state": "destroyed", "timeout": 30}
                )
                assert r.status_code == 200

                async def gone() -> bool:
                    return (await client.get(f"{base}/{mid}")).status_code == 404

                await wait_for(gone, 30, "the destroyed machine to be gone")
            assert (tmp_path / "archive" / f"{mid}.sqlite.gz").exists()
            server.should_exit = True
    finally:
        cls = ProcessDriver if driver == "process" else RuncDriver
        await cls(tmp_path / "instances").destroy_all()
    assert not any(p for p in (tmp_path / "instances").iterdir() if not p.name.startswith("_"))
