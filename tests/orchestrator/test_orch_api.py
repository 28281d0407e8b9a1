"""The Machines API over HTTP (httpx against the ASGI app): every endpoint, its error paths, and
lease exclusivity under concurrent requests."""

from __future__ import annotations

import anyio
import httpx
import pytest
from support import wait_for

from orchestrator.api import NONCE_HEADER, create_app
from orchestrator.drivers import FakeDriver
from orchestrator.engine import Backoff
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio
CONFIG = {"image": "busybox", "init": {"cmd": ["sleep", "600"]}}
BASE = "/v1/apps/app/machines"


@pytest.fixture
async def client(tmp_path):
    orch = Orchestrator(
        machines_path=tmp_path / "machines",
        driver=FakeDriver(images={"busybox"}),
        worker="w1",
        backoff=Backoff(initial=0.001, maximum=0.01),
    )
    app = create_app(orch, manage=False, token="s3cret")
    async with orch:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://orch",
            headers={"authorization": "Bearer s3cret"},
        ) as c:
            c.orch = orch
            yield c


async def create(client, **body) -> dict:
    r = await client.post(BASE, json={"config": CONFIG, **body})
    assert r.status_code == 200, r.text
    return r.json()


async def wait(client, mid, state, timeout=10):
    r = await client.get(f"{BASE}/{mid}/wait", params={"state": state, "timeout": timeout})
    assert r.status_code == 200, r.text
    await wait_for(lambda: not client.orch.engine.busy(mid), timeout, interval=0.002)


async def test_machine_lifecycle_over_http(client):
    m = await create(client, name="web")
    mid = m["id"]
    assert m["state"] == "created" and m["config"]["image"] == "busybox"
    assert m["image_ref"]["repository"] == "busybox" and m["instance_id"]
    await wait(client, mid, "started")
    got = (await client.get(f"{BASE}/{mid}")).json()
    assert got["state"] == "started" and got["private_ip"]
    listed = (await client.get(BASE)).json()
    assert [x["id"] for x in listed] == [mid]
    assert (await client.get(BASE, params={"state": "stopped"})).json() == []

    r = await client.post(f"{BASE}/{mid}/stop", json={"signal": "SIGTERM", "timeout": "5s"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    await wait(client, mid, "stopped")
    r = await client.post(f"{BASE}/{mid}/start")
    assert r.json() == {"previous_state": "stopped"}
    await wait(client, mid, "started")
    r = await client.post(f"{BASE}/{mid}/restart", params={"signal": "SIGINT", "timeout": "3"})
    assert r.status_code == 200, r.text
    await wait(client, mid, "started")

    iid = got["instance_id"]
    r = await client.post(f"{BASE}/{mid}", json={"config": {**CONFIG, "env": {"X": "1"}}})
    assert r.status_code == 200, r.text
    await wait(client, mid, "started")
    updated = (await client.get(f"{BASE}/{mid}")).json()
    assert updated["instance_id"] != iid and updated["config"]["env"] == {"X": "1"}

    assert (await client.post(f"{BASE}/{mid}/cordon")).status_code == 200
    await wait(client, mid, "started")  # the cordon run has finished
    assert (await client.get(f"{BASE}/{mid}")).json()["cordoned"] is True
    assert (await client.post(f"{BASE}/{mid}/uncordon")).status_code == 200

    r = await client.delete(f"{BASE}/{mid}", params={"force": "true"})
    assert r.status_code == 200, r.text
    await wait(client, mid, "destroyed")
    assert (await client.get(f"{BASE}/{mid}")).status_code == 404
    r = await client.get(f"{BASE}/{mid}/wait", params={"state": "destroyed", "timeout": 1})
    assert r.status_code == 200


async def test_wait_times_out_with_408(client):
    mid = (await create(client, skip_launch=True))["id"]
    await wait(client, mid, "created")
    r = await client.get(f"{BASE}/{mid}/wait", params={"state": "started", "timeout": 0.05})
    assert r.status_code == 408 and "timed out" in r.json()["error"]


async def test_error_paths_change_nothing(client):
    mid = (await create(client))["id"]
    await wait(client, mid, "started")
    before = (await client.get(f"{BASE}/{mid}")).json()
    cases = [
        (client.post(BASE, content=b"{not json"), 400, "invalid JSON"),
        (client.post(BASE, json=[1, 2]), 400, "JSON object"),
        (client.post(BASE, json={"config": {"image": "nope"}}), 400, "image"),
        (client.post(BASE, json={"config": {**CONFIG, "guest": {"cpus": "many"}}}), 400, "cpus"),
        (client.post("/v1/apps/Bad_App/machines", json={"config": CONFIG}), 400, "app name"),
        (client.get(f"{BASE}/0000000000dead"), 404, "not found"),
        (client.get(f"/v1/apps/other/machines/{mid}"), 404, "not found"),
        (client.post(f"{BASE}/{mid}/start"), 409, "cannot start"),
        (client.delete(f"{BASE}/{mid}"), 409, "force"),
        (client.post(f"{BASE}/{mid}/stop", json={"signal": "SIGFOO"}), 400, "signal"),
        (client.post(f"{BASE}/{mid}/stop", json={"nope": 1}), 400, "unknown field"),
        (client.post(f"{BASE}/{mid}", json={"config": {"image": ""}}), 400, "config.image"),
        (client.post(f"{BASE}/{mid}", json={"config": CONFIG, "region": "x"}), 400, "region"),
        (client.get(f"{BASE}/{mid}/wait", params={"state": "bogus"}), 400, "state"),
        (client.get(f"{BASE}/{mid}/wait", params={"timeout": "x"}), 400, "timeout"),
        (client.post(f"{BASE}/{mid}/suspend"), 501, "suspend"),
        (client.get(f"{BASE}/{mid}/lease"), 404, "no lease"),
        (client.delete(f"{BASE}/{mid}/lease"), 404, "no lease"),
        (client.post(f"{BASE}/{mid}/lease", json={"ttl": 0}), 400, "ttl"),
        (client.post(f"{BASE}/{mid}/metadata/k", json={"wrong": 1}), 400, "value"),
        (client.delete(f"{BASE}/{mid}/metadata/missing"), 404, "metadata"),
    ]
    for call, status, text in cases:
        r = await call
        assert r.status_code == status, (r.request.method, r.request.url, r.text)
        assert text in r.json()["error"], r.json()
    after = (await client.get(f"{BASE}/{mid}")).json()
    assert after == before
    assert [x["id"] for x in (await client.get(BASE)).json()] == [mid]


async def test_bearer_token_required(client):
    r = await client.get(BASE, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401


async def test_already_running_answers_with_the_run_id(client):
    client.orch.driver.latency = 0.05
    mid = (await create(client, skip_launch=True))["id"]
    await wait(client, mid, "created")
    assert (await client.post(f"{BASE}/{mid}/start")).status_code == 200
    r = await client.post(f"{BASE}/{mid}/start")
    assert r.status_code == 409 and "already running" in r.json()["error"]
    runs = (await client.get(f"{BASE}/{mid}/runs")).json()
    assert r.json()["run_id"] == runs[0]["run_id"] and runs[0]["action"] == "start"
    await wait(client, mid, "started")


async def test_leases_over_http(client):
    mid = (await create(client))["id"]
    await wait(client, mid, "started")
    r = await client.post(f"{BASE}/{mid}/lease", json={"ttl": 60, "description": "deploy"})
    assert r.status_code == 201
    data = r.json()["data"]
    nonce = data["nonce"]
    assert data["description"] == "deploy" and data["expires_at"] > 0
    r = await client.post(f"{BASE}/{mid}/lease", json={"ttl": 60})
    assert r.status_code == 409 and "currently held" in r.json()["error"]
    r = await client.post(f"{BASE}/{mid}/stop")
    assert r.status_code == 409 and NONCE_HEADER in r.json()["error"]
    r = await client.post(f"{BASE}/{mid}/metadata/k", json={"value": "v"})
    assert r.status_code == 409
    got = (await client.get(f"{BASE}/{mid}/lease")).json()
    assert "nonce" not in got["data"] and got["data"]["owner"]
    held = {NONCE_HEADER: nonce}
    r = await client.post(f"{BASE}/{mid}/lease", json={"ttl": 120}, headers=held)
    assert r.status_code == 200  # renewed
    r = await client.post(f"{BASE}/{mid}/metadata/k", json={"value": "v"}, headers=held)
    assert r.status_code == 204
    assert (await client.get(f"{BASE}/{mid}/metadata")).json() == {"k": "v"}
    r = await client.delete(f"{BASE}/{mid}/metadata/k", headers=held)
    assert r.status_code == 204
    r = await client.post(f"{BASE}/{mid}/stop", headers=held)
    assert r.status_code == 200
    await wait(client, mid, "stopped")
    r = await client.delete(f"{BASE}/{mid}/lease", headers={NONCE_HEADER: "wrong"})
    assert r.status_code == 409
    r = await client.delete(f"{BASE}/{mid}/lease", headers=held)
    assert r.status_code == 200
    assert (await client.post(f"{BASE}/{mid}/start")).status_code == 200


async def test_lease_exclusivity_under_concurrent_requests(client):
    mid = (await create(client, skip_launch=True))["id"]
    statuses: list[int] = []
    nonces: list[str] = []

    async def grab():
        r = await client.post(f"{BASE}/{mid}/lease", json={"ttl": 60})
        statuses.append(r.status_code)
        if r.status_code == 201:
            nonces.append(r.json()["data"]["nonce"])

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(grab)
    assert sorted(statuses) == [201] + [409] * 19
    assert client.orch.doc(mid)["lease"]["nonce"] == nonces[0]


async def test_create_with_lease_ttl(client):
    m = await create(client, lease_ttl=30)
    assert m["nonce"]
    r = await client.post(f"{BASE}/{m['id']}/cordon")
    assert r.status_code == 409
    r = await client.post(f"{BASE}/{m['id']}/cordon", headers={NONCE_HEADER: m["nonce"]})
    assert r.status_code == 200


async def test_cancel_a_live_run(client):
    client.orch.driver.stop_delay = 1000.0  # the stop hangs until cancelled
    mid = (await create(client))["id"]
    await wait(client, mid, "started")
    client.orch.driver.ignore_sigterm(client.orch.doc(mid)["instance_id"])
    r = await client.post(f"{BASE}/{mid}/stop", json={"timeout": 3600})
    assert r.status_code == 200

    async def stopping() -> str | None:
        """The stop's run id once it is in its stop_instance step."""
        runs = (await client.get(f"{BASE}/{mid}/runs")).json()
        return runs[0]["run_id"] if runs and runs[0]["step"] == "stop_instance" else None

    run_id = await wait_for(stopping, 10, "the stop run to reach stop_instance", interval=0.005)
    assert (await client.delete(f"{BASE}/{mid}/runs/nope")).status_code == 404
    r = await client.delete(f"{BASE}/{mid}/runs/{run_id}")
    assert r.status_code == 200, r.text
    await wait(client, mid, "started")  # the finalizer found it still running
    assert (await client.get(f"{BASE}/{mid}/runs")).json() == []
    result = await client.orch.engine.wait(run_id)
    assert result.status == "cancelled"


async def test_run_wait_and_queueing_over_http(client):
    client.orch.driver.stop_delay = 1000.0  # the restart's stop hangs until cancelled
    mid = (await create(client))["id"]
    await wait(client, mid, "started")
    client.orch.driver.ignore_sigterm(client.orch.doc(mid)["instance_id"])
    assert (await client.post(f"{BASE}/{mid}/restart", json={"timeout": 3600})).status_code == 200
    first = (await client.get(f"{BASE}/{mid}/runs")).json()[0]["run_id"]
    # a second restart while the first is live: 409 naming the run, unless queued
    r = await client.post(f"{BASE}/{mid}/restart", json={"timeout": 3600})
    assert r.status_code == 409 and first in r.json()["error"]
    r = await client.post(f"{BASE}/{mid}/restart", params={"queue": "true"}, json={"timeout": 1})
    assert r.status_code == 200, r.text
    runs = (await client.get(f"{BASE}/{mid}/runs")).json()
    assert [x["action"] for x in runs] == ["restart", "restart"]
    assert (await client.post(f"{BASE}/{mid}/restart?queue=maybe")).status_code == 400
    # waiting on a live run times out with 408; an unknown run is 404
    r = await client.get(f"{BASE}/{mid}/runs/{first}/wait", params={"timeout": 0.05})
    assert r.status_code == 408
    assert (await client.get(f"{BASE}/{mid}/runs/nope/wait")).status_code == 404
    client.orch.driver.stop_delay = 0.0
    assert (await client.delete(f"{BASE}/{mid}/runs/{first}")).status_code == 200
    r = await client.get(f"{BASE}/{mid}/runs/{first}/wait", params={"timeout": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run_id"] == first and body["status"] == "cancelled" and not body["ok"]
    assert body["error"]["kind"] == "cancelled"
    r = await client.get(f"{BASE}/{mid}/runs/{runs[1]['run_id']}/wait", params={"timeout": 10})
    assert r.status_code == 200 and r.json()["action"] == "restart" and r.json()["ok"]
    await wait(client, mid, "started")
