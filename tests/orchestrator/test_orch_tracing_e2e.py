"""A machine operation's trace end to end, across real processes exporting OTLP to a receiver
this test runs: a worker (``corrosion agent`` with an ``[orchestrator]`` section, the process
driver) and a gateway (``python -m orchestrator gateway`` over the worker's database). A stop sent
through the gateway is SIGKILLed with the worker in the middle of its stop_instance step; the
restarted worker resumes the run. The receiver then holds ONE trace: the caller's span, the
gateway's, the worker's API span, the run's accept span, the step attempts of the killed worker
and those of the restarted one (whose run span continues under the accept span the step log
saved), and the publishes of the machine's row."""

from __future__ import annotations

import os
import sys

import httpx
import pytest
from cli_helpers import node_mapping, short_tmp, write_config
from support import Proc, free_port, wait_for
from support.otlp_receiver import OtlpReceiver, ReceivedSpan, ancestors

pytestmark = pytest.mark.anyio
TRACE_ID = "5b8efff798038103d269b633813fc60c"
TRACEPARENT = f"00-{TRACE_ID}-eee19b7ec3c1b174-01"
SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture
def anyio_backend():
    return "asyncio"


def worker_env(which: str) -> dict[str, str]:
    """The worker's environment: spans batched for 100 ms (not 5 s) before export, and a
    resource attribute telling the two worker processes apart."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_RESOURCE_ATTRIBUTES": f"test.process={which}"}  # fmt: skip


async def answering(url: str, proc: Proc) -> bool:
    assert proc.p.poll() is None, proc.stderr()[-3000:]
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(url)).status_code == 200
    except httpx.TransportError:
        return False


def step_spans(spans: list[ReceivedSpan], run_id: str) -> list[tuple[str, str, bool]]:
    """(process, step, restart) of the run's step attempts, in the order they started."""
    steps = sorted((s for s in spans if s.attributes.get("fsm.run_id") == run_id
                    and "fsm.step" in s.attributes), key=lambda s: s.start_ns)  # fmt: skip
    return [(s.resource["test.process"], s.attributes["fsm.step"], s.attributes["fsm.restart"])
            for s in steps]  # fmt: skip


async def test_a_stop_killed_mid_step_and_resumed_is_one_trace(otlp_receiver: OtlpReceiver):
    with short_tmp() as base:
        release = base / "release"
        api_port, gw_port = free_port(), free_port()
        orchestrator = {"machines_path": str(base / "machines"),
                        "state_path": str(base / "instances"), "driver": "process",
                        "worker": "w1"}  # fmt: skip
        data = node_mapping(
            base, "w1", api={"addr": f"127.0.0.1:{api_port}"}, orchestrator=orchestrator,
            telemetry={"open-telemetry": {"exporter": {"endpoint": otlp_receiver.url}}},
        )  # fmt: skip
        config = write_config(base / "w1.toml", data)
        agent = [sys.executable, "-m", "corrosion", "-c", str(config), "agent"]
        procs: list[Proc] = []

        def start(args: list[str], name: str, env: dict[str, str]) -> Proc:
            (base / name).mkdir()
            procs.append(Proc(args, base / name, env))
            return procs[-1]

        try:
            worker = start(agent, "first", worker_env("first"))
            machines = f"http://127.0.0.1:{api_port}/v1/apps/web/machines"
            await wait_for(lambda: answering(machines, worker), what="the worker's API")
            gateway = start(
                [sys.executable, "-m", "orchestrator", "gateway", "--replica",
                 data["db"]["path"], "--listen", f"127.0.0.1:{gw_port}"],
                "gateway",
                {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url,
                 "OTEL_BSP_SCHEDULE_DELAY": "100"},
            )  # fmt: skip
            gw = f"http://127.0.0.1:{gw_port}/v1/apps/web/machines"
            await wait_for(lambda: answering(gw, gateway), what="the gateway")

            # a machine that ignores SIGTERM: its stop_instance step waits until release exists
            script = f"trap '' TERM; while [ ! -e {release} ]; do sleep 0.05; done"
            config_ = {"image": "busybox", "init": {"exec": ["sh", "-c", script]}}
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.post(gw, json={"config": config_})
                assert r.status_code == 200, r.text
                mid = r.json()["id"]
                r = await client.get(f"{gw}/{mid}/wait", params={"state": "started"})
                assert r.status_code == 200, r.text
                r = await client.post(f"{gw}/{mid}/stop", json={"timeout": 600},
                                      headers={"traceparent": TRACEPARENT})  # fmt: skip
                assert r.status_code == 200, r.text

                async def stopping() -> str | None:
                    runs = (await client.get(f"{machines}/{mid}/runs")).json()
                    in_step = [r for r in runs if r["step"] == "stop_instance"]
                    return in_step[0]["run_id"] if in_step else None

                run_id = await wait_for(stopping, what="the stop run in its stop_instance step")

                def first_half(spans: list[ReceivedSpan]) -> bool:
                    names = {s.name for s in spans if s.trace_id == TRACE_ID}
                    return {"machine.stop.accept", "machine.stop.mark_stopping"} <= names

                await otlp_receiver.wait_for(first_half, what="the first worker's spans")
                worker.kill()  # SIGKILL, mid-step
                release.touch()  # the machine exits while no worker watches it
                worker = start(agent, "second", worker_env("second"))

                async def stopped() -> bool:
                    if not await answering(machines, worker):
                        return False
                    return (await client.get(f"{machines}/{mid}")).json()["state"] == "stopped"

                await wait_for(stopped, what="the resumed stop to finish")

                def resumed_run(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
                    return [s for s in spans if s.name == "machine.stop"
                            and s.attributes.get("fsm.run_id") == run_id]  # fmt: skip

                (run,) = await otlp_receiver.wait_for(resumed_run, what="the resumed run span")
                # clean up: the machine's process is gone; its database goes with the worker
                r = await client.delete(f"{machines}/{mid}")
                assert r.status_code == 200, r.text
        finally:
            release.touch()
            for proc in procs:
                proc.kill()

    spans = otlp_receiver.trace(TRACE_ID)
    by_id = {s.span_id: s for s in spans}
    assert run.trace_id == TRACE_ID and run.resource["test.process"] == "second"
    assert run.attributes["fsm.resumed"] is True and run.attributes["fsm.status"] == "succeeded"

    # the caller -> the gateway -> its forward -> the worker's API -> the accept span -> the run
    accept = by_id[run.parent_id]
    assert accept.name == "machine.stop.accept" and accept.resource["test.process"] == "first"
    api = by_id[accept.parent_id]
    assert api.kind == SERVER and api.name == "POST /v1/apps/{app}/machines/{machine_id}/stop"
    assert api.service == "corrosion"
    forward = by_id[api.parent_id]
    assert forward.kind == CLIENT and forward.service == "orchestrator-gateway"
    entry = by_id[forward.parent_id]
    assert entry.kind == SERVER and entry.service == "orchestrator-gateway"
    assert entry.parent_id == TRACEPARENT.split("-")[2]

    # the attempts of both processes: the killed one's in-flight attempt never ended (so never
    # exported); the restarted one redoes it, told it is a restart
    assert step_spans(spans, run_id) == [
        ("first", "mark_stopping", False),
        ("second", "stop_instance", True),
        ("second", "mark_stopped", True),
        ("second", "finally:settle", True),
    ]
    for s in spans:
        if s.attributes.get("fsm.run_id") == run_id and "fsm.step" in s.attributes:
            runs = [a for a in ancestors(s, spans) if a.name == "machine.stop"] or [None]
            # the first worker's run span ended with its process: its steps' parent is missing
            assert runs[0] is (run if s.resource["test.process"] == "second" else None)
            assert s.parent_id is not None

    # the machine's row published in the trace, under the step that changed it
    publishes = [s for s in spans if s.name == "machines.publish"]
    assert {by_id[s.parent_id].attributes["fsm.step"] for s in publishes} >= {"mark_stopped"}
    assert all(mid in s.attributes["machine.ids"] for s in publishes)
