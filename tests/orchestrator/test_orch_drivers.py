"""The driver contract against FakeDriver, ProcessDriver and RuncDriver (real processes and
containers; runc tests skip with a reason where runc, root or busybox-static is missing)."""

from __future__ import annotations

import logging
import os
import signal

import anyio
import pytest
from orch_helpers import require_runc
from support import wait_for

from orchestrator.clock import ManualClock, SystemClock
from orchestrator.drivers import (
    DriverError,
    FakeDriver,
    ImageNotFoundError,
    InstanceSpec,
    InstanceState,
    ProcessDriver,
    RuncDriver,
)
from orchestrator.drivers import runc as runc_module
from orchestrator.drivers.runc import INIT_PATH
from orchestrator.ids import IdFactory

pytestmark = pytest.mark.anyio
needs_runc = pytest.mark.usefixtures("runc_required")
_ids = IdFactory(SystemClock())


def iid() -> str:
    return _ids.ulid()


@pytest.fixture(params=["process", "process-plain", "runc"])
async def real_driver(request, tmp_path):
    """The real drivers; "process-plain" is the process driver without namespaces (what a
    non-root user gets)."""
    if request.param == "runc":
        require_runc()
        d = RuncDriver(tmp_path / "runc")
    else:
        d = ProcessDriver(tmp_path / "proc", namespaces=request.param == "process")
    yield d
    await d.destroy_all()


@pytest.fixture
async def process_driver(tmp_path):
    driver = ProcessDriver(tmp_path / "proc")
    yield driver
    await driver.destroy_all()


@pytest.fixture
async def runc_driver(tmp_path):
    require_runc()
    driver = RuncDriver(tmp_path / "runc")
    yield driver
    await driver.destroy_all()


@pytest.fixture(params=["fake", "process", "runc"])
async def driver(request, tmp_path):
    if request.param == "fake":
        yield FakeDriver()
        return
    if request.param == "runc":
        require_runc()
    d = (ProcessDriver if request.param == "process" else RuncDriver)(tmp_path / request.param)
    yield d
    await d.destroy_all()


def spec(cmd=("sleep", "600"), **kw) -> InstanceSpec:
    return InstanceSpec(instance_id=iid(), machine_id="m1", image="busybox", cmd=tuple(cmd), **kw)


async def test_lifecycle_contract(driver):
    s = spec()
    assert (await driver.status(s.instance_id)).state is InstanceState.ABSENT
    await driver.prepare(s)
    await driver.create(s)
    await driver.create(s)  # idempotent while created
    assert (await driver.status(s.instance_id)).state is InstanceState.CREATED
    await driver.start(s.instance_id)
    st = await driver.status(s.instance_id)
    assert st.state is InstanceState.RUNNING and st.pid
    with pytest.raises(DriverError):
        await driver.start(s.instance_id)
    # sleep dies of SIGTERM (runc's tini reports that as 128+15), or, on a runc host without
    # tini, ignores it as PID 1 and stop escalates after 0.5 s
    exit_ = await driver.stop(s.instance_id, signal=signal.SIGTERM, timeout=0.5)
    assert exit_.requested_stop
    assert exit_.signal in (signal.SIGTERM, signal.SIGKILL) or exit_.exit_code == 143, exit_
    st = await driver.status(s.instance_id)
    assert st.state is InstanceState.EXITED and st.exit == exit_
    assert await driver.wait(s.instance_id) == exit_  # already exited: returns at once
    again = await driver.stop(s.instance_id)  # stopping an exited instance reports its exit
    assert again == exit_
    await driver.destroy(s.instance_id)
    await driver.destroy(s.instance_id)  # absent is fine
    assert (await driver.status(s.instance_id)).state is InstanceState.ABSENT


async def test_destroy_kills_a_running_instance(driver):
    s = spec()
    await driver.create(s)
    await driver.start(s.instance_id)
    pid = (await driver.status(s.instance_id)).pid
    await driver.destroy(s.instance_id)
    assert (await driver.status(s.instance_id)).state is InstanceState.ABSENT
    if not isinstance(driver, FakeDriver):
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def test_exit_codes_and_signals_are_reported(real_driver):
    driver = real_driver
    s = spec(("sh", "-c", "exit 3"))
    await driver.create(s)
    await driver.start(s.instance_id)
    with anyio.fail_after(30):
        exit_ = await driver.wait(s.instance_id)
    assert exit_.exit_code == 3 and exit_.signal is None and not exit_.requested_stop
    assert exit_.failed

    s2 = spec(("sleep", "600"))
    await driver.create(s2)
    await driver.start(s2.instance_id)
    await driver.signal(s2.instance_id, signal.SIGKILL)
    with anyio.fail_after(30):
        exit2 = await driver.wait(s2.instance_id)
    assert exit2.signal == signal.SIGKILL or exit2.exit_code == 128 + signal.SIGKILL
    assert not exit2.requested_stop


async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(real_driver):
    driver = real_driver
    s = spec(("sh", "-c", "trap '' TERM; echo trapped; while true; do sleep 1; done"))
    await driver.create(s)
    await driver.start(s.instance_id)
    await wait_for(lambda: "trapped" in driver.output(s.instance_id), 30, "the trap to be set")
    exit_ = await driver.stop(s.instance_id, signal=signal.SIGTERM, timeout=0.3)
    assert exit_.requested_stop
    assert exit_.signal == signal.SIGKILL or exit_.exit_code == 128 + signal.SIGKILL
    assert (await driver.status(s.instance_id)).state is InstanceState.EXITED


async def test_instances_survive_a_new_driver_object(real_driver):
    """A restarted orchestrator builds a new driver on the same state dir and finds its
    instances running, can stop them and gets their exit codes."""
    driver = real_driver
    s = spec(("sleep", "600"))
    await driver.create(s)
    await driver.start(s.instance_id)
    pid = (await driver.status(s.instance_id)).pid
    other = type(driver)(driver.state_dir)
    st = await other.status(s.instance_id)
    assert st.state is InstanceState.RUNNING and st.pid == pid
    exit_ = await other.stop(s.instance_id, timeout=0.5)
    assert exit_.requested_stop
    assert (await driver.status(s.instance_id)).exit == exit_


async def test_process_driver_runs_in_namespaces_as_root(process_driver):
    if os.geteuid() != 0:
        pytest.skip("namespaces need root")
    s = spec(
        ("sh", "-c", "echo pid=$$ host=$(hostname) env=$FLY_MACHINE_ID extra=$X"), env={"X": "y"}
    )
    await process_driver.create(s)
    await process_driver.start(s.instance_id)
    with anyio.fail_after(30):
        assert (await process_driver.wait(s.instance_id)).exit_code == 0
    out = process_driver.output(s.instance_id)
    assert "pid=2 host=m1 env=m1 extra=y" in out, out


async def test_process_driver_refuses_bad_commands(process_driver):
    with pytest.raises(DriverError, match="command not found") as err:
        await process_driver.prepare(spec(("definitely-not-a-command-xyz",)))
    assert not err.value.transient
    with pytest.raises(DriverError, match="required"):
        await process_driver.prepare(spec(()))


@needs_runc
async def test_runc_detects_oom_kills(runc_driver):
    s = spec(("sh", "-c", "head -c 300000000 /dev/zero | tail"), memory_mb=16)
    await runc_driver.create(s)
    await runc_driver.start(s.instance_id)
    with anyio.fail_after(60):
        exit_ = await runc_driver.wait(s.instance_id)
    assert exit_.oom_killed, exit_


@needs_runc
async def test_runc_container_is_isolated_with_a_readonly_image(runc_driver):
    script = (
        "echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline)host=$(hostname); "
        "touch /x 2>&1 || echo ro; touch /tmp/ok && echo tmp"
    )
    await runc_driver.create(s := spec(("sh", "-c", script)))
    await runc_driver.start(s.instance_id)
    with anyio.fail_after(30):
        assert (await runc_driver.wait(s.instance_id)).exit_code == 0
    out = runc_driver.output(s.instance_id)
    # its own pid namespace, whose PID 1 is the init (or the command itself without one)
    pid1 = f"{INIT_PATH} -- sh -c " if runc_driver.init else "sh -c "
    assert f"pid1={pid1}" in out and "host=m1" in out and "ro" in out and "tmp" in out, out
    # the init's mount point is on the container's /run tmpfs, not in the shared image
    assert not list((runc_driver.images.path / "busybox" / "rootfs" / "run").iterdir())


@needs_runc
async def test_runc_command_without_a_handler_stops_on_sigterm(runc_driver):
    """``sleep`` installs no SIGTERM handler: as PID 1 it would ignore SIGTERM until the SIGKILL.
    Under tini it dies of the SIGTERM itself, which tini reports as exit code 128 + 15; an
    escalation would have killed tini with SIGKILL (``signal`` 9)."""
    if runc_driver.init is None:
        pytest.skip("no static init on this host (apt-get install tini)")
    s = spec(("sh", "-c", "echo ready; exec sleep 1000"))  # exec: sleep replaces the shell
    await runc_driver.create(s)
    await runc_driver.start(s.instance_id)
    # ready: tini runs and has forked the command
    await wait_for(lambda: "ready" in runc_driver.output(s.instance_id), 30, "ready")
    exit_ = await runc_driver.stop(s.instance_id, signal=signal.SIGTERM, timeout=120)
    assert exit_.requested_stop and exit_.signal is None, exit_
    assert exit_.exit_code == 128 + signal.SIGTERM, exit_


async def test_runc_driver_warns_once_without_a_static_init(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runc_module, "INIT_CANDIDATES", (str(tmp_path / "no-tini-static"),))
    with caplog.at_level(logging.WARNING, logger=runc_module.__name__):
        driver = RuncDriver(tmp_path / "runc")
    assert driver.init is None
    [record] = caplog.records
    assert "apt-get install tini" in record.message and "PID 1" in record.message


@needs_runc
async def test_runc_without_an_init_runs_the_command_as_pid_1(tmp_path):
    """The fallback the docs describe: PID 1 without a handler ignores SIGTERM, so the stop
    escalates to SIGKILL after its timeout."""
    driver = RuncDriver(tmp_path / "runc", init=False)
    try:
        s = spec(("sh", "-c", "echo pid=$$; exec sleep 1000"))
        await driver.create(s)
        await driver.start(s.instance_id)
        await wait_for(lambda: "pid=1" in driver.output(s.instance_id), 30, "pid=1")
        exit_ = await driver.stop(s.instance_id, signal=signal.SIGTERM, timeout=0.5)
        assert exit_.requested_stop and exit_.signal == signal.SIGKILL, exit_
    finally:
        await driver.destroy_all()
    (tmp_path / "not-an-init").write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="statically linked"):
        RuncDriver(tmp_path / "other", init=str(tmp_path / "not-an-init"))


@needs_runc
async def test_runc_unknown_image(runc_driver):
    s = InstanceSpec(instance_id=iid(), machine_id="m1", image="nosuchimage:latest", cmd=("sh",))
    with pytest.raises(ImageNotFoundError) as err:
        await runc_driver.prepare(s)
    assert not err.value.transient


async def test_fake_driver_faults():
    clock = ManualClock()
    d = FakeDriver(clock, images={"busybox"})
    with pytest.raises(ImageNotFoundError):
        await d.prepare(InstanceSpec("i0", "m", "alpine"))
    s = spec()
    d.fail_next("start", message="no capacity")
    await d.create(s)
    with pytest.raises(DriverError, match="no capacity"):
        await d.start(s.instance_id)
    await d.start(s.instance_id)
    d.oom(s.instance_id)
    exit_ = await d.wait(s.instance_id)
    assert exit_.oom_killed and exit_.failed and not exit_.requested_stop

    s2 = spec()
    await d.create(s2)
    await d.start(s2.instance_id)
    d.ignore_sigterm(s2.instance_id)
    result = {}

    async def stopper():
        result["exit"] = await d.stop(s2.instance_id, timeout=7)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stopper)
        await wait_for(lambda: clock.sleepers > 0, 10, "the stop to sleep", interval=0)
        assert clock.next_deadline() == clock.now() + 7  # slow stop: waits out the timeout
        clock.advance(7)
    assert result["exit"].signal == signal.SIGKILL and result["exit"].requested_stop
    assert ("start", s.instance_id) in d.calls


async def test_sigterm_reaches_a_handler_even_right_after_start(real_driver):
    """Graceful stop: a program that handles SIGTERM exits by itself (code 0 here), whether the
    signal comes once its handler is set or at once (then it stays pending until the supervisor
    forwards it, and the program dies of it or handles it — no SIGKILL either way)."""
    driver = real_driver
    script = "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done"
    # runc's start returns once tini runs the command (its signals blocked until then); without
    # tini the shell is PID 1 and a SIGTERM before its trap exists is dropped by the kernel
    at_once = isinstance(driver, ProcessDriver) or getattr(driver, "init", None) is not None
    cases = (False, True) if at_once else (True,)
    for when_ready in cases:
        s = spec(("sh", "-c", script))
        await driver.create(s)
        await driver.start(s.instance_id)
        if when_ready:
            await wait_for(lambda iid=s.instance_id: "ready" in driver.output(iid), 30, "ready")
        exit_ = await driver.stop(s.instance_id, signal=signal.SIGTERM, timeout=20)
        assert exit_.requested_stop, exit_
        if when_ready:
            assert exit_.exit_code == 0, exit_
        else:
            assert exit_.signal != signal.SIGKILL and exit_.exit_code != 137, exit_
