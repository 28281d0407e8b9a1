"""A machine operation's trace end to end, across real processes exporting OTLP to a receiver
this test runs: a worker w1 (``corrosion agent`` with an ``[orchestrator]`` section, the process
driver), a second agent w2, and a gateway (``python -m orchestrator gateway``) over w2's replica.
A stop sent through the gateway is SIGKILLed with the worker in the middle of its stop_instance
step; the restarted worker resumes the run. The receiver then holds ONE trace: the caller's span,
the gateway's, the worker's API span, the run's accept span, the step attempts of the killed
worker and those of the restarted one (whose run span continues under the accept span the step
log saved), and the publish of the machine's row with the agent's write under it and its apply
on w2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
from cli_helpers import node_mapping, short_tmp, write_config
from support import Proc, free_port, wait_for
from support.otlp_receiver import OtlpReceiver, ReceivedSpan, ancestors, is_descendant

from orchestrator.publish import MACHINES_SCHEMA_PATH

pytestmark = pytest.mark.anyio
TRACE_ID = "5b8efff798038103d269b633813fc60c"
TRACEPARENT = f"00-{TRACE_ID}-eee19b7ec3c1b174-01"
SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture
def anyio_backend():
    return "asyncio"


def process_env(which: str) -> dict[str, str]:
    """An agent's environment: spans batched for 100 ms (not 5 s) before export, and a resource
    attribute telling the processes apart (the two workers share an actor id)."""
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


def published(
    spans: list[ReceivedSpan], run_id: str, step: str
) -> tuple[ReceivedSpan, ReceivedSpan] | None:
    """The publish of the row the run's ``step`` changed and the agent's transaction under it."""
    steps = {
        s.span_id
        for s in spans
        if s.attributes.get("fsm.run_id") == run_id and s.attributes.get("fsm.step") == step
    }
    publishes = {s.span_id: s for s in spans
                 if s.name == "machines.publish" and s.parent_id in steps}  # fmt: skip
    for txn in spans:
        if txn.name == "corrosion.transaction" and txn.parent_id in publishes:
            return publishes[txn.parent_id], txn
    return None


def applied_on_w2(spans: list[ReceivedSpan], txn: ReceivedSpan) -> ReceivedSpan | None:
    """w2's apply of the version ``txn`` committed (in any trace: see the test's end), once its
    parent span (the transaction, or the sync session that carried it) arrived too."""
    version = {k: txn.attributes[k] for k in ("corrosion.actor_id", "corrosion.version")}
    applies = [s for s in spans if s.name == "corrosion.apply"
               and s.resource.get("test.process") == "replica"
               and {k: s.attributes.get(k) for k in version} == version]  # fmt: skip
    arrived = {s.span_id for s in spans}
    return next((s for s in applies if s.parent_id in arrived), None)


async def test_a_stop_killed_mid_step_and_resumed_is_one_trace(otlp_receiver: OtlpReceiver):
    with short_tmp() as base:
        release = base / "release"  # the machine exits once it exists
        api_port, gw_port, gossip1, gossip2 = (free_port() for _ in range(4))
        telemetry = {"open-telemetry": {"exporter": {"endpoint": otlp_receiver.url}}}
        orchestrator = {"machines_path": str(base / "machines"),
                        "state_path": str(base / "instances"), "driver": "process",
                        "worker": "w1"}  # fmt: skip
        w1 = node_mapping(
            base, "w1", [f"127.0.0.1:{gossip2}"], api={"addr": f"127.0.0.1:{api_port}"},
            gossip={"addr": f"127.0.0.1:{gossip1}"}, orchestrator=orchestrator,
            telemetry=telemetry,
        )  # fmt: skip
        w2 = node_mapping(base, "w2", [f"127.0.0.1:{gossip1}"], telemetry=telemetry,
                          gossip={"addr": f"127.0.0.1:{gossip2}"})  # fmt: skip
        w2["db"]["schema_paths"].append(str(MACHINES_SCHEMA_PATH))  # it runs no orchestrator
        worker_cmd = [sys.executable, "-m", "corrosion", "-c",
                      str(write_config(base / "w1.toml", w1)), "agent"]  # fmt: skip
        procs: list[Proc] = []

        def start(args: list[str], name: str, env: dict[str, str]) -> Proc:
            (base / name).mkdir()
            procs.append(Proc(args, base / name, env))
            return procs[-1]

        try:
            worker = start(worker_cmd, "first", process_env("first"))
            machines = f"http://127.0.0.1:{api_port}/v1/apps/web/machines"
            await wait_for(lambda: answering(machines, worker), what="the worker's API")
            replica = start([sys.executable, "-m", "corrosion", "-c",
                             str(write_config(base / "w2.toml", w2)), "agent"],
                            "replica", process_env("replica"))  # fmt: skip
            await wait_for(lambda: Path(w2["db"]["path"]).exists(), what="w2's database")
            # the gateway beside w2 reads w2's replica, where w1's rows arrive by replication
            gateway = start(
                [sys.executable, "-m", "orchestrator", "gateway", "--replica",
                 w2["db"]["path"], "--listen", f"127.0.0.1:{gw_port}"],
                "gateway",
                {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url,
                 "OTEL_BSP_SCHEDULE_DELAY": "100"},
            )  # fmt: skip
            gw = f"http://127.0.0.1:{gw_port}/v1/apps/web/machines"
            await wait_for(lambda: answering(gw, gateway), what="the gateway")

            # a machine that ignores SIGTERM (once it says so in ``trapped``): its stop_instance
            # step waits until release exists
            trapped = base / "trapped"
            script = f"trap '' TERM; touch {trapped}; while [ ! -e {release} ]; do sleep 0.05; done"
            config_ = {"image": "busybox", "init": {"exec": ["sh", "-c", script]}}
            async with httpx.AsyncClient(timeout=60) as client:

                async def w1_live() -> bool:
                    assert replica.p.poll() is None, replica.stderr()[-3000:]
                    workers = (await client.get(f"http://127.0.0.1:{gw_port}/v1/workers")).json()
                    return any(w["id"] == "w1" and w["live"] for w in workers)

                await wait_for(w1_live, what="w1's workers row to replicate to w2")
                r = await client.post(gw, json={"config": config_})
                assert r.status_code == 200, r.text
                mid = r.json()["id"]
                r = await client.get(f"{gw}/{mid}/wait", params={"state": "started"})
                assert r.status_code == 200, r.text
                await wait_for(trapped.exists, what="the machine to ignore SIGTERM")
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
                worker = start(worker_cmd, "second", process_env("second"))

                async def stopped() -> bool:
                    if not await answering(machines, worker):
                        return False
                    return (await client.get(f"{machines}/{mid}")).json()["state"] == "stopped"

                await wait_for(stopped, what="the resumed stop to finish")

                def resumed_run(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
                    return [s for s in spans if s.name == "machine.stop"
                            and s.attributes.get("fsm.run_id") == run_id]  # fmt: skip

                # generous: a loaded machine delays the restarted worker's rejoin and sync
                (run,) = await otlp_receiver.wait_for(resumed_run, 120, "the resumed run span")
                publish, txn = await otlp_receiver.wait_for(
                    lambda spans: published(spans, run_id, "mark_stopped"), 120,
                    "the stopped row's write",
                )  # fmt: skip
                apply = await otlp_receiver.wait_for(
                    lambda spans: applied_on_w2(spans, txn), 120, "w2 to apply the stopped row"
                )
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

    # the machine's row published under the step that changed it, written by the agent, and
    # applied on w2: in this trace when a broadcast brought it; a sync session that brought it
    # is in the trace of the first traced version it carried, linked to the others'
    assert mid in publish.attributes["machine.ids"] and publish.trace_id == TRACE_ID
    assert txn.resource["test.process"] == "second" and txn.parent_id == publish.span_id
    everything = otlp_receiver.snapshot()
    if apply.attributes["corrosion.via"] == "broadcast":
        assert is_descendant(apply, txn, everything)
    else:
        (session,) = [s for s in everything if s.span_id == apply.parent_id]
        assert session.name == "corrosion.sync"
        assert is_descendant(session, txn, everything) or (TRACE_ID, txn.span_id) in session.links
