"""The operations surface on real processes (process driver; runc where it can run): volumes
(``config.mounts``) across stop/start/update/destroy, signal, exec, ps, logs, events, and the
compaction that keeps a long-lived machine's step log bounded."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import httpx
import pytest
from orch_helpers import require_runc
from support import wait_for

from orchestrator.api import create_app
from orchestrator.drivers import FakeDriver, ProcessDriver, RuncDriver
from orchestrator.drivers.process import mount_env
from orchestrator.engine import Backoff
from orchestrator.service import Orchestrator
from orchestrator.steplog import EventKind, MachineLog, RunRecord, RunStatus

pytestmark = pytest.mark.anyio
BASE = "/v1/apps/app/machines"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _driver(kind: str, state: Path):
    if kind == "runc":
        require_runc()
        return RuncDriver(state)
    if kind == "process" and os.geteuid() != 0:
        pytest.skip("the process driver uses namespaces only as root (the plain variant runs)")
    return ProcessDriver(state, namespaces=kind == "process" and os.geteuid() == 0)


# "plain": the process driver without namespaces (what it is without root)
@pytest.fixture(params=["process", "plain", "runc"])
async def client(request, tmp_path):
    driver = _driver(request.param, tmp_path / "instances")
    orch = Orchestrator(
        machines_path=tmp_path / "machines",
        driver=driver,
        worker="w1",
        backoff=Backoff(initial=0.001, maximum=0.01),
        keep_runs=3,
    )
    try:
        async with orch:
            transport = httpx.ASGITransport(app=create_app(orch, manage=False))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://orch", timeout=60
            ) as c:
                c.orch = orch  # type: ignore[attr-defined]
                c.kind = request.param  # type: ignore[attr-defined]
                yield c
    finally:
        await driver.destroy_all()


async def create(client, config) -> str:
    r = await client.post(BASE, json={"config": config})
    assert r.status_code == 200, r.text
    return r.json()["id"]


async def wait(client, mid: str, state: str) -> None:
    r = await client.get(f"{BASE}/{mid}/wait", params={"state": state, "timeout": 60})
    assert r.status_code == 200, r.text
    await wait_for(lambda: not client.orch.engine.busy(mid), 60, f"{mid}'s runs to finish")


def sh(script: str) -> dict:
    return {"image": "busybox", "init": {"exec": ["sh", "-c", script]}}


async def test_volume_survives_stop_start_update_and_goes_on_destroy(client, tmp_path):
    # the process driver mounts over a host path (empty on the host, the volume inside)
    path = str(tmp_path / "mnt") if client.kind != "runc" else "/data"
    # without namespaces the volume is not mounted: its host directory is in FLY_MOUNT_PATH_...
    where = f'"${{{mount_env(path)}:-{path}}}"/boots'
    script = f'echo "$FLY_INSTANCE_ID" >> {where}; exec sleep 600'
    config = sh(script) | {
        "mounts": [{"volume": "data", "path": path}, {"volume": "keep", "path": path + "2",
                                                     "keep_on_destroy": True}]
    }  # fmt: skip
    mid = await create(client, config)
    await wait(client, mid, "started")
    volume = client.orch.volumes.directory("app", "data")

    def boots(n: int) -> list[str] | None:
        # "started" means spawned: the command writes its line a moment later
        lines = (volume / "boots").read_text().split() if (volume / "boots").exists() else []
        return lines if len(lines) == n else None

    await wait_for(lambda: boots(1), 60, "the first boot to be recorded")
    await client.post(f"{BASE}/{mid}/stop")
    await wait(client, mid, "stopped")
    await client.post(f"{BASE}/{mid}/start")
    await wait(client, mid, "started")
    await wait_for(lambda: boots(2), 60, "the boot after a stop/start to be recorded")
    r = await client.post(f"{BASE}/{mid}", json={"config": config | {"env": {"V": "2"}}})
    assert r.status_code == 200, r.text
    iid = r.json()["instance_id"]
    await wait(client, mid, "started")
    seen = await wait_for(lambda: boots(3), 60, "the boot after an update to be recorded")
    assert seen[-1] == iid and seen[0] == seen[1] != iid, seen
    r = await client.post(f"{BASE}/{mid}/exec", json={"command": ["sh", "-c", f"cat {where}"]})
    assert r.json()["stdout"].split() == seen, r.text
    if client.kind == "process":
        assert os.listdir(path) == []  # bound in the machine's mount namespace only
    # the volume is this machine's: another machine of the app cannot mount it
    r = await client.post(BASE, json={"config": config})
    assert r.status_code == 400 and "volume data is mounted by machine" in r.text
    r = await client.delete(f"{BASE}/{mid}", params={"force": "true"})
    assert r.status_code == 200, r.text
    await wait_for(lambda: not volume.exists(), 60, "the volume to be deleted")
    assert client.orch.volumes.directory("app", "keep").is_dir()  # keep_on_destroy


async def test_mounts_validation_names_the_field(client):
    for mounts, field in [
        ({"volume": "a"}, "config.mounts: expected a list"),
        ([{"volume": "a", "path": "rel"}], "config.mounts[0].path"),
        ([{"volume": "a/b", "path": "/x"}], "config.mounts[0].volume"),
        ([{"volume": "a", "path": "/"}], "config.mounts[0].path"),
        ([{"volume": "a", "path": "/x"}, {"volume": "b", "path": "/x/"}], "config.mounts[1].path"),
        ([{"volume": "a", "path": "/x", "bogus": 1}], "config.mounts[0]: unknown"),
        ([{"volume": "a", "path": "/x", "keep_on_destroy": "yes"}], "keep_on_destroy"),
    ]:
        r = await client.post(BASE, json={"config": sh("true") | {"mounts": mounts}})
        assert r.status_code == 400 and field in r.json()["error"], (mounts, r.text)
    assert client.orch.list_machines("app") == []


async def test_signal_exec_ps_logs_and_events(client):
    script = "trap 'echo got-usr1' USR1; echo hello; echo oops >&2; while true; do sleep 0.2; done"
    mid = await create(client, sh(script))
    await wait(client, mid, "started")
    url = f"{BASE}/{mid}"

    async def logged(text: str) -> bool:
        r = await client.get(f"{url}/logs", params={"lines": 10})
        return text in r.json()["lines"]

    await wait_for(lambda: logged("oops"), 60, "the command to set its trap and write")
    r = await client.post(f"{url}/signal", json={"signal": "SIGUSR1"})
    assert r.status_code == 200, r.text

    await wait_for(lambda: logged("got-usr1"), 60, "the USR1 handler to write its line")

    r = await client.post(
        f"{url}/exec", json={"command": ["sh", "-c", "echo out; echo err >&2; exit 3"]}
    )
    assert r.json() == {"stdout": "out\n", "stderr": "err\n", "exit_code": 3, "exit_signal": None}
    r = await client.post(f"{url}/exec", json={"cmd": "echo $0", "timeout": 10})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    r = await client.post(f"{url}/exec", json={"command": ["sleep", "600"], "timeout": 1})
    assert r.status_code == 408 and "did not finish in 1 s" in r.text, r.text
    for bad in ({}, {"command": []}, {"command": "ls"}, {"command": ["ls"], "timeout": -1}):
        assert (await client.post(f"{url}/exec", json=bad)).status_code == 400, bad
    r = await client.post(f"{url}/signal", json={"signal": "SIGNOPE"})
    assert r.status_code == 400 and "signal" in r.text

    procs = (await client.get(f"{url}/ps")).json()
    commands = [p["command"] for p in procs]
    assert any(c.startswith("sh -c trap") for c in commands), commands
    assert not any("sleep 600" in c for c in commands)  # the timed-out exec was killed
    if client.kind != "plain":
        assert min(p["pid"] for p in procs) == 1  # the machine's own pid namespace

    lines = (await client.get(f"{url}/logs", params={"lines": 10})).json()["lines"]
    assert lines == ["hello", "oops", "got-usr1"], lines
    tail = (await client.get(f"{url}/logs", params={"lines": 1})).json()["lines"]
    assert tail == lines[-1:]
    assert (await client.get(f"{url}/logs", params={"lines": "x"})).status_code == 400

    await client.post(f"{url}/stop")
    await wait(client, mid, "stopped")
    assert (await client.post(f"{url}/exec", json={"command": ["true"]})).status_code == 409
    assert (await client.post(f"{url}/signal", json={"signal": 10})).status_code == 409
    # a stopped machine's log is its last boot's (why did it stop?), until it starts again
    assert (await client.get(f"{url}/logs", params={"lines": 10})).json()["lines"] == lines
    await client.post(f"{url}/start")
    await wait(client, mid, "started")
    await wait_for(lambda: logged("oops"), 60, "the new boot to write")
    assert (await client.get(f"{url}/logs", params={"lines": 10})).json()["lines"] == [
        "hello",
        "oops",
    ]
    await client.post(f"{url}/stop")
    await wait(client, mid, "stopped")
    history = (await client.get(f"{url}/events")).json()
    assert [h["action"] for h in history] == ["create", "stop", "start", "stop"]
    for run in history:
        kinds = [e["kind"] for e in run["events"]]
        assert kinds[0] == "start" and kinds[-1] == "finish", run
        assert run["status"] == "succeeded"


async def test_instances_that_exit_at_once_get_every_exit_handled(client):
    """A command that exits as soon as it starts: each exit is seen, though it happens while the
    run that restarted the machine is still finishing. on-failure gives up after max_retries
    and leaves the machine stopped; always keeps restarting it until it is stopped."""
    restart = {"policy": "on-failure", "max_retries": 2}
    mid = await create(client, sh("echo dying; exit 3") | {"restart": restart})
    await wait(client, mid, "stopped")
    events = (await client.get(f"{BASE}/{mid}")).json()["events"]
    exits = [(e["status"], e["request"]["exit_event"]["exit_code"])
             for e in reversed(events) if e["type"] == "exit"]  # fmt: skip
    assert exits == [("starting", 3), ("starting", 3), ("stopped", 3)], exits
    assert client.orch.doc(mid)["restarts"] == 2

    mid = await create(client, {"image": "busybox", "init": {"exec": ["true"]},
                                "restart": {"policy": "always"}})  # fmt: skip
    await wait_for(lambda: client.orch.doc(mid).get("restarts", 0) >= 3, 60, "3 restarts")

    async def stopped_accepted() -> bool:  # refused while an exit run has it starting
        return (await client.post(f"{BASE}/{mid}/stop")).status_code == 200

    await wait_for(stopped_accepted, 60, "a stop to be accepted")
    await wait(client, mid, "stopped")


async def test_compaction_bounds_the_step_log_over_many_cycles(client):
    mid = await create(client, sh("exec sleep 600"))
    await wait(client, mid, "started")
    cycles = 8
    for _ in range(cycles):
        await client.post(f"{BASE}/{mid}/stop")
        await wait(client, mid, "stopped")
        await client.post(f"{BASE}/{mid}/start")
        await wait(client, mid, "started")
    sizes = client.orch.store.log(mid).sizes()
    assert sizes["runs"] <= client.orch.keep_runs, sizes
    assert sizes["history"] == 1 + 2 * cycles - sizes["runs"], sizes
    history = (await client.get(f"{BASE}/{mid}/events")).json()
    assert [h["action"] for h in history] == ["create"] + ["stop", "start"] * cycles
    assert [h["compacted"] for h in history].count(False) == sizes["runs"]
    assert all(h["events"][-1]["kind"] == "finish" for h in history)


def test_compaction_never_touches_an_unfinished_run(tmp_path):
    """A crash mid-run leaves it active: compaction around it keeps every event, and replaying it
    after reopening finds the step it had completed."""
    log = MachineLog(tmp_path / "m.sqlite")
    for i in range(5):
        rec = RunRecord(f"done{i}", "stop", ("a",), (), {}, float(i))
        log.start_run(rec)
        log.append(f"done{i}", EventKind.COMPLETE, step="a", at=float(i))
        log.finish(f"done{i}", RunStatus.SUCCEEDED, error=None, response={}, at=float(i))
        if i == 1:
            log.start_run(RunRecord("crashed", "start", ("a", "b"), (), {"x": 1}, 1.5))
            log.append("crashed", EventKind.COMPLETE, step="a", payload={"r": 1}, at=1.6)
    assert log.compact(keep=1) == 4
    log.close()
    log = MachineLog(tmp_path / "m.sqlite")
    [active] = log.active_runs()
    assert active.run_id == "crashed" and active.completed == ["a"]
    assert active.response == {"r": 1} and active.record.request == {"x": 1}
    assert log.get_run("done4") is not None and log.get_run("done0") is None
    assert log.sizes() == {"runs": 2, "events": 5, "history": 4}
    timeline = log.timeline()
    assert [t["run_id"] for t in timeline] == ["done0", "done1", "crashed", "done2", "done3",
                                               "done4"]  # fmt: skip
    with pytest.raises(ValueError):
        log.compact(keep=0)
    log.close()


async def test_fake_driver_answers_501_for_exec(tmp_path):
    orch = Orchestrator(machines_path=tmp_path / "m", driver=FakeDriver(images={"busybox"}))
    async with orch:
        transport = httpx.ASGITransport(app=create_app(orch, manage=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://o") as c:
            r = await c.post(BASE, json={"config": sh("sleep 1")})
            mid = r.json()["id"]
            with anyio.fail_after(30):
                await c.get(f"{BASE}/{mid}/wait", params={"state": "started"})
            r = await c.post(f"{BASE}/{mid}/exec", json={"command": ["ls"]})
            assert r.status_code == 501 and "fake driver" in r.text
