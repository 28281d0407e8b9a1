"""The machine service over FakeDriver: every operation, the restart policy, transitions checked
against the projected state, leases, metadata, publishing, and restarting the service."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest
from support import wait_for

from orchestrator import machine as m
from orchestrator.clock import ManualClock
from orchestrator.drivers import FakeDriver, InstanceState
from orchestrator.engine import Backoff
from orchestrator.errors import (
    AlreadyRunningError,
    InvalidRequestError,
    InvalidTransitionError,
    LeaseError,
    NotFoundError,
)
from orchestrator.network import Attachment
from orchestrator.publish import MemoryPublisher, upsert_statement
from orchestrator.service import Orchestrator
from orchestrator.store import MachineStore

pytestmark = pytest.mark.anyio
FAST = Backoff(initial=0.001, maximum=0.01)
CONFIG = {"image": "busybox", "init": {"cmd": ["sleep", "600"]}}


def orch(tmp_path, driver=None, publisher=None, **kw) -> Orchestrator:
    return Orchestrator(
        machines_path=tmp_path / "machines",
        driver=driver if driver is not None else FakeDriver(),
        publisher=publisher,
        worker="w1",
        backoff=FAST,
        **kw,
    )


async def settle(o: Orchestrator, mid: str, state: str, timeout: float = 10) -> None:
    assert await o.wait_machine("app", mid, state=state, timeout=timeout), o.doc(mid)["state"]
    await wait_for(lambda: not o.engine.busy(mid), timeout, f"{mid}'s runs", interval=0.002)


def config(**over):
    return {**CONFIG, **over}


async def test_create_starts_the_machine_and_publishes_it(tmp_path):
    pub = MemoryPublisher()
    driver = FakeDriver()
    async with orch(tmp_path, driver, pub) as o:
        view = await o.create_machine("app", {"config": CONFIG, "name": "web-1"})
        assert view["state"] == "created" and view["name"] == "web-1"
        assert view["config"]["restart"] == {"policy": "on-failure", "max_retries": 10}
        mid = view["id"]
        await settle(o, mid, "started")
        got = o.get_machine("app", mid)
        assert got["instance_id"] == view["instance_id"] and got["private_ip"]
        assert [e["status"] for e in got["events"]][:2] == ["started", "starting"]
        assert driver.instances[got["instance_id"]].state is InstanceState.RUNNING
        await wait_for(lambda: pub.rows().get(mid, {}).get("state") == "started")
        row = pub.rows()[mid]
        assert row["app"] == "app" and row["worker"] == "w1" and row["cordoned"] == 0
        assert row["address"] == got["private_ip"] and row["instance_id"] == got["instance_id"]
        assert [v["id"] for v in o.list_machines("app")] == [mid]
        assert o.list_machines("app", state="stopped") == []
        assert o.list_machines("other") == []
        with pytest.raises(NotFoundError):
            o.get_machine("other", mid)


async def test_skip_launch_then_start_stop(tmp_path):
    async with orch(tmp_path) as o:
        mid = (await o.create_machine("app", {"config": CONFIG, "skip_launch": True}))["id"]
        await settle(o, mid, "created")
        with pytest.raises(InvalidTransitionError, match="cannot stop"):
            await o.stop_machine("app", mid)
        assert await o.start_machine("app", mid) == {"previous_state": "created"}
        await settle(o, mid, "started")
        await o.stop_machine("app", mid, signal="SIGINT", timeout="5s")
        await settle(o, mid, "stopped")
        exit_ = o.doc(mid)["last_exit"]
        assert exit_["requested_stop"] and exit_["signal"] == 2
        assert o.get_machine("app", mid)["events"][0]["request"]["exit_event"] == exit_
        assert (await o.start_machine("app", mid))["previous_state"] == "stopped"
        await settle(o, mid, "started")


async def test_second_start_is_already_running_and_start_of_started_is_refused(tmp_path):
    driver = FakeDriver()
    driver.latency = 0.05  # keep the first start in flight
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": CONFIG, "skip_launch": True}))["id"]
        await settle(o, mid, "created")
        await o.start_machine("app", mid)
        with pytest.raises(AlreadyRunningError) as err:
            await o.start_machine("app", mid)
        run_id = err.value.run_id
        assert [r.run_id for r in o.engine.list_runs(mid)] == [run_id]
        await settle(o, mid, "started")
        with pytest.raises(InvalidTransitionError, match="it is started"):
            await o.start_machine("app", mid)


async def test_operations_queue_against_the_projected_state(tmp_path):
    driver = FakeDriver()
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        # accepted while the create still runs: create promises started, so stop is valid,
        # then start, then stop again
        await o.stop_machine("app", mid)
        with pytest.raises(InvalidTransitionError, match="will be stopped"):
            await o.restart_machine("app", mid)
        await o.start_machine("app", mid)
        with pytest.raises(AlreadyRunningError):
            await o.start_machine("app", mid)
        # one live run per (machine, action): the first stop has not run yet...
        with pytest.raises(AlreadyRunningError) as refused:
            await o.stop_machine("app", mid)
        assert refused.value.run_id == o.engine.active_action(mid, "stop")
        # ...unless the caller asks to queue behind it
        await o.stop_machine("app", mid, queue=True)
        assert [r.action for r in o.engine.list_runs(mid)][-3:] == ["stop", "start", "stop"]
        await settle(o, mid, "stopped")
        kinds = [(e["type"], e["status"]) for e in reversed(o.doc(mid)["events"])]
        assert kinds.count(("start", "started")) == 2 and kinds.count(("exit", "stopped")) == 2


@pytest.mark.parametrize(
    ("policy", "code", "restarted"),
    [
        ({"policy": "no"}, 3, False),
        ({"policy": "always"}, 0, True),
        ({"policy": "on-failure"}, 0, False),
        ({"policy": "on-failure"}, 3, True),
    ],
)
async def test_restart_policy_on_exit(tmp_path, policy, code, restarted):
    driver = FakeDriver()
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": config(restart=policy)}))["id"]
        await settle(o, mid, "started")
        boot = o.doc(mid)["boot"]
        driver.crash(o.doc(mid)["instance_id"], exit_code=code)
        await wait_for(lambda: o.doc(mid)["boot"] != boot or o.doc(mid)["state"] == "stopped")
        await settle(o, mid, "started" if restarted else "stopped")
        doc = o.doc(mid)
        assert doc["restarts"] == (1 if restarted else 0)
        assert doc["last_exit"]["exit_code"] == code and not doc["last_exit"]["requested_stop"]
        exits = [e for e in doc["events"] if e["type"] == "exit"]
        assert exits[0]["request"]["exit_event"]["exit_code"] == code


async def test_on_failure_gives_up_after_max_retries_and_oom_counts_as_failure(tmp_path):
    driver = FakeDriver()
    cfg = config(restart={"policy": "on-failure", "max_retries": 2})
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": cfg}))["id"]
        for expected in (1, 2):
            await settle(o, mid, "started")
            driver.oom(o.doc(mid)["instance_id"])
            await wait_for(lambda e=expected: o.doc(mid)["restarts"] == e)
        await settle(o, mid, "started")
        driver.crash(o.doc(mid)["instance_id"], 1)
        await settle(o, mid, "stopped")
        assert o.doc(mid)["restarts"] == 2
        # an explicit start resets the budget
        await o.start_machine("app", mid)
        await settle(o, mid, "started")
        assert o.doc(mid)["restarts"] == 0


async def test_start_failures_retry_then_mark_failed(tmp_path):
    driver = FakeDriver()
    async with orch(tmp_path, driver) as o:
        driver.fail_next("start", 2)  # transient: retried, then it works
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        await o.stop_machine("app", mid)
        await settle(o, mid, "stopped")
        driver.fail_next("start", 100)
        await o.start_machine("app", mid)
        await settle(o, mid, "failed")
        launch = o.doc(mid)["events"][0]
        assert launch["status"] == "failed" and "injected fault" in launch["request"]["error"]
        driver.fail_next("start", 0)
        driver._faults["start"].clear()
        await o.start_machine("app", mid)  # failed is recoverable
        await settle(o, mid, "started")


async def test_unrecoverable_driver_error_fails_at_once(tmp_path):
    driver = FakeDriver()
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        await o.stop_machine("app", mid)
        await settle(o, mid, "stopped")
        driver.fail_next("create", transient=False, message="bad rootfs")
        await o.start_machine("app", mid)
        await settle(o, mid, "failed")
        assert driver.calls.count(("create", o.doc(mid)["instance_id"])) == 2  # no retry


async def test_update_replaces_the_instance(tmp_path):
    driver = FakeDriver()
    async with orch(tmp_path, driver) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        old = o.doc(mid)["instance_id"]
        new_cfg = config(env={"A": "1"})
        view = await o.update_machine("app", mid, {"config": new_cfg})
        assert view["id"] == mid and view["config"]["env"] == {"A": "1"}
        await settle(o, mid, "started")
        doc = o.doc(mid)
        assert doc["instance_id"] != old and doc["config"]["env"] == {"A": "1"}
        assert view["instance_id"] == doc["instance_id"]  # the answer names the new instance
        assert old not in driver.instances
        assert driver.instances[doc["instance_id"]].spec.env == {"A": "1"}
        with pytest.raises(InvalidRequestError, match="name"):
            await o.update_machine("app", mid, {"config": CONFIG, "name": "other"})
        await o.update_machine("app", mid, {"config": CONFIG, "skip_launch": True})
        await settle(o, mid, "created")
        assert not [i for i in driver.instances.values() if i.state is InstanceState.RUNNING]


async def test_destroy_needs_force_when_started_and_archives(tmp_path):
    pub = MemoryPublisher()
    driver = FakeDriver()
    async with orch(tmp_path, driver, pub) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        await wait_for(lambda: mid in pub.rows())
        with pytest.raises(InvalidTransitionError, match="force"):
            await o.destroy_machine("app", mid)
        assert o.doc(mid)["state"] == "started"
        await o.destroy_machine("app", mid, force=True)
        assert await o.wait_machine("app", mid, state="destroyed", timeout=10)
        await wait_for(lambda: o.docs.find(mid) is None)
        with pytest.raises(NotFoundError):
            o.get_machine("app", mid)
        assert await o.wait_machine("app", mid, state="destroyed", timeout=1)
        assert not driver.instances
        assert o.store.archive_store.list_keys() == [f"{mid}.sqlite.gz"]
        assert o.store.machine_ids() == []
        await wait_for(lambda: mid not in pub.rows())
        restored = o.store.restore_archived(mid, tmp_path / "restored.sqlite")
        actions = [r.action for r in restored.history()]
        assert actions == ["destroy", "create"]
        assert restored.read_doc()["state"] == "destroyed"
        restored.close()


async def test_cordon_uncordon_published(tmp_path):
    pub = MemoryPublisher()
    async with orch(tmp_path, publisher=pub) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        await o.cordon_machine("app", mid)
        await wait_for(lambda: pub.rows().get(mid, {}).get("cordoned") == 1)
        assert o.get_machine("app", mid)["cordoned"]
        await o.uncordon_machine("app", mid)
        await wait_for(lambda: pub.rows()[mid]["cordoned"] == 0)


async def test_leases(tmp_path):
    clock = ManualClock()
    async with orch(tmp_path, clock=clock) as o:
        mid = (await o.create_machine("app", {"config": CONFIG, "skip_launch": True}))["id"]
        view, new = await o.acquire_lease("app", mid, ttl=30, description="deploy")
        nonce = view["data"]["nonce"]
        assert new and view["data"]["expires_at"] == int(clock.now() + 30)
        with pytest.raises(LeaseError, match="currently held"):
            await o.acquire_lease("app", mid, ttl=30)
        for call in (
            lambda n: o.start_machine("app", mid, nonce=n),
            lambda n: o.set_metadata("app", mid, "k", "v", nonce=n),
            lambda n: o.cordon_machine("app", mid, nonce=n),
        ):
            with pytest.raises(LeaseError, match="fly-machine-lease-nonce"):
                await call(None)
            with pytest.raises(LeaseError, match="wrong nonce"):
                await call("nope")
        assert o.doc(mid)["state"] == "created" and not o.doc(mid)["cordoned"]
        assert "nonce" not in o.get_lease("app", mid)["data"]
        renewed, new = await o.acquire_lease("app", mid, ttl=60, nonce=nonce)
        assert not new and renewed["data"]["nonce"] == nonce
        await o.set_metadata("app", mid, "k", "v", nonce=nonce)
        with pytest.raises(LeaseError):
            await o.release_lease("app", mid, nonce="nope")
        await o.release_lease("app", mid, nonce=nonce)
        with pytest.raises(NotFoundError):
            o.get_lease("app", mid)
        await o.set_metadata("app", mid, "k2", "v2")
        # expiry frees the machine
        await o.acquire_lease("app", mid, ttl=5)
        clock.advance(6)
        await o.set_metadata("app", mid, "k3", "v3")
        assert o.get_metadata("app", mid) == {"k": "v", "k2": "v2", "k3": "v3"}


async def test_create_with_lease_ttl_returns_nonce(tmp_path):
    async with orch(tmp_path) as o:
        view = await o.create_machine("app", {"config": CONFIG, "lease_ttl": 60})
        mid = view["id"]
        await settle(o, mid, "started")
        with pytest.raises(LeaseError):
            await o.stop_machine("app", mid)
        await o.stop_machine("app", mid, nonce=view["nonce"])
        await settle(o, mid, "stopped")


async def test_metadata(tmp_path):
    async with orch(tmp_path) as o:
        mid = (await o.create_machine("app", {"config": config(metadata={"a": "1"})}))["id"]
        await o.set_metadata("app", mid, "b", "2")
        assert o.get_metadata("app", mid) == {"a": "1", "b": "2"}
        await o.delete_metadata("app", mid, "a")
        assert o.get_metadata("app", mid) == {"b": "2"}
        with pytest.raises(NotFoundError):
            await o.delete_metadata("app", mid, "a")
        with pytest.raises(InvalidRequestError):
            await o.set_metadata("app", mid, "bad key!", "x")
        with pytest.raises(InvalidRequestError):
            await o.set_metadata("app", mid, "k", 5)


async def test_api_changes_and_step_commits_keep_each_other(tmp_path):
    """API changes (metadata) and the engine's staged commits (stop/start steps) change the
    document through one locked path: while runs commit their steps, every metadata write lands,
    every run's state change lands, and the persisted document is the one in memory."""
    keys = {f"k{i}": str(i) for i in range(30)}
    async with orch(tmp_path) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")

        async def cycle() -> None:
            for _ in range(4):
                await o.stop_machine("app", mid, queue=True)
                await o.start_machine("app", mid, queue=True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cycle)
            for key, value in keys.items():
                await o.set_metadata("app", mid, key, value)
                await anyio.lowlevel.checkpoint()
        await settle(o, mid, "started")
        doc = o.doc(mid)
        assert doc["config"]["metadata"] == keys
        statuses = [e["status"] for e in doc["events"]]
        assert statuses[0] == "started" and "stopped" in statuses, statuses
    store = MachineStore(tmp_path / "machines")
    try:
        assert store.log(mid).read_doc() == doc
    finally:
        store.close()


async def test_closing_while_a_vanished_instance_is_noticed(tmp_path):
    """A started machine whose instance vanished (a new driver: the host rebooted) is noticed
    as an exit when the service starts. Closing the service before that exit run could be
    submitted closes cleanly, and the next start notices the exit again and restarts it."""
    async with orch(tmp_path) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        before = o.doc(mid)["boot"]
    async with orch(tmp_path):
        pass
    async with orch(tmp_path) as o:
        await wait_for(lambda: o.doc(mid)["boot"] != before and not o.engine.busy(mid))
        assert o.doc(mid)["state"] == "started"


BAD_BODIES = [
    ({}, "config: required"),
    ({"config": {}}, "config.image"),
    ({"config": {"image": ""}}, "config.image"),
    ({"config": {**CONFIG, "bogus": 1}}, "unknown field"),
    ({"config": {**CONFIG, "restart": {"policy": "sometimes"}}}, "config.restart.policy"),
    ({"config": {**CONFIG, "restart": {"max_retries": -1}}}, "max_retries"),
    ({"config": {**CONFIG, "env": {"A": 1}}}, "config.env.A"),
    ({"config": {**CONFIG, "env": {"1A": "x"}}}, "config.env"),
    ({"config": {**CONFIG, "init": {"cmd": "sleep"}}}, "config.init.cmd"),
    ({"config": {**CONFIG, "guest": {"memory_mb": 0}}}, "config.guest.memory_mb"),
    ({"config": {**CONFIG, "stop_config": {"signal": "SIGNOPE"}}}, "stop_config.signal"),
    ({"config": {**CONFIG, "stop_config": {"timeout": "ten"}}}, "stop_config.timeout"),
    ({"config": CONFIG, "skip_launch": "yes"}, "skip_launch"),
    ({"config": CONFIG, "region": "mars"}, "region"),
    ({"config": CONFIG, "name": "bad name"}, "name"),
    ({"config": CONFIG, "lease_ttl": -1}, "ttl"),
    ({"config": CONFIG, "extra": 1}, "unknown field"),
    ({"config": {"image": "alpine"}}, "image"),  # the driver does not have it
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
async def test_bad_create_requests_change_nothing(tmp_path, body, message):
    pub = MemoryPublisher()
    async with orch(tmp_path, FakeDriver(images={"busybox"}), pub) as o:
        with pytest.raises(InvalidRequestError, match=message):
            await o.create_machine("app", body)
        assert o.store.machine_ids() == [] and o.list_machines("app") == []
    assert pub.rows() == {}


async def test_bad_operation_arguments(tmp_path):
    async with orch(tmp_path) as o:
        with pytest.raises(InvalidRequestError):
            await o.create_machine("Bad App!", {"config": CONFIG})
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        with pytest.raises(InvalidRequestError, match="signal"):
            await o.stop_machine("app", mid, signal="SIGWHAT")
        with pytest.raises(InvalidRequestError, match="timeout"):
            await o.stop_machine("app", mid, timeout="forever")
        with pytest.raises(InvalidRequestError, match="state"):
            await o.wait_machine("app", mid, state="dancing")
        with pytest.raises(NotFoundError):
            await o.start_machine("app", "0000000000dead")
        assert not await o.wait_machine("app", mid, state="stopped", timeout=0.05)
        assert o.engine.list_runs(mid) == [] and o.doc(mid)["state"] == "started"


async def test_service_restart_resumes_watching_and_reconciles_rows(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator.service")
    driver = FakeDriver()  # survives the restart, as VMs survive flyd
    pub = MemoryPublisher()
    await pub.execute([upsert_statement({"id": "stale", "app": "app", "worker": "w1",
        "region": "", "state": "started", "instance_id": "", "address": "", "cordoned": 0,
        "checks": "[]", "services": "[]", "updated_at": 0})])  # fmt: skip
    await pub.execute([upsert_statement({"id": "theirs", "app": "app", "worker": "w2",
        "region": "", "state": "started", "instance_id": "", "address": "", "cordoned": 0,
        "checks": "[]", "services": "[]", "updated_at": 0})])  # fmt: skip
    async with orch(tmp_path, driver, pub) as o:
        mid = (await o.create_machine("app", {"config": config(restart={"policy": "no"})}))["id"]
        await settle(o, mid, "started")
        await wait_for(lambda: "stale" not in pub.rows())
        assert "theirs" in pub.rows()  # another worker's row is not ours to delete
    # the operator is told the machines outlive the service (they are not stopped with it)
    [stopped] = [r for r in caplog.records if r.getMessage().startswith("orchestrator stopped")]
    assert (
        stopped.getMessage()
        == "orchestrator stopped; 1 machine(s) keep running, adopted at its next start"
    )
    assert stopped.fields == {"machines": [mid]}
    iid = next(iter(driver.instances))
    driver.crash(iid, 9)  # exits while the service is down
    pub2 = MemoryPublisher()
    async with orch(tmp_path, driver, pub2) as o:
        await settle(o, mid, "stopped")
        assert o.doc(mid)["last_exit"]["exit_code"] == 9
        await wait_for(lambda: pub2.rows().get(mid, {}).get("state") == "stopped")


async def test_publisher_outage_converges(tmp_path):
    pub = MemoryPublisher()
    pub.fail_next(5)
    async with orch(tmp_path, publisher=pub) as o:
        mid = (await o.create_machine("app", {"config": CONFIG}))["id"]
        await settle(o, mid, "started")
        await wait_for(lambda: pub.rows().get(mid, {}).get("state") == "started")
        assert o.publish_queue.failures == 5


def test_duration_and_signal_parsing():
    assert m.parse_duration("1m30s", "t") == 90
    assert m.parse_duration("500ms", "t") == 0.5
    assert m.parse_duration(7, "t") == 7
    for bad in ("10", "s", "-1s", "1x", True, None):
        with pytest.raises(InvalidRequestError):
            m.parse_duration(bad, "t")


class RecordingNetwork:
    """The machines' network as the service uses it, recording what it is asked; its attach
    takes a while, so a create that fails meets the early attach still in flight."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.attached: set[str] = set()

    async def setup(self) -> None:
        pass

    async def reconcile(self, live_ids) -> list[str]:
        return []

    async def attach(self, machine_id: str) -> Attachment:
        self.calls.append(("attach", machine_id))
        await anyio.sleep(0.05)
        self.attached.add(machine_id)
        return Attachment(machine_id, "10.213.1.2", f"corro-10-213-1-2-{machine_id}")

    async def release(self, machine_id: str) -> None:
        self.calls.append(("release", machine_id))
        self.attached.discard(machine_id)


async def test_a_create_attaches_its_network_early_and_releases_it_when_it_fails(tmp_path):
    net = RecordingNetwork()
    async with orch(tmp_path, network=net) as o:
        view = await o.create_machine("app", {"config": CONFIG})
        mid = view["id"]
        assert net.calls[0] == ("attach", mid)  # started with the create, before any step
        await settle(o, mid, "started")
        assert mid in net.attached

        async def refuse(*args, **kwargs):
            raise RuntimeError("the step log is full (injected)")

        o.engine.start = refuse  # type: ignore[method-assign]
        net.calls.clear()
        with pytest.raises(RuntimeError, match="injected"):
            await o.create_machine("app", {"config": CONFIG})
        # the early attach finished, then was released: no address or namespace left behind
        (attached, mid2), (released, mid3) = net.calls
        assert (attached, released, mid2) == ("attach", "release", mid3)
        assert net.attached == {mid}
        assert o.store.machine_ids() == [mid]
