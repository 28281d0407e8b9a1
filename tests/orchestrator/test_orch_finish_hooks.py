"""The service's finish hook (archive a destroyed machine's database and forget its document;
start the destroy an exit with ``auto_destroy`` asks for) when it cannot run as its run finishes.

Two ways it used to be lost: a run resumed at start can finish while the engine is still being
entered, before the service has ``self.engine`` (the hook failed on it: the destroyed machine
stayed listed until the next restart, an auto-destroy was dropped for good); and a crash or a
stop between a run's FINISH and its hook skips the hook (an auto-destroy then had nothing to
redo it). Both are forced here, without timing: ``Engine.resume`` made to return only once the
runs it resumed are done, and the hook replaced by a no-op for one service's life."""

from __future__ import annotations

import logging

import anyio
import pytest
from support import wait_for

from orchestrator import machine as m
from orchestrator.drivers import FakeDriver
from orchestrator.engine import Backoff, Engine, EngineObserver
from orchestrator.errors import NotFoundError
from orchestrator.publish import MemoryPublisher
from orchestrator.service import Orchestrator
from orchestrator.steplog import RunStatus
from orchestrator.store import MachineStore

pytestmark = pytest.mark.anyio
FAST = Backoff(initial=0.001, maximum=0.01)
CONFIG = {"image": "busybox", "init": {"cmd": ["sleep", "600"]}}
AUTO_DESTROY = {**CONFIG, "auto_destroy": True, "restart": {"policy": "no"}}


class StopAt(EngineObserver):
    """Stops the service (cancels ``scope``, as a crash would: the run stays active in the log)
    when ``step`` starts; records which runs were resumed."""

    def __init__(self, step: str | None = None) -> None:
        self.step = step
        self.scope: anyio.CancelScope | None = None
        self.resumed: list[str] = []

    def run_started(self, info):
        if info.resumed:
            self.resumed.append(info.action)

    def step_started(self, info, step, is_restart, retry):
        if step == self.step and self.scope is not None:
            self.scope.cancel()


def orch(tmp_path, driver, observer=None, publisher=None) -> Orchestrator:
    return Orchestrator(machines_path=tmp_path / "machines", driver=driver, observer=observer,
                        publisher=publisher, backoff=FAST)  # fmt: skip


def idle(o: Orchestrator, mid: str) -> bool:
    assert o.engine is not None
    return not o.engine.list_runs() and not o.engine.busy(mid)


async def settle(o: Orchestrator, mid: str, state: str) -> None:
    await wait_for(lambda: o.doc(mid)["state"] == state and idle(o, mid), 30, f"{mid} {state}")


async def stop_at(tmp_path, driver, step: str, act, publisher=None) -> None:
    """Run a service until ``step`` starts (after ``act(orch)`` has set things going)."""
    observer = StopAt()
    with anyio.CancelScope() as scope:
        async with orch(tmp_path, driver, observer, publisher) as o:
            await act(o)
            observer.step, observer.scope = step, scope
            await anyio.sleep_forever()
    assert scope.cancelled_caught


@pytest.fixture
def resumed_runs_finish_in_resume(monkeypatch):
    """``Engine.resume`` returns only once every run it resumed (and any run their finish hooks
    start) has finished and its hooks are done: they all finish before the service's
    ``__aenter__`` has its engine, as a resumed run with little left to do can under load."""
    resume = Engine.resume

    async def resume_then_finish(self: Engine) -> int:
        count = await resume(self)
        ids = await anyio.to_thread.run_sync(self.store.machine_ids)
        await wait_for(
            lambda: not self.list_runs() and not any(self.busy(mid) for mid in ids),
            30,
            "the resumed runs",
            interval=0.001,
        )
        return count

    monkeypatch.setattr(Engine, "resume", resume_then_finish)


def no_hook_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_destroy_finished_during_start_archives_and_forgets_the_machine(
    tmp_path, caplog, resumed_runs_finish_in_resume
):
    driver, pub = FakeDriver(), MemoryPublisher()
    ids: list[str] = []

    async def destroy(o):
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, m.STARTED)
        await wait_for(lambda: pub.rows().get(mid, {}).get("state") == m.STARTED, 30)
        ids.append(mid)
        await o.destroy_machine("app", mid, force=True)

    await stop_at(tmp_path, driver, "kill_instance", destroy, pub)
    [mid] = ids
    assert mid in pub.rows()
    observer = StopAt()
    async with orch(tmp_path, driver, observer, pub) as o:
        # the destroy resumed and finished inside the engine's start; its hook still ran
        assert observer.resumed == ["destroy"]
        assert o.docs.find(mid) is None
        assert o.store is not None and o.store.is_archived(mid)
        with pytest.raises(NotFoundError):
            o.get_machine("app", mid)
        await wait_for(lambda: mid not in pub.rows(), 30, "the row's delete")
    assert not no_hook_errors(caplog)


async def test_exit_finished_during_start_still_auto_destroys(
    tmp_path, caplog, resumed_runs_finish_in_resume
):
    driver = FakeDriver()
    ids: list[str] = []

    async def exit_(o):
        mid = (await o.create_machine("app", {"config": AUTO_DESTROY}))["id"]
        await settle(o, mid, m.STARTED)
        ids.append(mid)
        driver.crash(o.doc(mid)["instance_id"], exit_code=0)

    await stop_at(tmp_path, driver, "record_exit", exit_)
    [mid] = ids
    observer = StopAt()
    async with orch(tmp_path, driver, observer) as o:
        # the exit resumed and finished inside the engine's start, its hook started the destroy
        assert observer.resumed == ["exit"]
        assert o.docs.find(mid) is None
        assert o.store is not None and o.store.is_archived(mid)
    assert not driver.instances, "the instance was destroyed"
    assert not no_hook_errors(caplog)


async def test_auto_destroy_skipped_by_a_crash_after_the_exit_is_done_on_restart(tmp_path, caplog):
    driver = FakeDriver()
    first = orch(tmp_path, driver)
    hook = first._on_finish
    skipped = []

    async def died_before_the_hook(*args):  # the process died right after the exit's FINISH
        if args[-1].action == "exit":
            skipped.append(args)
        else:
            await hook(*args)

    first._on_finish = died_before_the_hook  # type: ignore[method-assign]
    async with first as o:
        owed, started_again = [
            (await o.create_machine("app", {"config": AUTO_DESTROY}))["id"] for _ in range(2)
        ]
        for mid in (owed, started_again):
            await settle(o, mid, m.STARTED)
            driver.crash(o.doc(mid)["instance_id"], exit_code=0)
            await settle(o, mid, m.STOPPED)
        owed_instance = o.doc(owed)["instance_id"]
        # a run after the exit: it owes nothing any more
        await o.start_machine("app", started_again)
        await settle(o, started_again, m.STARTED)
    # the hook, had it run only once the engine had stopped: no destroy, an INFO, no error
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="orchestrator.service"):
        await hook(*skipped[0])
    assert any("auto-destroy" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records), caplog.records  # fmt: skip
    assert not no_hook_errors(caplog)
    # what a crash there leaves: the exit finished, asking for a destroy nothing started
    store = MachineStore(tmp_path / "machines")
    try:
        [newest] = store.log(owed).history(1)
        assert (newest.action, newest.status) == ("exit", RunStatus.SUCCEEDED)
        assert newest.response["auto_destroy"] is True
    finally:
        store.close()

    async with orch(tmp_path, driver) as o:
        await wait_for(lambda: o.docs.find(owed) is None, 30, "the auto-destroy")
        assert o.store is not None and o.store.is_archived(owed)
        assert idle(o, started_again) and o.doc(started_again)["state"] == m.STARTED
    assert owed_instance not in driver.instances
