"""The gateway across three namespace hosts (real agents, workers, proxies and gateways as
processes; the process driver): h1 in region ams, h2 and h3 in ord; gateways on h1 and h3."""

from __future__ import annotations

import sys

import httpx
import pytest
from orch_helpers import require_netns
from support import wait_for_sync as wait_for

from orchestrator.gateway import place
from orchestrator.hosts import DOMAIN, HostLab
from orchestrator.workers import WorkerInfo

PORT = 8080
SERVER = (
    "import http.server, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = os.environ['FLY_MACHINE_ID'].encode()\n"
    "        self.send_response(200)\n"
    "        self.send_header('content-length', str(len(body)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(body)\n"
    f"http.server.HTTPServer(('0.0.0.0', {PORT}), H).serve_forever()\n"
)
MACHINE = {
    "image": "busybox",
    "init": {"exec": [sys.executable, "-I", "-c", SERVER]},
    "services": [{"protocol": "tcp", "internal_port": PORT}],
    "stop_config": {"timeout": "5s"},
}


@pytest.fixture(scope="module")
def lab():
    require_netns()
    lab = HostLab(3, regions=["ams", "ord", "ord"])
    try:
        lab.up()
        lab.gateways = [lab.start_gateway(lab.hosts[0]), lab.start_gateway(lab.hosts[2])]
        yield lab
    finally:
        lab.down()
        assert lab.leftovers() == []


def all_live(gw: str) -> bool:
    try:
        workers = httpx.get(f"{gw}/v1/workers", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    return sorted(w["id"] for w in workers if w["live"]) == ["h1", "h2", "h3"]


def create(gw: str, region: str | None = None, metadata: dict | None = None) -> httpx.Response:
    body: dict = {"config": {**MACHINE, "metadata": metadata or {}}}
    if region:
        body["region"] = region
    return httpx.post(f"{gw}/v1/apps/web/machines", json=body, timeout=60)


def test_create_by_region_calls_reach_owner_and_list_across_workers(lab):
    gw1, gw3 = lab.gateways
    wait_for(lambda: all_live(gw1) and all_live(gw3), timeout=60, what="workers in the replicas")
    r = create(gw1, "ams", {"role": "api"})
    assert r.status_code == 200, r.text
    assert r.headers["fly-worker"] == "h1"
    ams = r.json()["id"]
    ord_ = {}
    for _ in range(2):  # two ord workers with equal capacity: one each
        r = create(gw1, "ord", {"role": "db"})
        assert r.status_code == 200, r.text
        ord_[r.headers["fly-worker"]] = r.json()["id"]
    assert sorted(ord_) == ["h2", "h3"]

    with httpx.Client(base_url=gw1, timeout=90) as api:
        for worker, mid in [("h1", ams), *ord_.items()]:
            r = api.get(f"/v1/apps/web/machines/{mid}/wait",
                              params={"state": "started", "timeout": 60})  # fmt: skip
            assert r.status_code == 200 and r.headers["fly-worker"] == worker, r.text
        # reachable through the proxy of another host
        for mid in [ams, *ord_.values()]:

            def served(mid=mid) -> bool:
                try:
                    r = httpx.get(lab.hosts[1].proxy_url, timeout=5, headers={
                        "host": f"web.{DOMAIN}", "fly-force-instance-id": mid})  # fmt: skip
                except httpx.HTTPError:
                    return False
                return r.status_code == 200 and r.text == mid

            wait_for(served, timeout=60, what=f"machine {mid} through h2's proxy")
        # per-machine calls go to the owner
        h3_mid = ord_["h3"]
        r = api.post(f"/v1/apps/web/machines/{h3_mid}/metadata/tier", json={"value": "x"})
        assert r.status_code == 204 and r.headers["fly-worker"] == "h3"
        r = api.post(f"/v1/apps/web/machines/{h3_mid}/stop")
        assert r.status_code == 200 and r.headers["fly-worker"] == "h3", r.text
        r = api.get(f"/v1/apps/web/machines/{h3_mid}/wait",
                          params={"state": "stopped", "timeout": 60})  # fmt: skip
        assert r.status_code == 200, r.text

        # list from the replica of h3's gateway, across the workers, with filters
        def listed(**params) -> list[str]:
            r = httpx.get(f"{gw3}/v1/apps/web/machines", params=params, timeout=10)
            assert r.status_code == 200, r.text
            return sorted(m["id"] for m in r.json())

        wait_for(lambda: listed(state="stopped") == [h3_mid], timeout=60, what="the stop")
        assert listed() == sorted([ams, *ord_.values()])
        assert listed(region="ord") == sorted(ord_.values())
        assert listed(**{"metadata.role": "db"}) == sorted(ord_.values())
        assert listed(**{"metadata.role": "db"}, state="started") == [ord_["h2"]]
        wait_for(lambda: listed(**{"metadata.tier": "x"}) == [h3_mid], timeout=60,
                 what="the metadata")  # fmt: skip


def test_get_through_another_gateway_waits_for_replication(lab):
    gw1, gw3 = lab.gateways
    for _ in range(3):
        r = create(gw1, "ams")  # on h1; gw3 reads h3's replica
        assert r.status_code == 200, r.text
        mid = r.json()["id"]
        r = httpx.get(f"{gw3}/v1/apps/web/machines/{mid}", timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["fly-worker"] == "h1" and r.json()["id"] == mid


def test_create_retries_another_worker_when_one_is_killed(lab):
    gw1, _ = lab.gateways
    workers = httpx.get(f"{gw1}/v1/workers", timeout=10).json()
    infos = [WorkerInfo(w["id"], w["region"], w["api_url"], w["capacity"]) for w in workers]
    used = {w["id"]: w["used"] for w in workers}
    first = place(infos, used, region="ord", now_ms=0, ttl=1e12)[0]  # gw1's first choice
    victim = next(h for h in lab.hosts if h.name == first.id)
    survivor = "h3" if victim.name == "h2" else "h2"
    lab.stop_agent(victim)  # SIGKILL: its heartbeat is still fresh in the replicas
    try:
        r = create(gw1, "ord")
        assert r.status_code == 200, r.text
        assert r.headers["fly-worker"] == survivor
    finally:
        lab.start_agent(victim)
