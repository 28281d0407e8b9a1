"""The platform as one user's journey across three namespace hosts, once with the process driver
and once with runc (every host of the lab runs the one driver).

A registry on the lab's bridge holds the test image (a static busybox). A gateway on h1 creates
a machine from it with a volume at ``/vol`` and an HTTP readiness check on ``/health``; busybox
httpd serves the volume, so the file ``health`` in the volume decides the check. The machine is
reached through the proxy of a host that does not own it; removing ``health`` with ``exec``
makes the check critical and that proxy answers 503 naming the machine and its check; writing it
back routes the machine again. A file written in the volume is still served after a stop and a
start, and after an update, through the gateway. Once every host holds a machine, the owner is
the gateway's first choice again; cordoning it through the gateway sends the next create to
another host. Destroy removes the volume, except one the config keeps; tearing the lab down
leaves no namespace, link, process, mount or record behind.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import httpx
import pytest
from orch_helpers import require_netns, require_runc
from registry_helpers import push_test_image, require_registry, run_registry
from support import wait_for_sync as wait_for

from orchestrator.gateway import place
from orchestrator.hosts import DOMAIN, Host, HostLab
from orchestrator.workers import WorkerInfo

APP = "web"
BASE = f"/v1/apps/{APP}/machines"
PORT = 8080
CHECK = f"servicecheck-00-http-{PORT}"  # the name the service's first check gets
SERVE = (
    "[ -e /vol/health ] || echo ok > /vol/health; "  # the first boot makes the volume healthy
    'echo "$FLY_INSTANCE_ID" >> /vol/boots; '
    f"exec httpd -f -p {PORT} -h /vol"
)
WAIT = 120  # generous: two cores shared with other test runs


def machine_config(image: str, volume: str, *, keep: bool = False) -> dict[str, Any]:
    return {
        "image": image,
        "init": {"exec": ["sh", "-c", SERVE]},
        "services": [{
            "protocol": "tcp", "internal_port": PORT,
            "checks": [{"type": "http", "path": "/health", "interval": "1s", "timeout": "5s"}],
        }],
        "mounts": [{"volume": volume, "path": "/vol", "keep_on_destroy": keep}],
        "stop_config": {"timeout": "5s"},
    }  # fmt: skip


def through_proxy(host: Host, path: str, machine_id: str | None = None) -> httpx.Response | None:
    """``GET path`` for the app through ``host``'s proxy (pinned to ``machine_id`` if given);
    None when the proxy cannot be reached at all."""
    headers = {"host": f"{APP}.{DOMAIN}"}
    if machine_id is not None:
        headers["fly-force-instance-id"] = machine_id
    try:
        return httpx.get(host.proxy_url + path, headers=headers, timeout=30)
    except httpx.HTTPError:
        return None


def serves(host: Host, path: str, machine_id: str, body: str) -> bool:
    r = through_proxy(host, path)
    return (
        r is not None
        and r.status_code == 200
        and r.headers.get("fly-machine-id") == machine_id
        and r.text == body
    )


def volume_dir(host: Host, volume: str) -> Path:
    """Where the host's worker keeps a volume of the app (``<machines_path>/_volumes``)."""
    return host.dir / "machines" / "_volumes" / APP / volume


@pytest.mark.parametrize("driver", ["process", "runc"])
def test_a_machine_from_a_registry_across_hosts_checks_volume_cordon_teardown(driver):
    require_netns()
    require_registry()
    if driver == "runc":
        require_runc()
    lab = HostLab(3, drivers=driver)
    try:
        lab.up()
        with run_registry(f"10.{lab.octet}.0.1") as registry:  # the lab bridge's address
            image = push_test_image(registry)
            gateway = lab.start_gateway(lab.hosts[0])
            with httpx.Client(base_url=gateway, timeout=WAIT) as api:
                journey(lab, api, image.reference, image.manifest_digest)
    finally:
        lab.down()
    assert lab.leftovers() == []


def journey(lab: HostLab, api: httpx.Client, image: str, digest: str) -> None:
    hosts = {h.name: h for h in lab.hosts}

    def workers() -> dict[str, dict]:
        try:
            return {w["id"]: w for w in api.get("/v1/workers", timeout=10).json()}
        except (httpx.HTTPError, ValueError):
            return {}

    def all_live() -> bool:
        return sorted(i for i, w in workers().items() if w["live"]) == sorted(hosts)

    wait_for(all_live, WAIT, "every worker live in h1's replica")

    def exec_(mid: str, script: str) -> str:
        r = api.post(f"{BASE}/{mid}/exec", json={"command": ["sh", "-c", script]})
        assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
        return r.json()["stdout"]

    def wait_state(mid: str, state: str) -> None:
        r = api.get(f"{BASE}/{mid}/wait", params={"state": state, "timeout": 60})
        assert r.status_code == 200, r.text

    def check(mid: str) -> dict:
        got = [c for c in api.get(f"{BASE}/{mid}").json()["checks"] if c["name"] == CHECK]
        return got[0] if got else {}

    # create from the registry through the gateway: a volume and a readiness check
    config = machine_config(image, "site")
    r = api.post(BASE, json={"config": config})
    assert r.status_code == 200, r.text
    mid, owner = r.json()["id"], hosts[r.headers["fly-worker"]]
    assert r.json()["image_ref"]["digest"] == digest
    wait_state(mid, "started")
    view = api.get(f"{BASE}/{mid}").json()
    first_boot = view["instance_id"]
    assert ipaddress.ip_address(view["private_ip"]) in ipaddress.ip_network(owner.machine_subnet)
    other = next(h for h in lab.hosts if h is not owner)

    # reached through another host's proxy, from the volume
    wait_for(lambda: serves(other, "/boots", mid, f"{first_boot}\n"), WAIT,
             f"{mid} on {owner.name} through {other.name}'s proxy")  # fmt: skip
    wait_for(lambda: check(mid).get("status") == "passing", WAIT, "the check to pass")
    assert sorted(p.name for p in volume_dir(owner, "site").iterdir()) == ["boots", "health"]

    # the check fails: the proxy stops routing to the machine and says why
    exec_(mid, "busybox rm /vol/health")
    wait_for(lambda: check(mid).get("status") == "critical", WAIT, "the check to fail")
    assert "404" in check(mid)["output"], check(mid)

    def held_back() -> bool:
        r = through_proxy(other, "/boots")
        return r is not None and r.status_code == 503

    wait_for(held_back, WAIT, "the proxy to stop routing to the failing machine")
    r = through_proxy(other, "/boots")
    assert r is not None and r.status_code == 503, r and r.text
    assert f"failing health checks: {mid} ({CHECK})" in r.json()["error"], r.text

    # ... and passes again: routed again
    exec_(mid, "echo ok > /vol/health")
    wait_for(lambda: serves(other, "/health", mid, "ok\n"), WAIT, "routing after the check passes")
    assert check(mid)["status"] == "passing"

    # the volume survives a stop and a start through the gateway
    exec_(mid, f"echo kept across restarts > /vol/note.txt; echo {mid} >> /vol/note.txt")
    for action, state in (("stop", "stopped"), ("start", "started")):
        r = api.post(f"{BASE}/{mid}/{action}")
        assert r.status_code == 200 and r.headers["fly-worker"] == owner.name, r.text
        wait_state(mid, state)
    note = f"kept across restarts\n{mid}\n"
    wait_for(lambda: serves(other, "/note.txt", mid, note), WAIT, "the volume after the restart")
    r = through_proxy(other, "/boots")
    assert r is not None and r.text.split() == [first_boot] * 2, r and r.text

    # ... and an update through the gateway (a new instance, the same volume)
    r = api.post(f"{BASE}/{mid}", json={"config": {**config, "env": {"RELEASE": "2"}}})
    assert r.status_code == 200 and r.headers["fly-worker"] == owner.name, r.text
    second = r.json()["instance_id"]
    assert second != first_boot
    r = api.get(f"{BASE}/{mid}/wait", params={"state": "started", "instance_id": second})
    assert r.status_code == 200, r.text
    boots = f"{first_boot}\n{first_boot}\n{second}\n"
    wait_for(lambda: serves(other, "/boots", mid, boots), WAIT, "the updated machine")
    assert serves(other, "/note.txt", mid, note)

    # two more machines spread to the other hosts: every host holds one, and the owner is the
    # gateway's first choice again (ties go by worker id) ...
    fillers = {}
    for _ in range(2):
        r = api.post(BASE, json={"config": {"image": image, "stop_config": {"timeout": "5s"}}})
        assert r.status_code == 200, r.text
        fillers[r.json()["id"]] = r.headers["fly-worker"]
    assert sorted(fillers.values()) == sorted(h.name for h in lab.hosts if h is not owner)
    wait_for(
        lambda: {w["used"] for w in workers().values()} == {1}, WAIT, "the counts in h1's replica"
    )
    infos = [WorkerInfo(w["id"], w["region"], w["api_url"], w["capacity"])
             for w in workers().values()]  # fmt: skip
    used = {w["id"]: w["used"] for w in workers().values()}
    assert place(infos, used, region=None, now_ms=0, ttl=1e12)[0].id == owner.name
    # ... until it is cordoned through the gateway: the next machine lands on another host
    r = api.post(f"/v1/workers/{owner.name}/cordon")
    assert r.status_code == 200 and r.json()["cordoned"] is True, r.text
    wait_for(lambda: workers().get(owner.name, {}).get("cordoned") is True, WAIT,
             f"{owner.name}'s cordon in h1's replica")  # fmt: skip
    r = api.post(BASE, json={"config": machine_config(image, "kept", keep=True)})
    assert r.status_code == 200, r.text
    mid2, owner2 = r.json()["id"], hosts[r.headers["fly-worker"]]
    assert owner2 is not owner
    wait_state(mid2, "started")

    def pinned_serves() -> bool:
        r = through_proxy(owner, "/health", mid2)  # the first owner's proxy: another host
        return r is not None and r.status_code == 200 and r.text == "ok\n"

    wait_for(pinned_serves, WAIT, f"{mid2} on {owner2.name} through {owner.name}'s proxy")
    # the machine on the cordoned host keeps serving
    r = through_proxy(owner2, "/note.txt", mid)
    assert r is not None and r.status_code == 200 and r.text == note, r and r.text

    # destroy through the gateway: the volume goes, unless the config keeps it
    assert volume_dir(owner, "site").is_dir() and volume_dir(owner2, "kept").is_dir()
    for m in (mid, mid2, *fillers):
        r = api.delete(f"{BASE}/{m}", params={"force": "true"})
        assert r.status_code == 200, r.text
    for m in (mid, mid2, *fillers):
        wait_for(lambda m=m: api.get(f"{BASE}/{m}").status_code == 404, WAIT, f"{m} destroyed")
    wait_for(lambda: not volume_dir(owner, "site").exists(), WAIT, "the volume to be removed")
    assert sorted(p.name for p in volume_dir(owner2, "kept").iterdir()) == ["boots", "health"]
    r = through_proxy(other, "/boots")
    assert r is not None and r.status_code == 503, r and r.text
