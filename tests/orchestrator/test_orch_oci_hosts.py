"""Machines from a registry image across the three namespace hosts: the registry listens on the
lab's bridge (reachable from every host), a gateway on h1 places the machines (h2 runs runc
where it can, h1 and h3 the process driver), and each machine is reached through the proxy of
another host. The hosts share one image cache, so each blob is fetched once. Teardown checks that
no mount, namespace or process is left."""

from __future__ import annotations

import httpx
import pytest
from orch_helpers import require_netns
from registry_helpers import push_test_image, require_registry, run_registry
from support import wait_for_sync as wait_for

from orchestrator.drivers import runc_available
from orchestrator.hosts import DOMAIN, HostLab

PORT = 8080
SERVE = (
    'mkdir -p /www && echo -n "$FLY_MACHINE_ID" > /www/index.html && '
    f"exec httpd -f -p {PORT} -h /www"
)
BASE = "/v1/apps/web/machines"


@pytest.fixture(scope="module")
def lab():
    require_netns()
    require_registry()
    drivers = ["process", "runc" if runc_available() is None else "process", "process"]
    lab = HostLab(3, drivers=drivers)
    try:
        lab.up()
        with run_registry(f"10.{lab.octet}.0.1") as registry:  # the lab bridge's address
            lab.registry = registry
            lab.image = push_test_image(registry)
            lab.gateway = lab.start_gateway(lab.hosts[0])
            yield lab
    finally:
        lab.down()
        assert lab.leftovers() == []


def test_create_from_the_registry_through_the_gateway_and_reach_through_another_proxy(lab):
    config = {
        "image": lab.image.reference,
        "init": {"exec": ["sh", "-c", SERVE]},
        "services": [{"protocol": "tcp", "internal_port": PORT}],
        "stop_config": {"timeout": "5s"},
    }
    owners: dict[str, str] = {}
    with httpx.Client(base_url=lab.gateway, timeout=120) as api:

        def all_live() -> bool:
            try:
                workers = api.get("/v1/workers", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            return sorted(w["id"] for w in workers if w["live"]) == ["h1", "h2", "h3"]

        wait_for(all_live, timeout=60, what="the workers in h1's replica")
        # equal capacity: the freest host takes each create, so three creates put one machine
        # on each host, unless a host answers late under load and the gateway places that
        # create on the next one (as it should): then a few more creates fill the host left
        for _ in range(6):
            if sorted(set(owners.values())) == ["h1", "h2", "h3"]:
                break
            r = api.post(BASE, json={"config": config})
            assert r.status_code == 200, r.text
            assert r.json()["image_ref"]["digest"] == lab.image.manifest_digest
            owners[r.json()["id"]] = r.headers["fly-worker"]
        assert sorted(set(owners.values())) == ["h1", "h2", "h3"], owners
        # the lab's hosts share one image cache (images_path): each blob was fetched once
        for digest in lab.image.layer_digests:
            assert lab.registry.requests(f"/blobs/{digest}") == 1, digest
        for mid in owners:
            r = api.get(f"{BASE}/{mid}/wait", params={"state": "started", "timeout": 60})
            assert r.status_code == 200, r.text
        for mid, owner in owners.items():
            other = next(h for h in lab.hosts if h.name != owner)

            def served(mid=mid, other=other) -> bool:
                try:
                    r = httpx.get(other.proxy_url, timeout=5, headers={
                        "host": f"web.{DOMAIN}", "fly-force-instance-id": mid})  # fmt: skip
                except httpx.HTTPError:
                    return False
                return r.status_code == 200 and r.text == mid

            wait_for(served, timeout=60, what=f"machine {mid} on {owner} via {other.name}")
        # a bad reference fails through the gateway too, naming the image
        missing = lab.image.reference.rsplit(":", 1)[0] + ":missing"
        r = api.post(BASE, json={"config": {**config, "image": missing}})
        assert r.status_code == 400 and missing in r.text and "not found" in r.text, r.text
        for mid in owners:
            r = api.delete(f"{BASE}/{mid}", params={"force": "true"})
            assert r.status_code == 200, r.text
        for mid in owners:
            wait_for(lambda mid=mid: api.get(f"{BASE}/{mid}").status_code == 404, timeout=60,
                     what=f"machine {mid} to be destroyed")  # fmt: skip
