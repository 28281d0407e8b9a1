"""The FSM engine's edges, each checked on a real step log (SQLite under tmp_path): backoff
arithmetic, retry limits (steps halt, finalizers never do), retry counts carried across a
restart, cancel of a queued run and of a finalizing one, finish hooks and ``busy``, the
live-run views (list_runs, active_action, RunInfo), waits with a timeout and from the log, a
storage failure mid-run, the step context, and the log lines and spans of how a run ended.

Fast on purpose: bench/mutation_score.py runs these for every mutant of orchestrator/engine.py."""

from __future__ import annotations

import functools
import logging
import random

import anyio
import pytest
from opentelemetry.trace import StatusCode
from orch_helpers import slow_start_run, spans_named
from support import wait_for

from orchestrator.clock import ManualClock
from orchestrator.engine import Backoff, Engine, EngineObserver, RunError, Step
from orchestrator.errors import (
    AbortError,
    EngineClosedError,
    UnknownActionError,
    UnknownRunError,
    UnrecoverableError,
)
from orchestrator.ids import IdFactory
from orchestrator.steplog import EventKind, RunRecord, RunStatus
from orchestrator.store import MachineStore

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("hang_deadline")]
T0 = 1_700_000_000.0  # ManualClock's start


@pytest.fixture
def store(tmp_path):
    s = MachineStore(tmp_path / "machines")
    for m in ("m1", "m2"):
        s.create(m)
    yield s
    s.close()


async def next_backoff(clock: ManualClock, sleepers: int = 1) -> float:
    """Wait until the run backs off on ``clock``, move time to its wake-up; the delay."""
    await wait_for(lambda: clock.sleepers == sleepers)
    delay = clock.next_deadline() - clock.now()
    clock.advance(delay)
    return delay


def events(store, run_id):
    return [(e.kind, e.step) for e in store.log("m1").events(run_id)]


# --- backoff and errors as data ------------------------------------------------------------------


def test_backoff_grows_by_its_multiplier_from_its_initial_delay_up_to_its_cap():
    b = Backoff(initial=1.0, maximum=50.0, multiplier=3.0)
    assert [b.delay(n) for n in (0, 1, 2, 3, 4, 5)] == [1.0, 1.0, 3.0, 9.0, 27.0, 50.0]
    # jitter scales by 1 - jitter * (the injected RNG's next number)
    j = Backoff(initial=2.0, jitter=0.25, rng=random.Random(7))
    draws = random.Random(7)
    assert [j.delay(1), j.delay(1)] == [2.0 * (1 - 0.25 * draws.random()) for _ in range(2)]
    # the default RNG is seeded: the same delays every run
    assert Backoff(jitter=0.5).delay(1) == 0.1 * (1 - 0.5 * random.Random(0).random())
    # no jitter: the RNG is not drawn from
    rng = random.Random(3)
    Backoff(rng=rng).delay(4)
    assert rng.random() == random.Random(3).random()


def test_run_error_round_trips_and_fills_what_an_old_log_lacks():
    e = RunError("abort", "no image", "pull")
    assert e.to_dict() == {"kind": "abort", "message": "no image", "step": "pull"}
    assert RunError.from_dict(e.to_dict()) == e
    assert RunError.from_dict({}) == RunError("halt", "", None)


# --- registration and start ----------------------------------------------------------------------


async def noop(ctx):
    return None


def test_registration_checks_names_and_keeps_what_it_was_given(store):
    engine = Engine(store)
    for bad in ("", "finally:x"):
        with pytest.raises(ValueError, match=rf"^operation 'op': invalid step name {bad!r}$"):
            engine.register("op", [(bad, noop)])
        with pytest.raises(ValueError, match=rf"^operation 'op': invalid step name {bad!r}$"):
            engine.register("op", [("s", noop)], finalizers=[(bad, noop)])
    with pytest.raises(ValueError, match=r"^operation 'op': duplicate step names in \['f', 'f'\]$"):
        engine.register("op", [("s", noop)], finalizers=[("f", noop), ("f", noop)])
    with pytest.raises(ValueError, match=r"^operation 'op' needs at least one step$"):
        engine.register("op", [])
    with pytest.raises(UnknownActionError, match=r"^unknown action 'op'$"):
        engine.operation("op")  # nothing refused was registered
    op = engine.register("op", [Step("a", noop), ("b", noop)], finalizers=[("f", noop)],
                         max_retries=4)  # fmt: skip
    assert engine.operation("op") is op and (op.action, op.max_retries) == ("op", 4)
    assert [s.name for s in op.steps] == ["a", "b"] and op.step("b").fn is noop
    assert op.step("f") is None and op.finalizer("f").name == "f" and op.finalizer("a") is None
    again = engine.register("op", [("c", noop)])  # registering again replaces
    assert engine.operation("op") is again and again.max_retries is None


async def test_start_refused_before_enter_and_after_exit_logs_nothing(store):
    engine = Engine(store)
    engine.register("op", [("s", noop)])
    with pytest.raises(EngineClosedError, match=r"^the engine is not running$"):
        await engine.start("m1", "op")
    async with engine:
        pass
    with pytest.raises(EngineClosedError, match=r"^the engine is not running$"):
        await engine.start("m1", "op")
    assert store.log("m1").history() == []


async def test_start_logs_the_run_record_and_the_document(store):
    clock = ManualClock()
    seen = []

    async def s(ctx):
        seen.append((dict(ctx.request), ctx.run_id, ctx.machine_id, ctx.action, ctx.step))
        seen.append(ctx.clock is clock)
        try:
            ctx.request["x"] = 1
        except TypeError:
            seen.append("read-only")
        ctx.response["leak"] = True  # a copy: not the run's response

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("s", s), ("t", noop)], finalizers=[("f", noop)])
        with pytest.raises(ValueError, match=r"^run request must be JSON-serializable: Object "
                                             r"of type set is not JSON serializable$"):  # fmt: skip
            await engine.start("m1", "op", {"s": {1}})
        run_id = await engine.start("m1", "op", doc={"state": "starting"})
        assert (await engine.wait(run_id)).response == {}
    assert seen == [({}, run_id, "m1", "op", "s"), True, "read-only"]  # no request: an empty one
    run = store.log("m1").get_run(run_id)
    assert run.finished_at == T0 and store.log("m1").events(run_id)[-1].at == T0
    assert run.record.steps == ("s", "t") and run.record.finalizers == ("f",)
    assert run.record.created_at == T0 and run.record.request == {}
    assert store.log("m1").read_doc() == {"state": "starting"}


# --- live runs: list_runs, active_action, busy, finish hooks ------------------------------------


async def test_list_runs_reports_each_live_run(store):
    clock = ManualClock()
    gate = anyio.Event()

    async def flaky(ctx):
        if ctx.retry_count == 0:
            raise RuntimeError("once")
        await gate.wait()

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("first", noop), ("flaky", flaky)])
        engine.register("other", [("s", noop)])
        r2 = await engine.start("m2", "op", {"k": 1})
        r1 = await engine.start("m1", "op")
        q1 = await engine.start("m1", "other", queue=True)
        await next_backoff(clock, sleepers=2)  # both runs' "flaky" back off, then retry
        await wait_for(lambda: [r.retry_count for r in engine.list_runs()] == [1, 0, 1])
        runs = engine.list_runs()
        assert [(r.machine_id, r.run_id, r.state) for r in runs] == [
            ("m1", r1, "running"),
            ("m1", q1, "queued"),
            ("m2", r2, "running"),
        ]  # machines in id order, each in START order
        first, queued, other = runs
        assert (first.action, first.step, first.resumed, first.created_at) == (
            "op",
            "flaky",
            False,
            T0,
        )
        assert (queued.step, queued.retry_count, queued.action) == (None, 0, "other")
        assert dict(queued.request) == {}
        assert dict(other.request) == {"k": 1}
        assert [r.run_id for r in engine.list_runs("m2")] == [r2]
        assert engine.list_runs("m3") == []
        assert engine.active_action("m1", "op") == r1
        assert engine.active_action("m1", "other") == q1
        assert engine.active_action("m2", "other") is None
        assert engine.active_action("m3", "op") is None
        gate.set()
        for run_id in (r1, q1, r2):
            await engine.wait(run_id)
        assert engine.active_action("m1", "op") is None and engine.list_runs() == []


async def test_step_and_retry_count_of_a_running_run(store):
    clock = ManualClock()

    async def bad(ctx):
        raise RuntimeError("down")

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("ok", noop), ("bad", bad)])
        run_id = await engine.start("m1", "op")
        assert await next_backoff(clock) == pytest.approx(0.1)
        assert await next_backoff(clock) == pytest.approx(0.2)
        await wait_for(lambda: clock.sleepers == 1)
        (info,) = engine.list_runs()
        assert (info.run_id, info.step, info.retry_count) == (run_id, "bad", 2)
        assert await engine.cancel(run_id)  # while backing off: it halts when it wakes
        clock.advance(1)
        result = await engine.wait(run_id)
    assert result.status is RunStatus.CANCELLED and result.error.step == "bad"


async def test_finish_hooks_run_in_order_before_the_machines_next_run(store, caplog):
    order = []
    in_hook, release = anyio.Event(), anyio.Event()

    async def step(ctx):
        order.append(("step", ctx.action))

    async def failing_hook(result):
        order.append(("hook1", result.action, result.status))
        raise RuntimeError("hook bug")

    async def slow_hook(result):
        order.append(("hook2", result.action))
        if result.action == "a":
            in_hook.set()
            await release.wait()

    async with Engine(store) as engine:
        engine.register("a", [("s", step)])
        engine.register("b", [("s", step)])
        engine.on_finish(failing_hook)
        engine.on_finish(slow_hook)
        ra = await engine.start("m1", "a")
        assert engine.busy("m1")  # its run is live
        await in_hook.wait()
        assert engine.busy("m1") and not engine.busy("m2")
        assert engine.list_runs("m1") == []  # a finished; its hooks still run
        assert engine.active_action("m1", "a") is None
        rb = await engine.start("m1", "b", queue=True)
        assert ("step", "b") not in order  # waits for a's hooks
        release.set()
        await engine.wait(rb)
        await wait_for(lambda: not engine.busy("m1"))
        assert (await engine.wait(ra)).ok
    assert order == [
        ("step", "a"),
        ("hook1", "a", RunStatus.SUCCEEDED),
        ("hook2", "a"),
        ("step", "b"),
        ("hook1", "b", RunStatus.SUCCEEDED),
        ("hook2", "b"),
    ]
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert failed == [f"finish hook failed for run {ra}", f"finish hook failed for run {rb}"]


async def test_a_run_a_finish_hook_starts_joins_the_finished_runs_trace(store, spans):
    started = []

    async def hook(result):
        if result.action == "first":
            started.append(await engine.start(result.machine_id, "after", queue=True))

    async with Engine(store) as engine:
        engine.register("first", [("s", noop)])
        engine.register("after", [("s", noop)])
        engine.on_finish(hook)
        await engine.wait(await engine.start("m1", "first"))
        await wait_for(lambda: started)
        await engine.wait(started[0])
    finished = spans.get_finished_spans()
    (first,) = [s for s in finished if s.name == "machine.first"]
    (accept,) = [s for s in finished if s.name == "machine.after.accept"]
    assert accept.context.trace_id == first.context.trace_id
    assert accept.parent.span_id == first.context.span_id


# --- wait ----------------------------------------------------------------------------------------


async def test_wait_times_out_on_the_engines_clock(store):
    clock = ManualClock()
    gate = anyio.Event()

    async def block(ctx):
        await gate.wait()

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("s", block)])
        run_id = await engine.start("m1", "op")
        outcome = []

        async def waiter():
            try:
                await engine.wait(run_id, timeout=5)
            except TimeoutError as e:
                outcome.append(str(e))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_for(lambda: clock.sleepers == 1)
            clock.advance(4.9)
            await anyio.sleep(0.01)
            assert outcome == []
            clock.advance(0.1)
        assert outcome == [f"run {run_id} still running after 5 s"]
        async with anyio.create_task_group() as tg:  # a wait with time to spare returns
            tg.start_soon(functools.partial(engine.wait, run_id, timeout=5))
            await wait_for(lambda: clock.sleepers == 1)
            gate.set()
        assert clock.sleepers == 0


async def test_wait_finds_finished_runs_in_memory_then_in_the_log(store):
    async def s(ctx):
        return {"n": ctx.request["n"]}

    async with Engine(store, finished_cache=1) as engine:
        engine.register("op", [("s", s)])
        first = await engine.start("m1", "op", {"n": 1})
        await engine.wait(first)
        assert (await engine.wait(first)).response == {"n": 1}  # remembered
        second = await engine.start("m1", "op", {"n": 2})
        await engine.wait(second)
        assert (await engine.wait(second)).response == {"n": 2}
        with pytest.raises(UnknownRunError, match=rf"^run {first} not found$"):
            await engine.wait(first)  # pushed out of memory by the cap of one
        result = await engine.wait(first, machine_id="m1")
        assert result.ok and result.response == {"n": 1} and result.action == "op"
        assert (result.run_id, result.machine_id) == (first, "m1")
        with pytest.raises(UnknownRunError):
            await engine.wait(first, machine_id="m2")
        with pytest.raises(UnknownRunError):
            await engine.wait(first, machine_id="nosuch")


async def test_wait_does_not_report_a_run_that_is_active_in_the_log(store):
    async def hang(ctx):
        await anyio.sleep_forever()

    async with Engine(store) as engine:
        engine.register("op", [("s", hang)])
        run_id = await engine.start("m1", "op")
    idle = Engine(store)  # not started: the run is in the log, not live here
    with pytest.raises(UnknownRunError):
        await idle.wait(run_id, machine_id="m1")


# --- retries and halts ---------------------------------------------------------------------------


async def test_max_retries_is_the_number_of_retries_after_the_first_attempt(store):
    clock = ManualClock()
    attempts = []

    async def bad(ctx):
        attempts.append(ctx.retry_count)
        raise OSError(f"driver down {len(attempts)}")

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("none", [("bad", bad)], max_retries=0)
        engine.register("two", [("bad", bad)], max_retries=2)
        once = await engine.wait(await engine.start("m1", "none"))
        assert attempts == [0]
        message = "bad failed 1 times; last: OSError: driver down 1"
        assert once.error == RunError("retries_exhausted", message, "bad")
        attempts.clear()
        run_id = await engine.start("m1", "two")
        for _ in range(2):
            await next_backoff(clock)
        result = await engine.wait(run_id)
    assert attempts == [0, 1, 2]
    assert result.error.message == "bad failed 3 times; last: OSError: driver down 3"
    log = store.log("m1").events(run_id)
    assert [(e.kind, e.step, e.retry_count) for e in log] == [
        (EventKind.START, None, 0),
        (EventKind.ERROR, "bad", 1),
        (EventKind.ERROR, "bad", 2),
        (EventKind.CANCEL, "bad", 3),
        (EventKind.FINISH, None, 0),
    ]
    assert log[1].payload == {"message": "OSError: driver down 1"} and log[1].at == T0
    assert log[3].payload == result.error.to_dict()
    # FINISH records the error on the run (what the events endpoint and compaction keep)
    assert [r["error"] for r in store.log("m1").timeline()] == [
        once.error.to_dict(),
        result.error.to_dict(),
    ]


async def test_finalizers_retry_past_max_retries_and_a_halting_finalizer_completes(store, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    clock = ManualClock()
    calls = []

    async def step(ctx):
        raise AbortError("stop")

    async def flaky_fin(ctx):
        calls.append(("flaky", ctx.step, ctx.retry_count, ctx.error.kind))
        if ctx.retry_count < 2:
            raise RuntimeError("not yet")

    async def halting_fin(ctx):
        calls.append(("halting", ctx.step))
        raise UnrecoverableError("cannot clean up")

    async def last_fin(ctx):
        calls.append(("last", ctx.error.message))

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("s", step), ("never", noop)], max_retries=0,
                        finalizers=[("flaky", flaky_fin), ("halting", halting_fin),
                                    ("last", last_fin)])  # fmt: skip
        run_id = await engine.start("m1", "op")
        for _ in range(2):
            await next_backoff(clock)
        result = await engine.wait(run_id)
    assert calls == [
        ("flaky", "flaky", 0, "abort"),
        ("flaky", "flaky", 1, "abort"),
        ("flaky", "flaky", 2, "abort"),
        ("halting", "halting"),
        ("last", "stop"),
    ]
    assert result.status is RunStatus.FAILED and result.error == RunError("abort", "stop", "s")
    assert events(store, run_id) == [
        (EventKind.START, None),
        (EventKind.CANCEL, "s"),
        (EventKind.ERROR, "finally:flaky"),
        (EventKind.COMPLETE, "finally:flaky"),
        (EventKind.COMPLETE, "finally:halting"),
        (EventKind.COMPLETE, "finally:last"),
        (EventKind.FINISH, None),
    ]
    assert store.log("m1").events(run_id)[1].retry_count == 0  # a halt, not a retry
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"finalizer finally:halting of run {run_id} halted: cannot clean up" in warned


async def test_a_step_returning_a_non_mapping_fails_and_is_retried(store, caplog):
    caplog.set_level(logging.DEBUG, logger="orchestrator.engine")
    clock = ManualClock()

    async def s(ctx):
        return ["x"] if ctx.retry_count == 0 else {"fixed": True}

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("s", s)])
        run_id = await engine.start("m1", "op")
        await next_backoff(clock)
        result = await engine.wait(run_id)
    assert result.ok and result.response == {"fixed": True}
    text = "TypeError: step s returned list, expected a mapping or None"
    assert f"run {run_id}: step s failed (try 1): {text}" in [
        r.getMessage() for r in caplog.records
    ]
    (error,) = [e for e in store.log("m1").events(run_id) if e.kind is EventKind.ERROR]
    assert error.payload == {"message": "TypeError: step s returned list, expected a mapping "
                                        "or None"}  # fmt: skip


class Calls(EngineObserver):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run_started(self, info):
        self.calls.append(("run", info.action, info.resumed))

    def step_started(self, info, step, is_restart, retry):
        self.calls.append(("start", step, is_restart, retry))

    def step_completed(self, info, step):
        self.calls.append(("done", step))

    def step_failed(self, info, step, error, retry):
        self.calls.append(("failed", info.step, step, str(error), retry))

    def step_halted(self, info, step, kind):
        self.calls.append(("halted", info.step, step, kind))

    def run_finished(self, result):
        self.calls.append(("finished", result.status))


async def test_retry_counts_carry_across_a_restart(store, tmp_path):
    """Two failures with the same error, the engine stops while backing off: the next engine's
    first attempt is retry 2 (its context and observer say so), and one more failure exhausts
    max_retries=2. (Each failure toward a limit is logged: with only changes of error text
    logged, the resumed run counted from 1 again and could retry past its limit forever.)"""
    clock = ManualClock()
    seen = []

    async def bad(ctx):
        seen.append((ctx.retry_count, ctx.is_restart))
        raise RuntimeError("still down")

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("bad", bad)], max_retries=2)
        run_id = await engine.start("m1", "op")
        await next_backoff(clock)
        await wait_for(lambda: clock.sleepers == 1)  # the second failure is logged
    assert seen == [(0, False), (1, False)]
    obs = Calls()
    async with Engine(store, clock=clock, offload=False, observer=obs) as engine:
        engine.register("op", [("bad", bad)], max_retries=2)
        result = await engine.wait(run_id)
    assert seen[2:] == [(2, True)]
    assert result.error.kind == "retries_exhausted" and "failed 3 times" in result.error.message
    assert obs.calls == [
        ("run", "op", True),
        ("start", "bad", True, 2),
        ("failed", "bad", "bad", "still down", 3),
        ("finished", RunStatus.FAILED),
    ]


async def test_observer_sees_each_step_attempt_halt_and_finish(store):
    clock = ManualClock()
    obs = Calls()

    async def flaky(ctx):
        if ctx.retry_count == 0:
            raise RuntimeError("once")

    async def stop(ctx):
        raise AbortError("enough")

    async with Engine(store, clock=clock, offload=False, observer=obs) as engine:
        engine.register("op", [("flaky", flaky), ("stop", stop)], finalizers=[("f", noop)])
        run_id = await engine.start("m1", "op")
        await next_backoff(clock)
        await engine.wait(run_id)
    assert obs.calls == [
        ("run", "op", False),
        ("start", "flaky", False, 0),
        ("failed", "flaky", "flaky", "once", 1),
        ("start", "flaky", False, 1),
        ("done", "flaky"),
        ("start", "stop", False, 0),
        ("halted", "stop", "stop", "abort"),
        ("start", "finally:f", False, 0),
        ("done", "finally:f"),
        ("finished", RunStatus.FAILED),
    ]


# --- cancel --------------------------------------------------------------------------------------


async def test_cancel_logs_why_and_where_and_refuses_what_is_not_cancellable(store, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    clock = ManualClock()
    in_step, in_fin, release = anyio.Event(), anyio.Event(), anyio.Event()
    ran = []

    async def hang(ctx):
        in_step.set()
        await anyio.sleep_forever()

    async def fin(ctx):
        ran.append(("fin", ctx.error))
        in_fin.set()
        await release.wait()

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("hang", hang)], finalizers=[("fin", fin)])
        engine.register("later", [("never", noop)], finalizers=[("fin", fin)])
        assert not await engine.cancel("no-such-run")
        run_id = await engine.start("m1", "op")
        queued = await engine.start("m1", "later", queue=True)
        await in_step.wait()
        clock.advance(3)
        assert await engine.cancel(run_id, "user asked")
        assert not await engine.cancel(run_id, "again")  # already halting
        await in_fin.wait()
        assert not await engine.cancel(run_id)  # finalizing
        assert await engine.cancel(queued, "not needed")  # queued: never starts a step
        release.set()
        result = await engine.wait(run_id)
        later = await engine.wait(queued)
    cancel = [e for e in store.log("m1").events(run_id) if e.kind is EventKind.CANCEL]
    assert [(e.step, e.payload, e.at) for e in cancel] == [
        ("hang", {"kind": "cancelled", "message": "user asked", "step": "hang"}, T0 + 3)
    ]
    assert result.status is RunStatus.CANCELLED and not result.ok
    assert result.error == RunError("cancelled", "user asked", "hang")
    assert later.status is RunStatus.CANCELLED and later.error.step is None
    assert ran == [("fin", result.error), ("fin", later.error)]
    assert events(store, queued) == [
        (EventKind.START, None),
        (EventKind.CANCEL, None),
        (EventKind.COMPLETE, "finally:fin"),
        (EventKind.FINISH, None),
    ]
    assert store.log("m1").get_run(run_id).status is RunStatus.CANCELLED
    lines = [r for r in caplog.records if "cancelled:" in r.getMessage()]
    finished = [(r.levelno, r.getMessage()) for r in lines]
    assert finished == [
        (logging.INFO, f"run {run_id} cancelled: op on m1: user asked (step hang)"),
        (logging.INFO, f"run {queued} cancelled: later on m1: not needed"),
    ]
    assert lines[0].fields == {"run_id": run_id, "machine_id": "m1", "action": "op",
                      "status": "cancelled", "error": result.error.to_dict()}  # fmt: skip


async def test_a_run_past_its_steps_is_not_cancelled_and_the_default_reason(store):
    in_fin, release = anyio.Event(), anyio.Event()

    async def fin(ctx):
        in_fin.set()
        await release.wait()

    async def hang(ctx):
        await anyio.sleep_forever()

    async with Engine(store) as engine:
        engine.register("op", [("s", noop)], finalizers=[("f", fin)])
        engine.register("hang", [("h", hang)])
        run_id = await engine.start("m1", "op")
        await in_fin.wait()
        assert not await engine.cancel(run_id)  # its steps all done: only finalizers remain
        release.set()
        assert (await engine.wait(run_id)).ok
        other = await engine.start("m1", "hang")
        await wait_for(lambda: engine.list_runs()[0].step == "h")
        assert await engine.cancel(other)
        result = await engine.wait(other)
    assert result.error == RunError("cancelled", "cancelled", "h")


# --- resume --------------------------------------------------------------------------------------


async def test_resume_keeps_each_machines_start_order_and_says_resumed(store, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    in_a = anyio.Event()
    order = []

    def ops(engine, block):
        async def a(ctx):
            order.append(("a", ctx.is_restart))
            if block:
                in_a.set()
                await anyio.sleep_forever()

        async def b(ctx):
            order.append(("b", ctx.is_restart))

        engine.register("a", [("a", a)])
        engine.register("b", [("b", b)])

    async with Engine(store) as engine:
        ops(engine, block=True)
        ra = await engine.start("m1", "a")
        rb = await engine.start("m1", "b", queue=True)
        await in_a.wait()
    caplog.clear()
    async with Engine(store, offload=False) as engine:  # nothing runs before list_runs
        ops(engine, block=False)
        assert await engine.resume() == 0  # already scheduled on entering
        runs = engine.list_runs()
        assert [(r.run_id, r.resumed) for r in runs] == [(ra, True), (rb, True)]
        await engine.wait(rb)
    assert order == [("a", False), ("a", True), ("b", True)]
    started = [r for r in caplog.records if " started: " in r.getMessage()]
    assert started[0].fields == {"run_id": ra, "machine_id": "m1", "action": "a"}
    (done,) = [r for r in caplog.records if r.getMessage() == f"run {rb} succeeded: b on m1"]
    assert done.levelno == logging.INFO
    assert done.fields == {"run_id": rb, "machine_id": "m1", "action": "b", "status": "succeeded"}
    assert [r.getMessage() for r in started] == [
        f"run {ra} started: a on m1 (resumed)",
        f"run {rb} started: b on m1 (resumed)",
    ]


async def test_resume_schedules_runs_another_writer_logged(store):
    """``resume()`` picks up runs logged while the engine runs (another process's), once."""
    clock = ManualClock()
    ran = []

    async def s(ctx):
        ran.append((ctx.machine_id, ctx.request["n"], ctx.is_restart))

    def log_run(machine_id, n):
        record = RunRecord(run_id=f"run-{machine_id}-{n}", action="op", steps=("s",),
                           finalizers=(), request={"n": n}, created_at=clock.now())  # fmt: skip
        store.log(machine_id).start_run(record, exclusive=False)

    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("s", s)])
        log_run("m1", 1)
        log_run("m1", 2)
        log_run("m2", 3)
        assert await engine.resume() == 3
        log_run("m1", 4)  # after runs already live on that machine
        assert await engine.resume() == 1
        assert await engine.resume() == 0
        for run in engine.list_runs():
            assert (await engine.wait(run.run_id)).ok
    assert sorted(ran) == [("m1", 1, True), ("m1", 2, True), ("m1", 4, True), ("m2", 3, True)]


async def test_a_run_of_an_action_no_longer_registered_finishes_as_no_ops(store):
    """A run an older release logged, of an action this release does not register at all: its
    steps and finalizers are no-ops, logged complete, and it succeeds."""
    record = RunRecord(run_id="old-run", action="retired", steps=("a", "b"), finalizers=("f",),
                       request={}, created_at=0.0)  # fmt: skip
    store.log("m1").start_run(record)
    async with Engine(store) as engine:
        result = await engine.wait("old-run")
        # registering it now, too late for that run, is refused rather than silently wrong
        with pytest.raises(ValueError, match="register every operation before entering"):
            engine.register("retired", [("a", lambda ctx: None)])
    assert result.ok and result.action == "retired"
    assert events(store, "old-run") == [
        (EventKind.START, None),
        (EventKind.COMPLETE, "a"),
        (EventKind.COMPLETE, "b"),
        (EventKind.COMPLETE, "finally:f"),
        (EventKind.FINISH, None),
    ]


async def test_a_resumed_run_goes_on_from_its_first_unfinished_finalizer(store):
    in_second = anyio.Event()
    ran = []

    def finalizers(block):
        async def first(ctx):
            ran.append(("first", ctx.is_restart))

        async def second(ctx):
            ran.append(("second", ctx.is_restart))
            if block:
                in_second.set()
                await anyio.sleep_forever()

        async def third(ctx):
            ran.append(("third", ctx.is_restart))

        return [("first", first), ("second", second), ("third", third)]

    async with Engine(store) as engine:
        engine.register("op", [("s", noop)], finalizers=finalizers(block=True))
        run_id = await engine.start("m1", "op")
        await in_second.wait()
    # registered before entering, as the service does: entering resumes the run, and with two
    # machines to read it can start before a register() made after entering
    engine = Engine(store)
    engine.register("op", [("s", noop)], finalizers=finalizers(block=False))
    async with engine:
        assert (await engine.wait(run_id)).ok
    assert ran == [("first", False), ("second", False), ("second", True), ("third", True)]


class FailOnce:
    """Makes the next ``times`` calls of a MachineLog method (those ``when`` picks) raise, as a
    full disk or a locked file would; with ``after``, once the real call has been made."""

    def __init__(self, log, method: str, *, times=1, after=False, when=lambda *a, **k: True):
        self.times, self.after, self.when = times, after, when
        self.real = getattr(log, method)
        setattr(log, method, self)

    def __call__(self, *args, **kwargs):
        if not self.times or not self.when(*args, **kwargs):
            return self.real(*args, **kwargs)
        self.times -= 1
        if self.after:
            self.real(*args, **kwargs)
        raise OSError("disk I/O error")


async def test_a_storage_failure_reloads_the_run_and_continues(store, caplog):
    """A COMPLETE that fails to write: the engine logs the error, backs off, reloads the run
    from the log and redoes only that step, told it is a restart."""
    clock = ManualClock()
    ran = []

    async def step(ctx):
        ran.append((ctx.step, ctx.is_restart))
        return {ctx.step: True}

    FailOnce(store.log("m1"), "append", times=2, when=lambda *a, **k: k.get("step") == "b")
    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("a", step), ("b", step), ("c", step)])
        run_id = await engine.start("m1", "op")
        assert await next_backoff(clock) == pytest.approx(0.1)
        assert await next_backoff(clock) == pytest.approx(0.2)  # the engine's own backoff
        result = await engine.wait(run_id)
    assert ran == [("a", False), ("b", False), ("b", True), ("b", True), ("c", True)]
    assert result.ok and result.response == {"a": True, "b": True, "c": True}
    assert f"run {run_id} on m1: engine error" in [r.getMessage() for r in caplog.records]


async def test_a_finish_written_before_its_call_failed_is_not_redone(store):
    clock = ManualClock()
    ran = []

    async def step(ctx):
        ran.append(ctx.step)
        return {"v": 1}

    FailOnce(store.log("m1"), "finish", after=True)
    async with Engine(store, clock=clock, offload=False) as engine:
        engine.register("op", [("s", step)], finalizers=[("f", step)])
        run_id = await engine.start("m1", "op")
        await next_backoff(clock)
        result = await engine.wait(run_id)
        assert engine.list_runs() == [] and not engine.busy("m1")
    assert ran == ["s", "f"] and result.ok and result.response == {"v": 1}
    assert [k for k, _ in events(store, run_id)].count(EventKind.FINISH) == 1


# --- documents -----------------------------------------------------------------------------------


async def test_staged_changes_go_through_the_engines_doc_committer(store):
    calls = []

    async def committer(machine_id, changes, commit):
        doc = {"from": "committer"}
        for change in changes:
            change(doc)
        calls.append((machine_id, dict(doc)))
        await commit(doc)

    async def mark(ctx):
        ctx.stage(lambda d: d.update(state="marked"))

    async with Engine(store, doc_committer=committer) as engine:
        engine.register("op", [("mark", mark), ("plain", noop)])
        assert (await engine.wait(await engine.start("m1", "op"))).ok
    assert calls == [("m1", {"from": "committer", "state": "marked"})]
    assert store.log("m1").read_doc() == {"from": "committer", "state": "marked"}


async def test_staged_changes_apply_to_an_empty_document_when_none_is_stored(store):
    async def mark(ctx):
        ctx.stage(lambda d: d.update(state="first"))

    async with Engine(store) as engine:
        engine.register("op", [("mark", mark)])
        assert (await engine.wait(await engine.start("m1", "op"))).ok
    assert store.log("m1").read_doc() == {"state": "first"}


# --- spans ---------------------------------------------------------------------------------------


async def test_spans_of_a_cancelled_run_and_of_one_the_engine_stopped(store, spans):
    in_step = anyio.Event()

    async def hang(ctx):
        in_step.set()
        await anyio.sleep_forever()

    async with Engine(store) as engine:
        engine.register("op", [("hang", hang)])
        engine.register("stays", [("hang", hang)])
        cancelled = await engine.start("m1", "op")
        await in_step.wait()
        await engine.cancel(cancelled)
        await engine.wait(cancelled)
        in_step = anyio.Event()
        await engine.start("m2", "stays")
        await in_step.wait()
    finished = spans.get_finished_spans()
    (run,) = [s for s in finished if s.name == "machine.op"]
    assert run.attributes["fsm.status"] == "cancelled"
    assert run.attributes["fsm.error_kind"] == "cancelled"
    assert run.status.status_code is StatusCode.UNSET  # a cancel is not a failure
    (step,) = spans_named(finished, "machine.op.hang")
    assert step.attributes["fsm.cancelled"] is True
    assert step.attributes["fsm.step"] == "hang" and step.attributes["fsm.restart"] is False
    assert step.attributes["fsm.action"] == "op" and step.attributes["machine.id"] == "m1"
    assert dict(run.attributes) == {
        "machine.id": "m1",
        "fsm.run_id": cancelled,
        "fsm.action": "op",
        "fsm.resumed": False,
        "fsm.status": "cancelled",
        "fsm.error_kind": "cancelled",
    }
    (accept,) = [s for s in finished if s.name == "machine.op.accept"]
    assert dict(accept.attributes) == {
        "machine.id": "m1",
        "fsm.run_id": cancelled,
        "fsm.action": "op",
    }
    (stopped,) = spans_named(finished, "machine.stays.hang")
    assert stopped.attributes["fsm.interrupted"] is True
    (suspended,) = [s for s in finished if s.name == "machine.stays"]
    assert suspended.attributes["fsm.suspended"] is True
    assert "fsm.status" not in suspended.attributes


# --- closing ------------------------------------------------------------------------------------


async def test_a_start_while_the_engine_closes_is_refused_and_logs_nothing(store):
    """A step that, being cancelled by the engine's close, starts another run (as a cleanup
    might): EngineClosedError, and no START on the other machine."""
    in_step = anyio.Event()
    outcome = []

    async def hang(ctx):
        try:
            in_step.set()
            await anyio.sleep_forever()
        finally:
            try:
                outcome.append(await engine.start("m2", "op"))
            except EngineClosedError as e:
                outcome.append(str(e))

    engine = Engine(store, offload=False)
    async with engine:
        engine.register("op", [("hang", hang)])
        await engine.start("m1", "op")
        await in_step.wait()
    assert outcome == ["the engine is not running"]
    assert store.log("m2").history() == [] and store.log("m2").active_runs() == []


async def test_an_engine_that_cannot_read_its_store_does_not_start(store):
    def broken():
        raise OSError("disk I/O error")

    store.machine_ids = broken
    engine = Engine(store)
    engine.register("op", [("s", noop)])
    with pytest.raises(OSError, match="disk I/O error"):
        async with engine:
            pass
    with pytest.raises(EngineClosedError):
        await engine.start("m1", "op")


async def test_a_start_whose_write_ends_while_the_engine_closes_is_refused(store):
    """The START of a run is being written (in a worker thread) when the engine starts closing,
    and the write ends while the engine still waits for its runs to stop: the caller gets
    EngineClosedError naming the run, which is logged and resumes on the next start."""
    m2 = store.log("m2")
    writing, release, restore_start_run = slow_start_run(m2)
    in_step, starter_done = anyio.Event(), anyio.Event()
    outcome = []

    async def hang(ctx):
        try:
            in_step.set()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):  # the engine is closing: let the START end
                release.set()
                await starter_done.wait()

    async def starter(engine):
        try:
            outcome.append(await engine.start("m2", "op"))
        except EngineClosedError as e:
            outcome.append(str(e))
        starter_done.set()

    async with anyio.create_task_group() as tg, Engine(store) as engine:
        engine.register("op", [("hang", hang)])
        await engine.start("m1", "op")
        await in_step.wait()
        tg.start_soon(starter, engine)
        await anyio.to_thread.run_sync(writing.wait, 60)
    restore_start_run()
    (logged,) = m2.active_runs()
    assert outcome == [
        f"the engine stopped while run {logged.run_id} (op) was being started; "
        "it is logged and resumes when the engine starts again"
    ]


async def test_the_span_of_a_halting_step_records_its_error(store, spans):
    async def stop(ctx):
        raise AbortError("no image")

    async with Engine(store) as engine:
        engine.register("op", [("stop", stop)])
        await engine.wait(await engine.start("m1", "op"))
    (step,) = spans_named(spans.get_finished_spans(), "machine.op.stop")
    assert step.status.status_code is StatusCode.ERROR
    assert step.status.description == "AbortError: no image"
    assert [e.attributes["exception.type"] for e in step.events] == [
        "orchestrator.errors.AbortError"
    ]
    assert step.attributes["fsm.error_kind"] == "abort"


async def test_the_engine_uses_the_backoff_and_ids_it_is_given(store):
    clock = ManualClock()
    attempts = []

    async def flaky(ctx):
        attempts.append(ctx.retry_count)
        if ctx.retry_count == 0:
            raise RuntimeError("once")

    ids = IdFactory(clock, random.Random(5))
    engine = Engine(store, clock=clock, offload=False, ids=ids, backoff=Backoff(initial=3.0))
    engine.register("op", [("flaky", flaky)])
    async with engine:
        run_id = await engine.start("m1", "op")
        assert await next_backoff(clock) == 3.0
        assert (await engine.wait(run_id)).ok
    assert run_id == IdFactory(ManualClock(), random.Random(5)).ulid()


async def test_an_error_in_the_engines_block_reaches_the_caller(store):
    in_step = anyio.Event()

    async def hang(ctx):
        in_step.set()
        await anyio.sleep_forever()

    engine = Engine(store)
    engine.register("op", [("hang", hang)])
    with pytest.raises(BaseException) as raised:
        async with engine:
            await engine.start("m1", "op")
            await in_step.wait()
            raise LookupError("the caller's own error")
    # the engine's task group wraps it, once, alone
    assert isinstance(raised.value, BaseExceptionGroup)
    (error,) = raised.value.exceptions
    assert isinstance(error, LookupError) and str(error) == "the caller's own error"
    assert len(store.log("m1").active_runs()) == 1  # stopped, not cancelled: it resumes
