"""The FSM engine: step order, logging, one active run per action, retries, halts, cancel,
resume after the engine stops mid-step, and runs from an older release."""

from __future__ import annotations

import json

import anyio
import pytest
from orch_helpers import slow_start_run
from support import wait_for

from orchestrator.clock import ManualClock
from orchestrator.engine import Backoff, Engine, EngineObserver
from orchestrator.errors import (
    AbortError,
    AlreadyRunningError,
    EngineClosedError,
    UnknownActionError,
    UnknownRunError,
    UnrecoverableError,
)
from orchestrator.steplog import EventKind, RunStatus
from orchestrator.store import MachineStore

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hang_deadline")]


def make_store(tmp_path, *machines):
    store = MachineStore(tmp_path / "machines")
    for m in machines:
        store.create(m)
    return store


async def test_steps_run_in_order_and_are_logged(tmp_path):
    store = make_store(tmp_path, "m1")
    calls = []

    async def a(ctx):
        calls.append(("a", dict(ctx.request), dict(ctx.response)))
        return {"x": 1}

    async def b(ctx):
        calls.append(("b", dict(ctx.request), dict(ctx.response)))
        return {"y": ctx.response["x"] + 1}

    async def fin(ctx):
        calls.append(("fin", ctx.error, dict(ctx.response)))

    async with Engine(store) as engine:
        engine.register("op", [("a", a), ("b", b)], finalizers=[("fin", fin)])
        run_id = await engine.start("m1", "op", {"k": "v"})
        result = await engine.wait(run_id)
    assert result.ok and result.status is RunStatus.SUCCEEDED
    assert dict(result.response) == {"x": 1, "y": 2}
    assert calls == [
        ("a", {"k": "v"}, {}),
        ("b", {"k": "v"}, {"x": 1}),
        ("fin", None, {"x": 1, "y": 2}),
    ]
    events = store.log("m1").events(run_id)
    assert [(e.kind, e.step) for e in events] == [
        (EventKind.START, None),
        (EventKind.COMPLETE, "a"),
        (EventKind.COMPLETE, "b"),
        (EventKind.COMPLETE, "finally:fin"),
        (EventKind.FINISH, None),
    ]
    assert [e.seq for e in events] == list(range(5))
    # the run is closed in the log and readable after the engine is gone
    run = store.log("m1").get_run(run_id)
    assert run.status is RunStatus.SUCCEEDED and run.response == {"x": 1, "y": 2}
    assert store.log("m1").active_runs() == []
    store.close()


async def test_one_active_run_per_machine_and_action(tmp_path):
    store = make_store(tmp_path, "m1", "m2")
    gate = anyio.Event()

    async def block(ctx):
        await gate.wait()

    async with Engine(store) as engine:
        engine.register("start", [("block", block)])
        first = await engine.start("m1", "start")
        with pytest.raises(AlreadyRunningError) as err:
            await engine.start("m1", "start")
        assert err.value.run_id == first
        assert first in str(err.value)
        other = await engine.start("m2", "start")  # another machine is independent
        queued = await engine.start("m1", "start", queue=True)
        runs = engine.list_runs("m1")
        assert [(r.run_id, r.state) for r in runs] == [(first, "running"), (queued, "queued")]
        assert {r.machine_id for r in engine.list_runs()} == {"m1", "m2"}
        gate.set()
        for rid in (first, other, queued):
            assert (await engine.wait(rid)).ok
        assert engine.list_runs() == []
        # the slot is free again
        assert (await engine.wait(await engine.start("m1", "start"))).ok
    store.close()


async def test_runs_of_one_machine_never_interleave(tmp_path):
    store = make_store(tmp_path, "m1")
    trace = []

    def op(tag):
        async def s1(ctx):
            trace.append((tag, "s1"))
            await anyio.sleep(0.01)

        async def s2(ctx):
            trace.append((tag, "s2"))

        return [("s1", s1), ("s2", s2)]

    async with Engine(store) as engine:
        engine.register("x", op("x"))
        engine.register("y", op("y"))
        rx = await engine.start("m1", "x")
        ry = await engine.start("m1", "y")
        await engine.wait(rx)
        await engine.wait(ry)
    assert trace == [("x", "s1"), ("x", "s2"), ("y", "s1"), ("y", "s2")]
    store.close()


async def test_errors_retry_with_exponential_backoff_on_the_injected_clock(tmp_path):
    store = make_store(tmp_path, "m1")
    clock = ManualClock()
    attempts = []

    async def flaky(ctx):
        attempts.append((ctx.retry_count, clock.now()))
        if len(attempts) < 4:
            raise RuntimeError("boom" if len(attempts) < 3 else "different")
        return {"done": True}

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("flaky", flaky)])
        run_id = await engine.start("m1", "op")
        for _ in range(3):
            await wait_for(lambda: clock.sleepers == 1)
            clock.advance(clock.next_deadline() - clock.now())
        result = await engine.wait(run_id)
    assert result.ok
    t0 = attempts[0][1]
    assert [(r, round(t - t0, 6)) for r, t in attempts] == [(0, 0), (1, 0.1), (2, 0.3), (3, 0.7)]
    errors = [e for e in store.log("m1").events(run_id) if e.kind is EventKind.ERROR]
    # logged when the text changes, not on every attempt
    assert [(e.retry_count, e.payload["message"]) for e in errors] == [
        (1, "RuntimeError: boom"),
        (3, "RuntimeError: different"),
    ]
    store.close()


def test_backoff_caps_at_five_seconds():
    b = Backoff()
    assert [b.delay(n) for n in (1, 2, 3, 6, 7, 20)] == [0.1, 0.2, 0.4, 3.2, 5.0, 5.0]
    j = Backoff(jitter=0.5)
    assert all(2.5 <= j.delay(30) <= 5.0 for _ in range(100))


@pytest.mark.parametrize("exc", [AbortError("stop here"), UnrecoverableError("bad image")])
async def test_halt_skips_remaining_steps_and_runs_finalizers(tmp_path, exc):
    store = make_store(tmp_path, "m1")
    ran = []

    async def ok(ctx):
        ran.append("ok")
        return {"a": 1}

    async def halt(ctx):
        ran.append("halt")
        raise exc

    async def never(ctx):
        ran.append("never")

    async def fin(ctx):
        ran.append(("fin", ctx.error.kind, ctx.error.step, dict(ctx.response)))

    async with Engine(store) as engine:
        engine.register(
            "op", [("ok", ok), ("halt", halt), ("never", never)], finalizers=[fin_ := ("fin", fin)]
        )
        result = await engine.wait(await engine.start("m1", "op"))
    del fin_
    assert ran == ["ok", "halt", ("fin", exc.kind, "halt", {"a": 1})]
    assert result.status is RunStatus.FAILED
    assert result.error.kind == exc.kind and str(exc) in result.error.message
    kinds = [e.kind for e in store.log("m1").events(result.run_id)]
    assert kinds == ["start", "complete", "cancel", "complete", "finish"]
    store.close()


async def test_retries_exhausted_halts(tmp_path):
    store = make_store(tmp_path, "m1")
    clock = ManualClock()
    fins = []

    async def bad(ctx):
        raise OSError("driver down")

    async def fin(ctx):
        fins.append(ctx.error)

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("bad", bad)], finalizers=[("fin", fin)], max_retries=2)
        run_id = await engine.start("m1", "op")
        for _ in range(2):
            await wait_for(lambda: clock.sleepers == 1)
            clock.advance(10)
        result = await engine.wait(run_id)
    assert result.status is RunStatus.FAILED
    assert result.error.kind == "retries_exhausted" and "driver down" in result.error.message
    assert fins == [result.error]
    store.close()


async def test_cancel_halts_the_step_in_flight(tmp_path):
    store = make_store(tmp_path, "m1")
    started = anyio.Event()
    seen = []

    async def hang(ctx):
        started.set()
        await anyio.sleep_forever()

    async def after(ctx):
        seen.append("after")

    async def fin(ctx):
        seen.append(("fin", ctx.error.kind, ctx.error.message))

    async with Engine(store) as engine:
        engine.register("op", [("hang", hang), ("after", after)], finalizers=[("fin", fin)])
        run_id = await engine.start("m1", "op")
        await started.wait()
        assert await engine.cancel(run_id, "user asked")
        result = await engine.wait(run_id)
        assert not await engine.cancel(run_id)
    assert result.status is RunStatus.CANCELLED
    assert seen == [("fin", "cancelled", "user asked")]
    store.close()


async def test_wait_timeout_and_unknown_run(tmp_path):
    store = make_store(tmp_path, "m1")

    async def hang(ctx):
        await anyio.sleep_forever()

    async with Engine(store) as engine:
        engine.register("op", [("hang", hang)])
        run_id = await engine.start("m1", "op")
        with pytest.raises(TimeoutError):
            await engine.wait(run_id, timeout=0.05)
        with pytest.raises(UnknownRunError):
            await engine.wait("nope")
        await engine.cancel(run_id)
        await engine.wait(run_id)
    store.close()


async def test_bad_requests_change_nothing(tmp_path):
    store = make_store(tmp_path, "m1")

    async def s(ctx):
        return None

    async with Engine(store) as engine:
        engine.register("op", [("s", s)])
        with pytest.raises(UnknownActionError):
            await engine.start("m1", "nope")
        with pytest.raises(ValueError, match="JSON"):
            await engine.start("m1", "op", {"bad": object()})
        with pytest.raises(ValueError, match="duplicate"):
            engine.register("dup", [("s", s), ("s", s)])
        with pytest.raises(ValueError):
            engine.register("empty", [])
    assert store.log("m1").history() == []
    store.close()


class Recorder(EngineObserver):
    def __init__(self):
        self.steps = []

    def step_started(self, info, step, is_restart, retry):
        self.steps.append((info.run_id, step, is_restart))


async def test_resume_after_stop_mid_step(tmp_path):
    """The engine stops (as in a crash) while step b is in flight: a new engine on the same
    directory resumes at b, told it is a restart; a is not run again; finalizers run once."""
    store = make_store(tmp_path, "m1")
    effects = []
    in_b = anyio.Event()

    def steps(block_b):
        async def a(ctx):
            effects.append(("a", ctx.is_restart))
            return {"a": True}

        async def b(ctx):
            effects.append(("b", ctx.is_restart))
            if block_b:
                in_b.set()
                await anyio.sleep_forever()
            return {"b": True}

        async def c(ctx):
            effects.append(("c", ctx.is_restart))
            return {"c": ctx.response["a"] and ctx.response["b"]}

        async def fin(ctx):
            effects.append(("fin", ctx.is_restart))

        return [("a", a), ("b", b), ("c", c)], [("fin", fin)]

    async with Engine(store) as engine:
        s, f = steps(block_b=True)
        engine.register("op", s, finalizers=f)
        run_id = await engine.start("m1", "op")
        await in_b.wait()
    assert effects == [("a", False), ("b", False)]
    store.close()

    store = MachineStore(tmp_path / "machines")  # a new process would do the same
    rec = Recorder()
    async with Engine(store, observer=rec) as engine:
        s, f = steps(block_b=False)
        engine.register("op", s, finalizers=f)
        assert [r.run_id for r in engine.list_runs()] == [run_id]
        result = await engine.wait(run_id)
    assert effects[2:] == [("b", True), ("c", True), ("fin", True)]
    assert result.ok and dict(result.response) == {"a": True, "b": True, "c": True}
    assert [s for _, s, _ in rec.steps] == ["b", "c", "finally:fin"]
    store.close()


async def test_a_start_in_flight_when_the_engine_stops_is_resumed_not_lost(tmp_path):
    """The engine stops while a START is being written in its worker thread: the caller gets
    EngineClosedError (not an internal error), and the next engine resumes the logged run."""
    store = make_store(tmp_path, "m1")
    log_ = store.log("m1")
    writing, release, restore_start_run = slow_start_run(log_)
    ran = []

    async def a(ctx):
        ran.append(ctx.is_restart)

    outcome = []

    async def starter(engine):
        try:
            outcome.append(await engine.start("m1", "op"))
        except EngineClosedError as e:
            outcome.append(e)

    async with anyio.create_task_group() as tg:
        async with Engine(store) as engine:
            engine.register("op", [("a", a)])
            tg.start_soon(starter, engine)
            await anyio.to_thread.run_sync(writing.wait, 60)
        release.set()  # the engine is closed; now the START is written
    (error,) = outcome
    assert isinstance(error, EngineClosedError)
    assert ran == []
    restore_start_run()

    async with Engine(store) as engine:
        engine.register("op", [("a", a)])
        (run,) = engine.list_runs()
        assert str(error) == (
            f"the engine stopped while run {run.run_id} (op) was being started; "
            "it is logged and resumes when the engine starts again"
        )
        assert (await engine.wait(run.run_id)).ok
    assert ran == [True]
    store.close()


async def test_unregistered_steps_of_an_old_release_are_no_ops(tmp_path):
    store = make_store(tmp_path, "m1")
    gate = anyio.Event()

    async def first(ctx):
        await gate.wait()

    async def legacy(ctx):
        raise AssertionError("not reached")

    async with Engine(store) as engine:
        engine.register("op", [("first", first), ("legacy", legacy), ("last", first)])
        run_id = await engine.start("m1", "op")
    store.close()

    store = MachineStore(tmp_path / "machines")
    ran = []

    async def new_first(ctx):
        ran.append("first")

    async def new_last(ctx):
        ran.append("last")

    async with Engine(store) as engine:
        engine.register("op", [("first", new_first), ("last", new_last)])  # "legacy" is gone
        result = await engine.wait(run_id)
    assert result.ok and ran == ["first", "last"]
    steps = [e.step for e in store.log("m1").events(run_id) if e.kind == "complete"]
    assert steps == ["first", "legacy", "last"]
    store.close()


async def test_cancel_is_durable_across_restart(tmp_path):
    """CANCEL logged, then the engine stops before finalizers: the resumed run only finalizes."""
    store = make_store(tmp_path, "m1")
    hold = anyio.Event()

    async def hang(ctx):
        hold.set()
        await anyio.sleep_forever()

    async def fin_block(ctx):
        await anyio.sleep_forever()

    async with Engine(store) as engine:
        engine.register("op", [("hang", hang), ("next", hang)], finalizers=[("fin", fin_block)])
        run_id = await engine.start("m1", "op")
        await hold.wait()
        await engine.cancel(run_id, "bye")
        await wait_for(lambda: engine.list_runs()[0].step == "finally:fin")
    store.close()

    store = MachineStore(tmp_path / "machines")
    seen = []

    async def nope(ctx):
        seen.append(ctx.step)

    async def fin(ctx):
        seen.append(("fin", ctx.error.kind))

    async with Engine(store) as engine:
        engine.register("op", [("hang", nope), ("next", nope)], finalizers=[("fin", fin)])
        result = await engine.wait(run_id)
    assert seen == [("fin", "cancelled")]
    assert result.status is RunStatus.CANCELLED
    store.close()


async def test_finished_runs_are_readable_from_the_log(tmp_path):
    store = make_store(tmp_path, "m1")

    async def s(ctx):
        return {"v": 1}

    async with Engine(store) as engine:
        engine.register("op", [("s", s)])
        run_id = await engine.start("m1", "op")
        await engine.wait(run_id)
    async with Engine(store) as engine:  # fresh engine: nothing in memory
        engine.register("op", [("s", s)])
        result = await engine.wait(run_id, machine_id="m1")
        assert result.ok and dict(result.response) == {"v": 1}
    raw = store.log("m1").events(run_id)[-1]
    assert raw.kind is EventKind.FINISH and json.dumps(raw.payload) == '{"status": "succeeded"}'
    store.close()


async def test_staged_document_changes_commit_with_the_step(tmp_path):
    store = make_store(tmp_path, "m1")
    store.log("m1").write_doc({"state": "created"}, at=0)

    async def mark(ctx):
        ctx.stage(lambda d: d.update(state="starting"))
        return {"ok": 1}

    async def flaky(ctx):
        ctx.stage(lambda d: d.update(state="broken"))  # dropped: the step raises
        if ctx.retry_count == 0:
            raise RuntimeError("once")
        ctx.stage(lambda d: d.update(state="started"))

    async with Engine(store, backoff=Backoff(initial=0.001)) as engine:
        engine.register("op", [("mark", mark), ("flaky", flaky)])
        run_id = await engine.start("m1", "op")
        assert (await engine.wait(run_id)).ok
    log = store.log("m1")
    assert log.read_doc()["state"] == "started"
    completes = [e for e in log.events(run_id) if e.kind == "complete"]
    assert [e.step for e in completes] == ["mark", "flaky"]
    store.close()
