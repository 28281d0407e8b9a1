"""The restart policy's backoff (FakeDriver, ManualClock: time moves only when a test moves it).

Before each automatic restart the machine waits, ``starting`` with the restart scheduled: 100 ms,
doubling with each consecutive restart, capped at one minute; a boot that ran 10 s starts a new
streak. Nothing holds the machine's run queue while it waits, so a stop, destroy or update asked
then runs at once and the restart never happens; a cordon does not cancel it. The schedule is in
the machine's document: a service that stops (or dies) during the wait restarts the machine
after the rest of the delay when it comes back, or at once when the delay is over by then.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from support import wait_for

from orchestrator import machine as m
from orchestrator.clock import ManualClock
from orchestrator.drivers import FakeDriver, InstanceState, ProcessDriver
from orchestrator.engine import Backoff
from orchestrator.operations import MachineOperations
from orchestrator.publish import MemoryPublisher
from orchestrator.restart import MAX_RESTART_DELAY, STEADY_RUN
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio
DEADLINE = 30.0


def orch(tmp_path, clock: ManualClock, driver: FakeDriver, **kwargs) -> Orchestrator:
    """The default restart backoff (what an operator gets), everything on ``clock``."""
    return Orchestrator(
        machines_path=tmp_path / "machines", driver=driver, worker="w1", clock=clock,
        backoff=Backoff(initial=0.001, maximum=0.01), **kwargs,
    )  # fmt: skip


def config(policy: str = "always") -> dict:
    return {"image": "busybox", "init": {"cmd": ["sleep", "600"]},
            "restart": {"policy": policy, "max_retries": 100}}  # fmt: skip


async def running(o: Orchestrator, driver: FakeDriver, mid: str, restarts: int) -> None:
    """Wait until the machine is started after ``restarts`` restarts, its instance running."""

    def settled() -> bool:
        doc = o.doc(mid)
        inst = driver.instances.get(doc["instance_id"])
        return (
            doc["state"] == m.STARTED
            and doc["restarts"] == restarts
            and inst is not None
            and inst.state is InstanceState.RUNNING
            and not o.engine.busy(mid)
        )

    await wait_for(settled, DEADLINE, f"{mid} started after {restarts} restart(s)")


async def waiting(o: Orchestrator, clock: ManualClock, mid: str, restarts: int) -> float:
    """Wait until the machine waits out the backoff of its ``restarts``-th restart: starting,
    no run live, the only sleeper on the clock its timer, due at ``restart_at``. Returns the
    delay left."""

    def scheduled() -> bool:
        doc = o.doc(mid)
        at = doc.get("restart_at")
        return (
            doc["state"] == m.STARTING
            and doc["restarts"] == restarts
            and at is not None
            and not o.engine.busy(mid)
            and clock.next_deadline() == at
            and clock.sleepers == 1
        )

    await wait_for(scheduled, DEADLINE, f"{mid} waiting to restart ({restarts})")
    return o.doc(mid)["restart_at"] - clock.now()


async def sit_out_most_of(o: Orchestrator, clock: ManualClock, mid: str, delay: float) -> None:
    """Move time to just before the restart is due: nothing happens yet."""
    clock.advance(delay - 0.001)
    for _ in range(10):
        await anyio.lowlevel.checkpoint()
    assert o.doc(mid)["state"] == m.STARTING and o.engine.list_runs(mid) == []


def exit_lines(caplog, mid: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "orchestrator.operations" and r.getMessage().startswith(f"machine {mid}")
    ]


async def test_delays_double_from_100ms_to_a_one_minute_cap(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    clock = ManualClock()
    driver = FakeDriver(clock)
    expected = [0.1 * 2**k for k in range(10)] + [MAX_RESTART_DELAY] * 3  # 0.1 ... 51.2, 60
    async with orch(tmp_path, clock, driver) as o:
        mid = (await o.create_machine("app", {"config": config()}))["id"]
        await running(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=1, times=len(expected) - 1)
        driver.crash(iid, 1)
        for n, want in enumerate(expected, 1):
            delay = await waiting(o, clock, mid, n)
            assert delay == pytest.approx(want), n
            await sit_out_most_of(o, clock, mid, delay)
            clock.advance(0.002)
        await running(o, driver, mid, len(expected))
        assert "restart_at" not in o.doc(mid)
        restarted = [e for e in o.doc(mid)["events"] if e["type"] == "restart"]
        assert restarted and all(e["source"] == "flyd" for e in restarted)
    shown = ["0.1", "0.2", "0.4", "0.8", "1.6", "3.2", "6.4", "12.8", "25.6", "51.2"] + ["60"] * 3
    assert exit_lines(caplog, mid) == [
        f"machine {mid} of app app exited with code 1 (restart {n}, policy always, in {s} s)"
        for n, s in enumerate(shown, 1)
    ]


async def test_a_boot_that_ran_10s_starts_a_new_streak(tmp_path):
    clock = ManualClock()
    driver = FakeDriver(clock)
    async with orch(tmp_path, clock, driver) as o:
        mid = (await o.create_machine("app", {"config": config("on-failure")}))["id"]
        await running(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=1, times=2)
        driver.crash(iid, 1)
        for n, want in enumerate((0.1, 0.2, 0.4), 1):  # three quick exits in a row
            delay = await waiting(o, clock, mid, n)
            assert delay == pytest.approx(want)
            clock.advance(delay + 0.001)
        await running(o, driver, mid, 3)
        clock.advance(STEADY_RUN - 0.5)  # not long enough: the streak goes on
        driver.crash(iid, 1)
        assert await waiting(o, clock, mid, 4) == pytest.approx(0.8)
        clock.advance(0.801)
        await running(o, driver, mid, 4)
        clock.advance(STEADY_RUN)  # long enough: back to 100 ms
        driver.crash(iid, 1)
        assert await waiting(o, clock, mid, 5) == pytest.approx(0.1)
        clock.advance(0.101)
        await running(o, driver, mid, 5)
        # an explicit restart starts a new streak (and a new on-failure budget)
        driver.crash(iid, 1)
        assert await waiting(o, clock, mid, 6) == pytest.approx(0.2)
        await o.restart_machine("app", mid)
        await running(o, driver, mid, 0)
        driver.crash(iid, 1)
        assert await waiting(o, clock, mid, 1) == pytest.approx(0.1)


@pytest.mark.parametrize("action", ["stop", "destroy", "update"])
async def test_a_request_during_the_wait_runs_at_once_and_the_restart_never_happens(
    tmp_path, action
):
    """The clock does not move: the request cannot be waiting the delay out. Meanwhile the
    replicated row says ``starting`` (not ``started``: nothing runs)."""
    clock = ManualClock()
    driver = FakeDriver(clock)
    pub = MemoryPublisher()
    async with orch(tmp_path, clock, driver, publisher=pub) as o:
        mid = (await o.create_machine("app", {"config": config()}))["id"]
        await running(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=1, times=1000)
        driver.crash(iid, 1)
        for n in range(1, 6):  # up to a 1.6 s wait
            delay = await waiting(o, clock, mid, n)
            if n < 5:
                clock.advance(delay + 0.001)
        await wait_for(lambda: pub.rows().get(mid, {}).get("state") == m.STARTING, DEADLINE,
                       "the row to say starting")  # fmt: skip
        if action == "stop":
            await o.stop_machine("app", mid)
            end = m.STOPPED
        elif action == "destroy":
            await o.destroy_machine("app", mid, force=True)
            end = m.DESTROYED
        else:
            await o.update_machine("app", mid, {"config": {**config(), "env": {"V": "2"}}})
            end = m.STARTED
        await wait_for(lambda: o.docs.find(mid) is None or (
            o.doc(mid)["state"] == end and not o.engine.busy(mid)), DEADLINE, end)  # fmt: skip
        # the clock did not move: the request did not wait for the restart
        assert clock.sleepers == 0  # the timer is cancelled
        clock.advance(MAX_RESTART_DELAY)  # long past when the restart was due
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert o.engine.list_runs(mid) == []
        if action == "destroy":
            assert iid not in driver.instances
            return
        doc = o.doc(mid)
        assert doc["state"] == end and "restart_at" not in doc
        inst = driver.instances[doc["instance_id"]]
        if action == "stop":
            assert inst.state is InstanceState.EXITED and doc["restarts"] == 5
        else:
            assert inst.state is InstanceState.RUNNING and doc["config"]["env"] == {"V": "2"}
            assert doc["restarts"] == 0


async def test_a_cordon_during_the_wait_leaves_the_restart_scheduled(tmp_path):
    clock = ManualClock()
    driver = FakeDriver(clock)
    async with orch(tmp_path, clock, driver) as o:
        mid = (await o.create_machine("app", {"config": config()}))["id"]
        await running(o, driver, mid, 0)
        driver.crash(o.doc(mid)["instance_id"], 1)
        delay = await waiting(o, clock, mid, 1)
        await o.cordon_machine("app", mid)
        await wait_for(lambda: o.doc(mid)["cordoned"] and not o.engine.busy(mid), DEADLINE,
                       "the cordon")  # fmt: skip
        assert await waiting(o, clock, mid, 1) == delay  # no time passed, still due
        clock.advance(delay + 0.001)
        await running(o, driver, mid, 1)
        assert o.doc(mid)["cordoned"]


@pytest.mark.parametrize("down_for", [0.3, 5.0])
async def test_a_service_that_stops_during_the_wait_restarts_the_machine_when_it_is_back(
    tmp_path, down_for
):
    """The schedule is written with the exit run's step: the next service (same directory and
    driver, as after kill -9 of flyd) waits the rest of the delay, or restarts at once when the
    delay ran out while it was down."""
    clock = ManualClock()
    driver = FakeDriver(clock)  # survives the service, as instances survive flyd
    async with orch(tmp_path, clock, driver) as o:
        mid = (await o.create_machine("app", {"config": config()}))["id"]
        await running(o, driver, mid, 0)
        iid = o.doc(mid)["instance_id"]
        driver.exit_on_start(iid, exit_code=1, times=1)
        driver.crash(iid, 1)
        clock.advance(await waiting(o, clock, mid, 1) + 0.001)
        assert await waiting(o, clock, mid, 2) == pytest.approx(0.2)  # the service stops here
        due = o.doc(mid)["restart_at"]
    clock.advance(down_for)
    async with orch(tmp_path, clock, driver) as o:
        if due > clock.now():
            assert await waiting(o, clock, mid, 2) == pytest.approx(due - clock.now())
            await sit_out_most_of(o, clock, mid, due - clock.now())
            clock.advance(0.002)
        await running(o, driver, mid, 2)
        assert [r["action"] for r in await o.machine_events("app", mid)][-2:] == [
            "exit", "relaunch",
        ]  # fmt: skip


CHILD = """
import sys, anyio
from orchestrator.drivers import ProcessDriver
from orchestrator.engine import Backoff
from orchestrator.operations import MachineOperations
from orchestrator.service import Orchestrator

async def main(base):
    o = Orchestrator(machines_path=base + "/m", driver=ProcessDriver(base + "/state"),
                     restart_backoff=Backoff(initial=1.0, maximum=1.0))
    async with o:
        config = {"image": "busybox", "init": {"exec": ["sh", "-c", "exit 3"]},
                  "restart": {"policy": "always"}}
        mid = (await o.create_machine("app", {"config": config}))["id"]
        while not o.doc(mid).get("restart_at"):
            await anyio.sleep(0.01)
        print(mid, flush=True)  # waiting out the backoff of restart 1: kill -9 now
        await anyio.sleep_forever()

anyio.run(main, sys.argv[1])
"""


async def test_kill_9_during_the_wait_keeps_the_restart(tmp_path):
    """A real orchestrator process (process driver) is SIGKILLed while its crash-looping
    machine waits out a restart's backoff; the next one restarts the machine."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    child = await anyio.open_process([sys.executable, "-c", CHILD, str(tmp_path)], env=env)
    try:
        assert child.stdout is not None
        with anyio.fail_after(DEADLINE):
            line = await BufferedByteReceiveStream(child.stdout).receive_until(b"\n", 100)
        mid = line.decode().strip()
    finally:
        child.kill()  # SIGKILL
        await child.wait()
        await child.aclose()
    restart = Backoff(initial=1.0, maximum=1.0)
    o = Orchestrator(machines_path=tmp_path / "m", driver=ProcessDriver(tmp_path / "state"),
                     restart_backoff=restart)  # fmt: skip
    async with o:
        assert o.doc(mid)["state"] == m.STARTING and o.doc(mid)["restarts"] == 1

        async def relaunched() -> bool:
            runs = await o.machine_events("app", mid)
            return o.doc(mid)["restarts"] >= 2 and any(
                r["action"] == "relaunch" and r["status"] == "succeeded" for r in runs
            )

        await wait_for(relaunched, DEADLINE, "the restart the killed process had scheduled")
        await o.stop_machine("app", mid)
        await wait_for(lambda: o.doc(mid)["state"] == m.STOPPED and not o.engine.busy(mid),
                       DEADLINE, "the stop")  # fmt: skip
        await o.destroy_machine("app", mid)
        await wait_for(lambda: o.docs.find(mid) is None or o.doc(mid)["state"] == m.DESTROYED,
                       DEADLINE, "the destroy")  # fmt: skip


async def test_an_exit_run_logged_before_the_backoff_still_launches_itself(tmp_path, monkeypatch):
    """An exit run an older release logged (its record_exit said restart, with no
    ``restart_at``) and resumed by this one launches the machine itself, at once."""

    async def old_record_exit(self, ctx):
        def change(d: dict) -> None:
            d["state"] = m.STARTING
            d["restarts"] = d.get("restarts", 0) + 1

        ctx.stage(change)
        return {"restart": True, "auto_destroy": False}

    monkeypatch.setattr(MachineOperations, "record_exit", old_record_exit)
    clock = ManualClock()
    driver = FakeDriver(clock)
    async with orch(tmp_path, clock, driver) as o:
        mid = (await o.create_machine("app", {"config": config()}))["id"]
        await running(o, driver, mid, 0)
        driver.crash(o.doc(mid)["instance_id"], 1)
        await running(o, driver, mid, 1)  # the clock never moved
        runs = await o.machine_events("app", mid)
        assert [r["action"] for r in runs] == ["create", "exit"]
