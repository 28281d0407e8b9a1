"""The orchestrator's metrics on the hosting agent's ``/metrics``: runs and step attempts in
superfly/fsm's shapes, retries, active runs, machines by state, driver call latencies."""

from __future__ import annotations

import re

import httpx
import pytest
from cli_helpers import node_mapping
from support import start_machine, wait_for
from test_cli_metrics import parse, scrape

from corrosion import Agent, Config
from corrosion.runtime.extensions import load_extensions
from orchestrator.metrics import FSM_BUCKETS

pytestmark = pytest.mark.anyio


def _labels(**kv: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(kv.items()))


async def test_orchestrator_metrics_follow_its_runs(base):
    cfg = Config.from_mapping(
        node_mapping(
            base, "w1",
            orchestrator={"machines_path": str(base / "machines"), "driver": "fake",
                          "worker": "w1"},
            telemetry={"prometheus": {"addr": "127.0.0.1:0"}},
        )
    )  # fmt: skip
    async with Agent(cfg, extensions=load_extensions(cfg)) as agent:
        orch = agent.extensions[0].orch
        types: dict[str, str] = {}
        fams = parse((await scrape(agent.metrics_addr)).text, types)
        assert types["fsm_action_count"] == "counter"
        assert types["fsm_transition_duration_seconds"] == "histogram"
        assert types["orch_machines"] == "gauge"
        assert fams.get("fsm_action_count", {}) == {}

        # a create whose start fails twice (transient): two retries, then it succeeds
        orch.driver.fail_next("start", 2)
        mid = await start_machine(agent.api_addrs[0])
        ok = _labels(action="create", kind="", resource="machine", status="ok")

        async def created() -> bool:  # the run ends after its finalizer, once started
            got = parse((await scrape(agent.metrics_addr)).text).get("fsm_action_count", {})
            return got.get(ok) == 1

        await wait_for(created, what="the create run counted")
        fams = parse((await scrape(agent.metrics_addr)).text, types)
        assert fams["fsm_action_count"] == {ok: 1}
        assert fams["fsm_action_duration_seconds_count"][ok] == 1
        buckets = fams["fsm_action_duration_seconds_bucket"]
        assert {re.search(r'le="([^"]*)"', k)[1] for k in buckets} == {  # type: ignore[index]
            *(repr(float(b)) for b in FSM_BUCKETS),
            "+Inf",
        }
        step = {"action": "create", "resource": "machine", "state": "start_instance"}
        tries = fams["fsm_transition_count"]
        assert tries[_labels(**step, status="error")] == 2
        assert tries[_labels(**step, status="ok")] == 1
        assert tries[_labels(**{**step, "state": "prepare"}, status="ok")] == 1
        durations = fams["fsm_transition_duration_seconds_count"]
        assert durations[_labels(**step, status="error")] == 2
        assert fams["orch_step_retries_total"] == {
            _labels(action="create", step="start_instance"): 2
        }
        assert fams["orch_runs_started_total"] == {_labels(action="create", resumed="false"): 1}
        calls = fams["orch_driver_call_duration_seconds_count"]
        assert calls[_labels(call="start", outcome="error")] == 2
        assert calls[_labels(call="start", outcome="ok")] == 1
        assert calls[_labels(call="create", outcome="ok")] == 1
        assert fams["orch_machines"] == {_labels(state="started"): 1}
        assert fams.get("orch_runs_active", {}) == {}

        host, port = agent.api_addrs[0]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as api:
            # a stop the driver refuses for good: the run fails, unrecoverable
            orch.driver.fail_next("stop", 1, transient=False)
            resp = await api.post(f"/v1/apps/web/machines/{mid}/stop")
            assert resp.status_code == 200, resp.text

            async def stop_failed() -> bool:
                got = parse((await scrape(agent.metrics_addr)).text)["fsm_action_count"]
                key = _labels(action="stop", kind="unrecoverable", resource="machine",
                              status="failed")  # fmt: skip
                return got.get(key) == 1

            await wait_for(stop_failed, what="the failed stop counted")
            fams = parse((await scrape(agent.metrics_addr)).text)
            halted = _labels(action="stop", resource="machine", state="stop_instance",
                             status="unrecoverable")  # fmt: skip
            assert fams["fsm_transition_count"][halted] == 1
            assert (
                fams["orch_driver_call_duration_seconds_count"][
                    _labels(call="stop", outcome="error")
                ]
                == 1
            )

            # a run held in the driver is active until it finishes
            orch.driver.latency = 3600.0  # written through to the fake driver
            resp = await api.post(f"/v1/apps/web/machines/{mid}/stop")
            assert resp.status_code == 200, resp.text

            async def stop_active() -> bool:
                got = parse((await scrape(agent.metrics_addr)).text).get("orch_runs_active", {})
                return got == {_labels(action="stop", state="running"): 1}

            await wait_for(stop_active, what="the held stop counted active")
            fams = parse((await scrape(agent.metrics_addr)).text)
            assert fams["orch_runs_started_total"][_labels(action="stop", resumed="false")] == 2
            # corrosion's own families are still there
            assert fams["corro_gossip_members"] == {"": 0}
