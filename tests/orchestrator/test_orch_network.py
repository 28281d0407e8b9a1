"""Machine networking across namespace hosts: three worker hosts (network namespaces on a private
bridge, each with its own corrosion agent, worker and proxy as real processes); machines in
namespaces of their own with private addresses from their host's subnet, published in the
replicated ``machines`` table and reached through another host's proxy. Plus the address book
(durable, round robin) and the config, which need no root."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from orch_helpers import require_netns, require_runc
from support import wait_for

from orchestrator import hosts as hostlab
from orchestrator import network
from orchestrator.config import ConfigError, OrchestratorConfig, build_network
from orchestrator.network import (
    AddressBook,
    NetworkError,
    link_names,
    netns_name,
    run_ip,
    veth_name,
)

pytestmark = pytest.mark.anyio

PORT = 8080  # every machine serves here: each in its own namespace
# a machine's server: answers with who it is and the address it was given
SERVER = (
    "import http.server, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = (os.environ['FLY_MACHINE_ID'] + ' ' + os.environ['FLY_PRIVATE_IP']).encode()\n"
    "        self.send_response(200)\n"
    "        self.send_header('content-length', str(len(body)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(body)\n"
    f"http.server.HTTPServer(('0.0.0.0', {PORT}), H).serve_forever()\n"
)
PROCESS_MACHINE = {
    "image": "busybox",
    "init": {"exec": [sys.executable, "-I", "-c", SERVER]},
    "services": [{"protocol": "tcp", "internal_port": PORT}],
    "stop_config": {"timeout": "5s"},
}
RUNC_MACHINE = {
    "image": "busybox",
    "init": {"exec": ["sh", "-c", "mkdir -p /tmp/www && echo \"$FLY_MACHINE_ID $FLY_PRIVATE_IP\" "
                      f"> /tmp/www/index.html && exec httpd -f -p {PORT} -h /tmp/www"]},
    "services": [{"protocol": "tcp", "internal_port": PORT}],
    "stop_config": {"timeout": "5s"},
}  # fmt: skip


@pytest.fixture
def anyio_backend():
    return "asyncio"


# --- no root needed -----------------------------------------------------------------------------


def test_address_book_is_durable_and_round_robin(tmp_path):
    import ipaddress

    subnet = ipaddress.IPv4Network("10.9.1.0/29")  # gateway .1, machines .2 to .6
    book = AddressBook(tmp_path / "network.json", subnet)
    assert [book.allocate(m) for m in ("a", "b", "c")] == ["10.9.1.2", "10.9.1.3", "10.9.1.4"]
    assert book.allocate("b") == "10.9.1.3"  # a machine keeps its address
    book.release("a")
    again = AddressBook(tmp_path / "network.json", subnet)  # a restarted worker
    assert again.machines == {"b": "10.9.1.3", "c": "10.9.1.4"}
    # the freed .2 is not handed out before the rest of the subnet
    assert [again.allocate(m) for m in ("d", "e", "f")] == ["10.9.1.5", "10.9.1.6", "10.9.1.2"]
    with pytest.raises(NetworkError, match="no free address"):
        again.allocate("g")
    assert AddressBook(tmp_path / "network.json", subnet).machines == again.machines


def test_network_config_is_validated_and_falls_back_with_one_line(tmp_path, caplog, monkeypatch):
    base = {"machines_path": str(tmp_path / "m")}
    for bad, text in [
        ({"machine_subnet": "10.0.0.1/24"}, "machine_subnet: invalid"),
        ({"machine_subnet": "10.0.0.0/30"}, "too small"),
        ({"machine_subnet": 5}, "machine_subnet"),
        ({"machine_subnet": "10.0.0.0/24", "machine_bridge": "a" * 16}, "machine_bridge"),
    ]:
        with pytest.raises(ConfigError, match=text):
            OrchestratorConfig.from_mapping({**base, **bad})
    cfg = OrchestratorConfig.from_mapping(
        {**base, "driver": "fake", "machine_subnet": "10.0.0.0/24"}
    )
    with caplog.at_level(logging.WARNING, logger="orchestrator.config"):
        assert build_network(cfg) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "machines share this host's network" in lines[0], lines
    assert build_network(OrchestratorConfig.from_mapping(base)) is None  # no subnet: no line
    assert len(caplog.records) == 1
    caplog.clear()
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)  # as a user, not root
    cfg = OrchestratorConfig.from_mapping({**base, "machine_subnet": "10.0.0.0/24"})
    with caplog.at_level(logging.WARNING, logger="orchestrator.config"):
        assert build_network(cfg) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "needs root" in lines[0], lines


# --- three namespace hosts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(namespace_hosts):
    return namespace_hosts


def host_of(lab: hostlab.HostLab, address: str) -> hostlab.Host:
    import ipaddress

    return next(
        h for h in lab.hosts if ipaddress.IPv4Address(address) in ipaddress.IPv4Network(
            h.machine_subnet)
    )  # fmt: skip


async def create(host: hostlab.Host, config: dict) -> dict:
    async with httpx.AsyncClient(base_url=host.api_url, timeout=60) as api:
        r = await api.post("/v1/apps/web/machines", json={"config": config})
        assert r.status_code == 200, r.text
        mid = r.json()["id"]
        r = await api.get(f"/v1/apps/web/machines/{mid}/wait",
                          params={"state": "started", "timeout": 60})  # fmt: skip
        assert r.status_code == 200, r.text
        return (await api.get(f"/v1/apps/web/machines/{mid}")).json()


async def destroy(host: hostlab.Host, mid: str) -> None:
    async with httpx.AsyncClient(base_url=host.api_url, timeout=60) as api:
        r = await api.delete(f"/v1/apps/web/machines/{mid}", params={"force": "true"})
        assert r.status_code == 200, r.text
        r = await api.get(f"/v1/apps/web/machines/{mid}/wait",
                          params={"state": "destroyed", "timeout": 60})  # fmt: skip
        assert r.status_code == 200, r.text


async def published(host: hostlab.Host, mid: str) -> dict | None:
    """The machine's row as ``host``'s replica has it."""
    sql = ["SELECT worker, state, address, private_ip FROM machines WHERE id = ?", [mid]]
    async with httpx.AsyncClient(base_url=host.api_url, timeout=30) as api:
        r = await api.post("/v1/queries", json=sql)
    rows = [json.loads(line) for line in r.text.splitlines()]
    found = [x["row"][1] for x in rows if "row" in x]
    return dict(zip(("worker", "state", "address", "private_ip"), found[0], strict=True)) if (
        found) else None  # fmt: skip


async def through_proxy(host: hostlab.Host, mid: str) -> httpx.Response | None:
    """A request through ``host``'s proxy, pinned to machine ``mid`` (None while it cannot)."""
    headers = {"host": f"web.{hostlab.DOMAIN}", "fly-force-instance-id": mid}
    async with httpx.AsyncClient(timeout=30) as client:
        try:
            r = await client.get(f"{host.proxy_url}/", headers=headers)
        except httpx.HTTPError:
            return None
    return r if r.status_code == 200 else None


def gone(host: hostlab.Host, address: str, mid: str) -> bool:
    """Whether the machine's namespace and its veth on the host are both gone."""
    return not Path("/run/netns", netns_name(address, mid)).exists() and veth_name(
        address
    ) not in link_names(host.netns)


async def test_machines_get_private_addresses_reached_from_another_host(lab):
    h1, h2, h3 = lab.hosts
    # two machines on h1 both listen on PORT, each in its own namespace
    a = await create(h1, PROCESS_MACHINE)
    b = await create(h1, PROCESS_MACHINE)
    assert a["private_ip"] != b["private_ip"]
    for m in (a, b):
        assert host_of(lab, m["private_ip"]) is h1, m["private_ip"]
        assert Path("/run/netns", netns_name(m["private_ip"], m["id"])).exists()
        # published on h1 and replicated to h3, with the address the proxy dials
        row = await wait_for(lambda m=m: published(h3, m["id"]), 60, "the row to replicate")
        assert row == {"worker": "h1", "state": "started", "address": m["private_ip"],
                       "private_ip": m["private_ip"]}  # fmt: skip
        # real HTTP from h2's namespace (its proxy) to the machine's address on h1
        r = await wait_for(lambda m=m: through_proxy(h2, m["id"]), 60, "h2's proxy to reach it")
        assert r.text == f"{m['id']} {m['private_ip']}"
        assert r.headers["fly-machine-id"] == m["id"] and r.headers["fly-worker"] == "h1"

    await destroy(h1, a["id"])
    await wait_for(lambda: gone(h1, a["private_ip"], a["id"]), 60, "a's netns and veth to go")
    book = json.loads((h1.state_path / "network.json").read_text())["machines"]
    assert a["id"] not in book and book[b["id"]] == b["private_ip"]
    r = await wait_for(lambda: through_proxy(h3, b["id"]), 60, "b to stay reachable")
    assert r.text == f"{b['id']} {b['private_ip']}"
    await destroy(h1, b["id"])
    await wait_for(lambda: gone(h1, b["private_ip"], b["id"]), 60, "b's netns and veth to go")


async def test_runc_machine_in_its_own_namespace(lab):
    require_runc()
    h1, h2, h3 = lab.hosts
    assert h2.driver == "runc"
    m = await create(h2, RUNC_MACHINE)
    assert host_of(lab, m["private_ip"]) is h2
    row = await wait_for(lambda: published(h1, m["id"]), 60, "the row to replicate")
    assert row["private_ip"] == m["private_ip"] and row["worker"] == "h2"
    r = await wait_for(lambda: through_proxy(h3, m["id"]), 60, "h3's proxy to reach it")
    assert r.text.strip() == f"{m['id']} {m['private_ip']}"
    await destroy(h2, m["id"])
    await wait_for(lambda: gone(h2, m["private_ip"], m["id"]), 60, "its netns and veth to go")


async def test_worker_restart_keeps_addresses_and_removes_debris(lab):
    h1, _, h3 = lab.hosts
    m = await create(h1, PROCESS_MACHINE)
    # SIGKILL: the worker dies, its machine keeps running
    await anyio.to_thread.run_sync(lab.stop_agent, h1)
    # while it is down: an address booked for a machine that no longer exists, with its
    # namespace, and a namespace of this subnet that nothing booked
    book_path = h1.state_path / "network.json"
    book = json.loads(book_path.read_text())
    ghost_ip, stray_ip = f"10.{lab.octet}.1.200", f"10.{lab.octet}.1.201"
    book["machines"]["ghost0000000000"] = ghost_ip
    book_path.write_text(json.dumps(book))
    debris = [netns_name(ghost_ip, "ghost0000000000"), netns_name(stray_ip, "stray0000000000")]
    for ns in debris:
        run_ip("netns", "add", ns)
    await anyio.to_thread.run_sync(lab.start_agent, h1)
    await wait_for(lambda: not any(Path("/run/netns", ns).exists() for ns in debris), 60,
                   "the restarted worker to remove the debris")  # fmt: skip
    await wait_for(lambda: "ghost0000000000" not in json.loads(book_path.read_text())["machines"])
    # the live machine kept its address and is still served; a new one gets another address
    assert json.loads(book_path.read_text())["machines"][m["id"]] == m["private_ip"]
    r = await wait_for(lambda: through_proxy(h3, m["id"]), 60, "it to stay reachable")
    assert r.text == f"{m['id']} {m['private_ip']}"
    n = await create(h1, PROCESS_MACHINE)
    assert n["private_ip"] not in (m["private_ip"], ghost_ip)
    for x in (m, n):
        await destroy(h1, x["id"])
        await wait_for(lambda x=x: gone(h1, x["private_ip"], x["id"]), 60, "netns to go")


def test_an_aborted_labs_leftovers_are_cleaned(tmp_path):
    """A process that made a lab is SIGKILLed: the next clean removes all of it."""
    require_netns()
    script = (
        "import sys, time\n"
        "from orchestrator.hosts import HostLab\n"
        "lab = HostLab(1)\n"
        "lab.up()\n"
        "print(lab.name, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip()
        assert name.startswith("clab"), name
    finally:
        proc.kill()
        proc.wait()
    record = next(r for r in hostlab.list_labs() if r["name"] == name)
    assert record["stale"]
    assert hostlab.lab_leftovers(record)  # its namespace, links and agent are still there
    assert name in hostlab.clean_stale()
    assert hostlab.lab_leftovers(record) == []
