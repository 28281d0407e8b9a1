"""Traces of machine operations, in process (corrosion's tracer provider, exporting in memory):
the Machines API request's span, its run's accept, run and step-attempt spans (attempt numbers,
errors), the publish of the machine's row, a run resumed by a new engine continuing the trace
its START saved, and step logs from before tracing."""

from __future__ import annotations

import anyio
import apsw
import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from orch_helpers import spans_named
from support import wait_for

from corrosion.runtime import tracing
from orchestrator.api import create_app
from orchestrator.clock import ManualClock
from orchestrator.drivers import FakeDriver
from orchestrator.engine import Engine
from orchestrator.errors import UnrecoverableError
from orchestrator.publish import MemoryPublisher
from orchestrator.service import Orchestrator
from orchestrator.steplog import MachineLog, RunRecord, RunStatus
from orchestrator.store import MachineStore

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hang_deadline")]
CONFIG = {"image": "busybox", "init": {"cmd": ["sleep", "600"]}}
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN:016x}-01"


def parent_id(span) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def the(spans, name):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


async def test_an_api_request_its_run_steps_and_publish_are_one_trace(tmp_path, spans):
    publisher = MemoryPublisher()
    orch = Orchestrator(machines_path=tmp_path / "machines", driver=FakeDriver(images={"busybox"}),
                        worker="w1", publisher=publisher)  # fmt: skip
    async with orch:
        transport = httpx.ASGITransport(app=create_app(orch, manage=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as client:
            r = await client.post("/v1/apps/web/machines", json={"config": CONFIG},
                                  headers={"traceparent": TRACEPARENT})  # fmt: skip
            assert r.status_code == 200, r.text
            mid = r.json()["id"]

            def run_done():
                return [s for s in spans.get_finished_spans() if s.name == "machine.create"]

            await wait_for(run_done, what="the create run's span")
            await wait_for(lambda: publisher.rows().get(mid, {}).get("state") == "started")
            r = await client.get(f"/v1/apps/web/machines/{mid}/events")
            (run,) = r.json()
    finished = spans.get_finished_spans()

    server = the(finished, "POST /v1/apps/{app}/machines")
    assert server.kind is SpanKind.SERVER and parent_id(server) == CALLER_SPAN
    assert server.context.trace_id == TRACE_ID
    assert server.attributes["http.response.status_code"] == 200
    accept = the(finished, "machine.create.accept")
    assert parent_id(accept) == server.context.span_id
    assert accept.attributes["machine.id"] == mid
    run_span = the(finished, "machine.create")
    assert parent_id(run_span) == accept.context.span_id
    assert run_span.attributes["fsm.status"] == "succeeded"
    assert run_span.attributes["fsm.resumed"] is False

    steps = spans_named(finished, "machine.create.")
    steps = [s for s in steps if s is not accept]
    assert [s.attributes["fsm.step"] for s in steps] == list(run["steps"]) + [
        "finally:" + f for f in run["finalizers"]
    ]
    for s in steps:
        assert parent_id(s) == run_span.context.span_id and s.attributes["fsm.attempt"] == 1
        assert s.status.status_code is StatusCode.UNSET and not s.attributes["fsm.restart"]
    others = {s.name for s in finished if s.context.trace_id != TRACE_ID}
    assert others <= {"GET /v1/apps/{app}/machines/{machine_id}/events", "machines.publish"}

    # the row's publishes run in the trace of the change: the API request's (the machine's
    # first document) or a step's
    publishes = [s for s in finished
                 if s.name == "machines.publish" and s.context.trace_id == TRACE_ID]  # fmt: skip
    assert publishes and all(list(s.attributes["machine.ids"]) == [mid] for s in publishes)
    changers = {server.context.span_id} | {s.context.span_id for s in steps}
    assert {parent_id(s) for s in publishes} <= changers
    assert any(parent_id(s) in {st.context.span_id for st in steps} for s in publishes)
    assert run["trace_id"] == f"{TRACE_ID:032x}"  # the events endpoint names the trace


async def test_step_attempts_carry_their_number_and_error(tmp_path, spans):
    store = MachineStore(tmp_path / "machines")
    store.create("m1")
    clock = ManualClock()
    calls = 0

    async def flaky(ctx):
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError(f"boom {calls}")

    async def doomed(ctx):
        raise UnrecoverableError("the image is gone")

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("flaky", [("flaky", flaky)])
        engine.register("doomed", [("doomed", doomed)], finalizers=[("fin", flaky)])
        run_id = await engine.start("m1", "flaky")
        for _ in range(2):
            await wait_for(lambda: clock.sleepers == 1)
            clock.advance(clock.next_deadline() - clock.now())
        assert (await engine.wait(run_id)).ok
        failed_run = await engine.start("m1", "doomed")
        assert (await engine.wait(failed_run)).status is RunStatus.FAILED
    store.close()
    finished = spans.get_finished_spans()

    attempts = spans_named(finished, "machine.flaky.flaky")
    assert [s.attributes["fsm.attempt"] for s in attempts] == [1, 2, 3]
    assert [s.attributes["fsm.retry_count"] for s in attempts] == [0, 1, 2]
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR] * 2 + [StatusCode.UNSET]
    assert [s.status.description for s in attempts[:2]] == ["RuntimeError: boom 1",
                                                            "RuntimeError: boom 2"]  # fmt: skip
    for s in attempts[:2]:
        (event,) = s.events
        assert event.name == "exception" and event.attributes["exception.type"] == "RuntimeError"
    assert the(finished, "machine.flaky").status.status_code is StatusCode.UNSET

    doomed_step = the(finished, "machine.doomed.doomed")
    assert doomed_step.status.status_code is StatusCode.ERROR
    assert doomed_step.attributes["fsm.error_kind"] == "unrecoverable"
    doomed_run = the(finished, "machine.doomed")
    assert doomed_run.status.status_code is StatusCode.ERROR
    assert doomed_run.status.description == "the image is gone"
    assert doomed_run.attributes["fsm.status"] == "failed"
    assert the(finished, "machine.doomed.finally:fin").parent.span_id == (
        doomed_run.context.span_id
    )


async def test_a_run_resumed_by_a_new_engine_continues_its_trace(tmp_path, spans):
    """The engine stops while step b is in flight (as a redeploy does); the next engine resumes
    the run under the context its START saved: one trace with both engines' attempts."""
    in_b = anyio.Event()

    def steps(block_b: bool):
        async def a(ctx):
            return None

        async def b(ctx):
            if block_b:
                in_b.set()
                await anyio.sleep_forever()

        return [("a", a), ("b", b), ("c", a)]

    store = MachineStore(tmp_path / "machines")
    store.create("m1")
    with tracing.tracer("test").start_as_current_span("client") as client:
        async with Engine(store) as engine:
            engine.register("op", steps(block_b=True))
            run_id = await engine.start("m1", "op")
            await in_b.wait()
    store.close()
    saved = MachineLog(tmp_path / "machines" / "m1.sqlite").get_run(run_id)
    assert saved is not None and saved.record.trace["traceparent"].startswith(
        f"00-{client.get_span_context().trace_id:032x}-"
    )

    store = MachineStore(tmp_path / "machines")  # a new process would do the same
    async with Engine(store) as engine:
        engine.register("op", steps(block_b=False))
        assert (await engine.wait(run_id)).ok
    store.close()
    finished = spans.get_finished_spans()

    accept = the(finished, "machine.op.accept")
    assert parent_id(accept) == client.get_span_context().span_id
    assert saved.record.trace["traceparent"].split("-")[2] == f"{accept.context.span_id:016x}"
    first, second = sorted((s for s in finished if s.name == "machine.op"),
                           key=lambda s: s.start_time)  # fmt: skip
    assert first.attributes["fsm.suspended"] and not first.attributes["fsm.resumed"]
    assert second.attributes["fsm.resumed"] and second.attributes["fsm.status"] == "succeeded"
    assert parent_id(first) == parent_id(second) == accept.context.span_id
    by_run = {
        run.context.span_id: [
            (s.attributes["fsm.step"], s.attributes["fsm.restart"])
            for s in spans_named(finished, "machine.op.")
            if parent_id(s) == run.context.span_id
        ]
        for run in (first, second)
    }
    assert by_run[first.context.span_id] == [("a", False), ("b", False)]
    assert by_run[second.context.span_id] == [("b", True), ("c", True)]
    interrupted = [s for s in finished if s.attributes.get("fsm.interrupted")]
    assert [s.attributes["fsm.step"] for s in interrupted] == ["b"]
    assert {s.context.trace_id for s in finished} == {client.get_span_context().trace_id}


V2_SCHEMA = """
CREATE TABLE runs (seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, action TEXT NOT NULL,
    steps TEXT NOT NULL, finalizers TEXT NOT NULL, request TEXT NOT NULL,
    created_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'active', finished_at REAL,
    error TEXT, response TEXT);
CREATE UNIQUE INDEX runs_run_id ON runs (run_id);
CREATE INDEX runs_status_action ON runs (status, action);
CREATE TABLE events (run_seq INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    step TEXT, payload TEXT, retry_count INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL,
    PRIMARY KEY (run_seq, seq));
CREATE TABLE history (seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, action TEXT NOT NULL,
    steps TEXT NOT NULL, finalizers TEXT NOT NULL, status TEXT NOT NULL,
    created_at REAL NOT NULL, finished_at REAL, request TEXT NOT NULL, error TEXT,
    events TEXT NOT NULL);
CREATE TABLE machine (id INTEGER PRIMARY KEY, doc TEXT NOT NULL, updated_at REAL NOT NULL);
INSERT INTO runs (run_id, action, steps, finalizers, request, created_at)
    VALUES ('old', 'op', '["a"]', '[]', '{}', 1.0);
INSERT INTO events VALUES (1, 0, 'start', NULL, NULL, 0, 1.0);
PRAGMA user_version = 2;
"""


async def test_a_run_logged_before_tracing_resumes_in_a_trace_of_its_own(tmp_path, spans):
    """A step log from the release before tracing (schema 2) gains the trace column; its
    unfinished run resumes untraced-so-far: a root run span with its steps under it."""
    (tmp_path / "machines").mkdir()
    conn = apsw.Connection(str(tmp_path / "machines" / "m1.sqlite"))
    conn.execute(V2_SCHEMA)
    conn.close()

    async def a(ctx):
        return None

    store = MachineStore(tmp_path / "machines")
    async with Engine(store) as engine:
        engine.register("op", [("a", a)])
        assert (await engine.wait("old")).ok
    timeline = store.log("m1").timeline()
    store.close()
    assert [(t["run_id"], t["trace_id"]) for t in timeline] == [("old", None)]
    run = the(spans.get_finished_spans(), "machine.op")
    assert run.parent is None and run.attributes["fsm.resumed"]
    step = the(spans.get_finished_spans(), "machine.op.a")
    assert parent_id(step) == run.context.span_id


def test_compaction_keeps_each_runs_trace_id(tmp_path):
    log = MachineLog(tmp_path / "m.sqlite")
    parents = [f"00-{i:032x}-{i:016x}-01" for i in (1, 2)]
    for i, traceparent in enumerate(parents):
        record = RunRecord(f"r{i}", "op", ("a",), (), {}, float(i), {"traceparent": traceparent})
        log.start_run(record)
        log.finish(f"r{i}", RunStatus.SUCCEEDED, error=None, response={}, at=float(i))
    log.start_run(RunRecord("untraced", "op", ("a",), (), {}, 5.0))
    assert log.compact(keep=1) == 1
    timeline = log.timeline()
    assert [(t["run_id"], t["compacted"], t["trace_id"]) for t in timeline] == [
        ("r0", True, f"{1:032x}"), ("r1", False, f"{2:032x}"), ("untraced", False, None),
    ]  # fmt: skip
    assert log.get_run("r1").record.trace == {"traceparent": parents[1]}
    log.close()
