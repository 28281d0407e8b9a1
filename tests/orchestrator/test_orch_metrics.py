"""An orchestrator run without an agent serves its metrics on an address of its own."""

from __future__ import annotations

import anyio
import httpx
import pytest
from support import wait_for

from corrosion.surfaces.metrics import start_families
from orchestrator.drivers import FakeDriver
from orchestrator.engine import Backoff
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio


async def test_standalone_orchestrator_serves_its_metrics(tmp_path):
    orch = Orchestrator(
        machines_path=tmp_path / "machines",
        driver=FakeDriver(images={"busybox"}),
        worker="w1",
        backoff=Backoff(initial=0.001, maximum=0.01),
    )
    async with orch, anyio.create_task_group() as tg:
        close, (host, port) = await start_families(
            tg, ("127.0.0.1", 0), lambda: orch.metrics.families(orch)
        )
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as http:

            async def scrape() -> str:
                resp = await http.get("/metrics")
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
                return resp.text

            text = await scrape()
            assert "# TYPE fsm_action_count counter\n" in text
            assert "orch_machines{" not in text  # no machine yet
            body = {"config": {"image": "busybox", "init": {"cmd": ["sleep", "60"]}}}
            await orch.create_machine("web", body)

            async def created() -> bool:
                return (
                    'fsm_action_count{action="create",kind="",resource="machine",status="ok"} 1\n'
                    in await scrape()
                )

            await wait_for(created, what="the create run counted")
            text = await scrape()
            assert 'orch_machines{state="started"} 1\n' in text
            assert 'orch_driver_call_duration_seconds_count{call="start",outcome="ok"} 1\n' in text
        await close()
