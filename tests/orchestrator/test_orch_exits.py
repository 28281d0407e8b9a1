"""Exits of a machine's instance, whatever their timing (FakeDriver): an instance that exits as
soon as it started - while the run that started it (an exit run's restart, an API restart) is
still finishing - is still seen, and the restart policy applies to every exit: ``always``
restarts each time, ``on-failure`` stops after ``max_retries``; nothing is left ``started``
with no process. Each exit is logged at INFO with its code or signal and the decision."""

from __future__ import annotations

import logging

import anyio
import pytest
from support import wait_for

from orchestrator import machine as m
from orchestrator.drivers import FakeDriver, InstanceState
from orchestrator.drivers.base import ExitStatus
from orchestrator.engine import Backoff
from orchestrator.operations import MachineOperations, describe_exit
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio
FAST = Backoff(initial=0.001, maximum=0.01)
RESTARTS = Backoff(initial=0.001, maximum=0.004)  # 1, 2, 4, 4 ... ms before a restart
DEADLINE = 30.0


def orch(tmp_path, driver: FakeDriver) -> Orchestrator:
    return Orchestrator(
        machines_path=tmp_path / "machines", driver=driver, worker="w1", backoff=FAST,
        restart_backoff=RESTARTS,
    )  # fmt: skip


def config(restart: dict) -> dict:
    return {"image": "busybox", "init": {"cmd": ["sleep", "600"]}, "restart": restart}


async def started(o: Orchestrator, driver: FakeDriver, mid: str, restarts: int) -> None:
    """Wait until the machine is started after ``restarts`` restarts, with its instance
    running and no run left."""

    def settled() -> bool:
        doc = o.doc(mid)
        inst = driver.instances.get(doc["instance_id"])
        return (
            doc["state"] == m.STARTED
            and doc.get("restarts") == restarts
            and inst is not None
            and inst.state is InstanceState.RUNNING
            and not o.engine.busy(mid)
        )

    await wait_for(settled, DEADLINE, f"{mid} started after {restarts} restart(s)")


def exit_events(doc: dict) -> list[tuple[str, int | None]]:
    """The machine's exit events, oldest first: (status, exit code)."""
    return [
        (e["status"], e["request"]["exit_event"]["exit_code"])
        for e in reversed(doc["events"])
        if e["type"] == "exit"
    ]


async def test_always_restarts_an_instance_that_exits_at_once_every_time(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    driver = FakeDriver()
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": config({"policy": "always"})}))["id"]
        await started(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=0, times=4)
        driver.crash(iid, 0)  # then 4 restarts exit at once; the 5th runs
        await started(o, driver, mid, 5)
        assert exit_events(o.doc(mid)) == [("starting", 0)] * 5
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.operations"]
    assert lines == [
        f"machine {mid} of app app exited with code 0 (restart {n}, policy always, in {ms} s)"
        for n, ms in zip(range(1, 6), ("0.001", "0.002", "0.004", "0.004", "0.004"), strict=True)
    ]


async def test_on_failure_stops_after_max_retries_of_instant_exits(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    driver = FakeDriver()
    restart = {"policy": "on-failure", "max_retries": 2}
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": config(restart)}))["id"]
        await started(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=3, times=100)
        driver.crash(iid, 3)
        assert await o.wait_machine("app", mid, state=m.STOPPED, timeout=DEADLINE)
        await wait_for(lambda: not o.engine.busy(mid), DEADLINE, "the last exit run")
        doc = o.doc(mid)
        assert doc["state"] == m.STOPPED and doc["restarts"] == 2
        assert exit_events(doc) == [("starting", 3), ("starting", 3), ("stopped", 3)]
        assert driver.instances[iid].state is InstanceState.EXITED
        records = [r for r in caplog.records if r.name == "orchestrator.operations"]
    assert [r.getMessage() for r in records] == [
        f"machine {mid} of app app exited with code 3 (restart 1 of 2, policy on-failure, "
        "in 0.001 s)",
        f"machine {mid} of app app exited with code 3 (restart 2 of 2, policy on-failure, "
        "in 0.002 s)",
        f"machine {mid} of app app exited with code 3: not restarted (max retries 2 reached), "
        "stopped",
    ]
    assert all(r.levelno == logging.INFO for r in records)
    fields = records[-1].fields  # type: ignore[attr-defined]
    assert fields["machine_id"] == mid and fields["app"] == "app"
    assert fields["exit_code"] == 3 and fields["restart"] is False


async def test_an_exit_right_after_an_api_restart_is_seen(tmp_path):
    """The restart run that started the boot is still finishing when it exits: that run does
    not own this exit (it stops only the boot before it)."""
    driver = FakeDriver()
    restart = {"policy": "on-failure", "max_retries": 5}
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": config(restart)}))["id"]
        await started(o, driver, mid, 0)
        driver.exit_on_start(o.doc(mid)["instance_id"], exit_code=7, times=1)
        await o.restart_machine("app", mid)
        await started(o, driver, mid, 1)
        assert exit_events(o.doc(mid))[-1] == ("starting", 7)


async def test_an_exit_while_a_stop_waits_its_turn_is_the_stops(tmp_path, monkeypatch):
    """An exit noticed while a stop waits its turn is queued behind it, and finds the machine
    stopped: no restart, one exit event (the stop's)."""
    driver = FakeDriver()
    set_cordon = MachineOperations.set_cordon
    gate = anyio.Event()

    async def slow_cordon(self, ctx):
        await gate.wait()
        await set_cordon(self, ctx)

    monkeypatch.setattr(MachineOperations, "set_cordon", slow_cordon)
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": config({"policy": "always"})}))["id"]
        await started(o, driver, mid, 0)
        await o.cordon_machine("app", mid)  # holds the machine's queue
        await o.stop_machine("app", mid)
        driver.crash(o.doc(mid)["instance_id"], 0)
        await wait_for(
            lambda: [r.action for r in o.engine.list_runs(mid)] == ["cordon", "stop", "exit"],
            DEADLINE, "the exit run queued behind the stop",
        )  # fmt: skip
        gate.set()
        await wait_for(lambda: not o.engine.busy(mid), DEADLINE, "the runs")
        doc = o.doc(mid)
        assert doc["state"] == m.STOPPED and doc["restarts"] == 0
        assert [s for s, _ in exit_events(doc)] == ["stopped"]


async def test_a_crash_looping_machine_can_be_stopped_while_it_is_starting(tmp_path):
    """Under ``always`` an instance that exits at once keeps the machine mostly ``starting``
    (an exit run restarting it): a stop is accepted then, runs after that restart, and the
    machine ends stopped with nothing running; then a forced destroy the same way."""
    driver = FakeDriver()
    driver.latency = 0.02  # each launch step takes a while: the test sees the machine starting
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": config({"policy": "always"})}))["id"]
        await started(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=1, times=1000)
        driver.crash(iid, 1)
        await wait_for(lambda: o.doc(mid)["state"] == m.STARTING, DEADLINE, "a restart")
        await o.stop_machine("app", mid)  # accepted though the machine is starting
        assert await o.wait_machine("app", mid, state=m.STOPPED, timeout=DEADLINE)
        await wait_for(lambda: not o.engine.busy(mid), DEADLINE, "the runs")
        assert o.doc(mid)["state"] == m.STOPPED
        assert driver.instances[iid].state is InstanceState.EXITED
        await o.start_machine("app", mid)
        await wait_for(lambda: o.doc(mid)["state"] == m.STARTING and o.doc(mid)["restarts"],
                       DEADLINE, "a restart")  # fmt: skip
        await o.destroy_machine("app", mid, force=True)
        assert await o.wait_machine("app", mid, state=m.DESTROYED, timeout=DEADLINE)
        assert iid not in driver.instances


async def test_resume_handles_the_exit_of_a_boot_whose_run_was_interrupted(tmp_path, monkeypatch):
    """kill -9 while the relaunch run that restarted the machine is finishing (after
    mark_started, before FINISH), and its new boot exits while the service is down: on resume
    the run finishes, and the exit of its boot is handled after it."""
    driver = FakeDriver()  # survives the service, as instances survive flyd
    settle = MachineOperations.settle_start
    reached = anyio.Event()

    async def stuck_after_exit(self, ctx):
        if ctx.action == "relaunch":
            reached.set()
            await anyio.sleep_forever()  # the service goes down here
        await settle(self, ctx)

    monkeypatch.setattr(MachineOperations, "settle_start", stuck_after_exit)
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": config({"policy": "always"})}))["id"]
        await started(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=0, times=1)
        driver.crash(iid, 0)
        with anyio.fail_after(DEADLINE):
            await reached.wait()
        assert o.doc(mid)["state"] == m.STARTED and o.doc(mid)["restarts"] == 1
        assert driver.instances[iid].state is InstanceState.EXITED
    monkeypatch.undo()
    async with orch(tmp_path, driver) as o:
        await started(o, driver, mid, 2)
        assert [s for s, _ in exit_events(o.doc(mid))] == ["starting", "starting"]


@pytest.mark.parametrize(
    ("exit_", "text"),
    [
        (ExitStatus(exit_code=3), "exited with code 3"),
        (ExitStatus(signal=15), "was killed by signal 15 (SIGTERM)"),
        (ExitStatus(signal=9, oom_killed=True), "was killed by the OOM killer (signal 9)"),
        (ExitStatus(signal=200), "was killed by signal 200"),
        (ExitStatus(), "exited with an unknown status (its supervisor lost track)"),
    ],
)
def test_exits_are_described_with_their_code_or_signal(exit_, text):
    assert describe_exit(exit_) == text
