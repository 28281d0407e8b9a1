"""Worker hosts as network namespaces on one machine: a lab of N hosts for tests and for
``python -m orchestrator hosts up``.

A lab named ``clab<5 hex>`` owns the private network ``10.<octet>.0.0/16`` (an octet from 200 to
254 that no other lab and no route or address of this machine uses):

* a bridge ``<lab>-br`` in the root namespace with ``10.<octet>.0.1/24``, and in the root
  namespace a route to each host's machine subnet via that host (so this machine reaches
  every machine too);
* per host ``h<i>``: the namespace ``<lab>-h<i>``, a veth pair ``<lab>-h<i>`` (on the bridge) ↔
  ``eth0`` (in the host) with ``10.<octet>.0.<i+1>/24``, and routes to the other hosts' machine
  subnets ``10.<octet>.<j>.0/24`` via their addresses;
* in each host, as processes: a corrosion agent with an ``[orchestrator]`` section (the worker
  ``h<i>``, its machines on ``10.<octet>.<i>.0/24`` behind the host's bridge ``corro0``), API
  on ``:4001``, gossip on ``:4002`` (all joined through h1), and a proxy (``python -m
  orchestrator proxy``) on ``:8080`` over the host's own replica, for ``<app>.internal``.

Traffic stays inside these namespaces, the bridge and loopback: no default route, no NAT.

Every lab is recorded in ``/run/corrosion-hosts/<lab>.json`` *before* anything is created, with
its owner process (a test run) or none (``hosts up``: it lasts until ``hosts down``). Tearing down
stops the processes, deletes the runc containers, kills whatever remains in the lab's namespaces
(the hosts' and the machines' ``corro-10-<octet>-…``), deletes them, the bridge and the veths, and
then the record. A lab whose owner died is torn down by the next lab's creation (or ``hosts
clean``), so an aborted test run leaves nothing behind for long.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .drivers.oci import mounts_under, release_roots_under
from .errors import OrchestratorError
from .network import (
    delete_netns,
    ip_quiet,
    kill_netns_pids,
    link_names,
    netns_names,
    netns_unavailable,
    parse_netns_name,
    run_ip,
)

REGISTRY = Path("/run/corrosion-hosts")
LAB_RE = re.compile(r"^clab[0-9a-f]{5}$")
OCTETS = range(200, 255)
API_PORT, GOSSIP_PORT, PROXY_PORT, GATEWAY_PORT = 4001, 4002, 8080, 4280
DOMAIN = "internal"
MACHINE_BRIDGE = "corro0"
DRIVERS = ("process", "runc")


class LabError(OrchestratorError):
    """The lab could not be set up (the message says which step and why)."""


def hosts_unavailable() -> str | None:
    """Why namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "namespace hosts need root"
    if netns_unavailable() is not None:
        return "namespace hosts need iproute2's ip command (apt-get install iproute2)"
    if shutil.which("nsenter") is None:
        return "namespace hosts need util-linux's nsenter"
    return None


def _starttime(pid: int) -> int | None:
    """When the process started (clock ticks after boot), or None when it is gone (or a zombie:
    it has exited, only its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(proc: dict[str, int] | None) -> bool:
    """Whether the recorded process still runs (and is the same one: pids are reused)."""
    if not proc:
        return False
    started = _starttime(proc["pid"])
    return started is not None and started == proc.get("starttime")


def _me() -> dict[str, int]:
    return {"pid": os.getpid(), "starttime": _starttime(os.getpid()) or 0}


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    fd = os.open(REGISTRY / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_record(record: dict[str, Any]) -> None:
    path = REGISTRY / f"{record['name']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def list_labs() -> list[dict[str, Any]]:
    """The recorded labs, each with ``stale`` (its owner died)."""
    labs = []
    for path in sorted(REGISTRY.glob("clab*.json")) if REGISTRY.exists() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        record["stale"] = record.get("owner") is not None and not _alive(record["owner"])
        labs.append(record)
    return labs


@dataclass
class Host:
    """One namespace host of a lab."""

    index: int
    lab: str
    octet: int
    base: Path
    driver: str = "process"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.lab}-{self.name}"

    @property
    def veth(self) -> str:
        """The host's link on the lab bridge, in the root namespace."""
        return f"{self.lab}-{self.name}"

    @property
    def address(self) -> str:
        return f"10.{self.octet}.0.{self.index + 1}"

    @property
    def machine_subnet(self) -> str:
        return f"10.{self.octet}.{self.index}.0/24"

    @property
    def api_url(self) -> str:
        return f"http://{self.address}:{API_PORT}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.address}:{PROXY_PORT}"

    @property
    def gossip_addr(self) -> str:
        return f"{self.address}:{GOSSIP_PORT}"

    @property
    def dir(self) -> Path:
        return self.base / self.name

    @property
    def state_path(self) -> Path:
        return self.dir / "instances"

    @property
    def db_path(self) -> Path:
        return self.dir / "state.db"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.toml"


def _toml(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers and arrays are valid TOML values


class HostLab:
    """N namespace hosts, each with an agent, a worker and a proxy (see the module docstring).

    ``with HostLab(3) as lab:`` sets it all up and waits until every agent sees the others and
    every proxy listens; leaving tears it down. ``owned=False`` (``hosts up``) records no owner,
    so the lab outlives this process until ``teardown`` by name."""

    def __init__(
        self,
        hosts: int = 3,
        *,
        drivers: str | Sequence[str] = "process",
        base_dir: str | Path | None = None,
        owned: bool = True,
        python: str | None = None,
        regions: Sequence[str] | None = None,
    ) -> None:
        if not 1 <= hosts <= 9:
            raise ValueError("a lab has 1 to 9 hosts")
        drivers = [drivers] * hosts if isinstance(drivers, str) else list(drivers)
        if len(drivers) != hosts or any(d not in DRIVERS for d in drivers):
            raise ValueError(f"drivers: one of {', '.join(DRIVERS)} per host")
        self.regions = list(regions) if regions is not None else ["local"] * hosts
        if len(self.regions) != hosts:
            raise ValueError("regions: one per host")
        self.size = hosts
        self.drivers = drivers
        self.owned = owned
        self.python = python or sys.executable
        self.name = "clab" + secrets.token_hex(3)[:5]
        self.temporary = base_dir is None
        self._base_dir = None if base_dir is None else Path(base_dir).resolve()
        self.octet = 0
        self.hosts: list[Host] = []
        self.gossip_key = ""

    @property
    def bridge(self) -> str:
        return f"{self.name}-br"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{self.octet}.0.0/16")

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "octet": self.octet,
            "base": str(self.base),
            "temporary": self.temporary,
            "owner": _me() if self.owned else None,
            "bridge": self.bridge,
            "hosts": [
                {
                    "name": h.name,
                    "netns": h.netns,
                    "veth": h.veth,
                    "address": h.address,
                    "machine_subnet": h.machine_subnet,
                    "driver": h.driver,
                    "api": h.api_url,
                    "proxy": h.proxy_url,
                    "state_path": str(h.state_path),
                    "config": str(h.config_path),
                    "procs": {
                        k: {"pid": p.pid, "starttime": _starttime(p.pid) or 0}
                        for k, p in h.procs.items()
                    },
                }
                for h in self.hosts
            ],
        }

    # --- setting up ---------------------------------------------------------------------------

    def __enter__(self) -> HostLab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, timeout: float = 120.0) -> None:
        """Namespaces, bridge, routes, then the processes; torn down again if any step fails."""
        why = hosts_unavailable()
        if why is not None:
            raise LabError(why)
        clean_stale()
        with _registry_lock():
            self.octet = self._free_octet()
            self.base = self._base_dir or Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            self.hosts = [
                Host(i, self.name, self.octet, self.base, d)
                for i, d in enumerate(self.drivers, start=1)
            ]
            _write_record(self.record())  # before anything exists: a crash leaves a record
        try:
            self._make_network()
            self._start_agents()
            self._wait(self._agents_joined, timeout, "the agents to see each other")
            self._start_proxies()
            self._wait(self._proxies_listen, timeout, "the proxies to listen")
        except BaseException:
            self.down()
            raise

    def _free_octet(self) -> int:
        taken = {lab.get("octet") for lab in list_labs()}
        used = []
        for line in run_ip("-4", "-o", "addr", "show").splitlines():
            parts = line.split()
            if "inet" in parts:
                used.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
        for line in run_ip("-4", "route", "show", "table", "all").splitlines():
            dest = line.split()[0] if line else ""
            with contextlib.suppress(ValueError):
                if dest not in ("default", "local", "broadcast", "unreachable"):
                    used.append(ipaddress.IPv4Network(dest, strict=False))
        for octet in OCTETS:
            net = ipaddress.IPv4Network(f"10.{octet}.0.0/16")
            if octet not in taken and not any(net.overlaps(u) for u in used):
                return octet
        raise LabError("no free 10.<200-254>.0.0/16 network for a lab")

    def _make_network(self) -> None:
        run_ip("link", "add", self.bridge, "type", "bridge")
        run_ip("addr", "add", f"10.{self.octet}.0.1/24", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            run_ip("netns", "add", host.netns)
            run_ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
                   "netns", host.netns)  # fmt: skip
            run_ip("link", "set", host.veth, "master", self.bridge, "up")
            routes = "".join(
                f"route add {other.machine_subnet} via {other.address}\n"
                for other in self.hosts
                if other is not host
            )
            run_ip(netns=host.netns, batch=(
                "link set lo up\n"
                f"addr add {host.address}/24 dev eth0\n"
                "link set eth0 up\n" + routes
            ))  # fmt: skip
            run_ip("route", "add", host.machine_subnet, "via", host.address)

    def _agent_config(self, host: Host, seeds: list[str]) -> str:
        orch = {
            "machines_path": str(host.dir / "machines"),
            "archive_path": str(host.dir / "archive"),
            "state_path": str(host.state_path),
            "images_path": str(self.base / "images"),
            "driver": host.driver,
            "worker": host.name,
            "region": self.regions[host.index - 1],
            "machine_subnet": host.machine_subnet,
            "machine_bridge": MACHINE_BRIDGE,
        }
        lines = [
            f"# host {host.name} of the namespace lab {self.name} (python -m orchestrator hosts)",
            "[db]",
            f"path = {_toml(str(host.db_path))}",
            "",
            "[api]",
            f"addr = {_toml(f'{host.address}:{API_PORT}')}",
            "",
            "[gossip]",
            f"addr = {_toml(host.gossip_addr)}",
            f"bootstrap = {_toml(seeds)}",
            'preset = "local"',
            f"encryption_keys = {_toml([self.gossip_key])}",
            "",
            "[perf]",
            "min_sync_backoff = 0.2",
            "max_sync_backoff = 1.0",
            "",
            "[orchestrator]",
            *(f"{k} = {_toml(v)}" for k, v in orch.items()),
        ]
        return "\n".join(lines) + "\n"

    def _spawn(self, host: Host, what: str, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(host.dir / f"{what}.log", "ab") as out:
            host.procs[what] = subprocess.Popen(
                # nsenter joins only the network namespace; `ip netns exec` would also remount
                # /sys, hiding the cgroup mounts under it that runc needs
                ["nsenter", f"--net=/run/netns/{host.netns}", "--", self.python, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal of `hosts up` leaves it be
            )

    def _save(self) -> None:
        with _registry_lock():
            _write_record(self.record())

    def _start_agents(self) -> None:
        from corrosion.config import generate_key

        self.gossip_key = generate_key()
        seeds = [self.hosts[0].gossip_addr]
        for host in self.hosts:
            host.dir.mkdir(parents=True, exist_ok=True)
            host.config_path.touch(mode=0o600)  # it holds the lab's gossip key
            host.config_path.write_text(self._agent_config(host, [] if host.index == 1 else seeds))
            self._spawn(host, "agent", ["-m", "corrosion", "-c", str(host.config_path), "agent"])
        self._save()

    def _start_proxies(self) -> None:
        for host in self.hosts:
            self._spawn(host, "proxy", [
                "-m", "orchestrator", "proxy", "--replica", str(host.db_path),
                "--listen", f"{host.address}:{PROXY_PORT}", "--domain", DOMAIN,
            ])  # fmt: skip
        self._save()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for host in self.hosts:
                for name, proc in host.procs.items():
                    if proc.poll() is not None:
                        log = (host.dir / f"{name}.log").read_text(errors="replace")[-2000:]
                        raise LabError(f"{host.name}'s {name} exited ({proc.returncode}):\n{log}")
            if time.monotonic() > deadline:
                raise LabError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.1)

    def _agents_joined(self) -> bool:
        import httpx

        for host in self.hosts:
            try:
                r = httpx.get(f"{host.api_url}/v1/health", timeout=2)
                members = r.json()["response"]["members"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            if members < self.size - 1:
                return False
        return True

    def _proxies_listen(self) -> bool:
        import socket

        for host in self.hosts:
            try:
                socket.create_connection((host.address, PROXY_PORT), timeout=2).close()
            except OSError:
                return False
        return True

    def start_gateway(self, host: Host, timeout: float = 60.0) -> str:
        """Start a gateway (``python -m orchestrator gateway``) on ``host`` over its replica;
        its URL once it listens."""
        import socket

        self._spawn(host, "gateway", [
            "-m", "orchestrator", "gateway", "--replica", str(host.db_path),
            "--listen", f"{host.address}:{GATEWAY_PORT}",
        ])  # fmt: skip
        self._save()

        def listens() -> bool:
            try:
                socket.create_connection((host.address, GATEWAY_PORT), timeout=2).close()
            except OSError:
                return False
            return True

        self._wait(listens, timeout, f"{host.name}'s gateway to listen")
        return f"http://{host.address}:{GATEWAY_PORT}"

    def stop_agent(self, host: Host, *, kill: bool = True) -> None:
        """Stop a host's agent (and so its worker; its machines keep running), SIGKILL by
        default, as a crash would."""
        proc = host.procs.pop("agent")
        (proc.kill if kill else proc.terminate)()
        proc.wait(60)
        self._save()

    def start_agent(self, host: Host, timeout: float = 120.0) -> None:
        """Start a stopped host's agent again with the same config; wait until it has joined."""
        self._spawn(host, "agent", ["-m", "corrosion", "-c", str(host.config_path), "agent"])
        self._save()
        self._wait(self._agents_joined, timeout, f"{host.name}'s agent to rejoin")

    # --- tearing down -------------------------------------------------------------------------

    def down(self) -> None:
        """Stop everything and remove every namespace, link, route and file of the lab."""
        if not self.octet:
            return
        record = self.record()
        teardown(record)
        for host in self.hosts:
            for proc in host.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)  # reaped: no zombie left behind
            host.procs.clear()

    def leftovers(self) -> list[str]:
        """What of this lab still exists (empty after ``down``): namespaces, links, processes."""
        return lab_leftovers(self.record())


def _stop(procs: list[dict[str, int]], timeout: float = 20.0) -> None:
    """SIGTERM (agents leave the cluster, workers close), then SIGKILL after ``timeout``."""
    live = [p for p in procs if _alive(p)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in live:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p["pid"], signal.SIGKILL)


def _delete_runc_containers(state_path: Path) -> None:
    """``runc delete --force`` every container of a host (its cgroups go with it)."""
    root = state_path / "_runc"
    runc = shutil.which("runc")
    if runc is None or not root.exists():
        return
    listed = subprocess.run(
        [runc, "--root", str(root), "list", "-q"], capture_output=True, text=True, check=False
    )
    for cid in listed.stdout.split():
        subprocess.run([runc, "--root", str(root), "delete", "--force", cid],
                       capture_output=True, check=False)  # fmt: skip


def _machine_namespaces(octet: int) -> list[str]:
    net = ipaddress.IPv4Network(f"10.{octet}.0.0/16")
    out = []
    for name in netns_names():
        parsed = parse_netns_name(name)
        if parsed is not None and ipaddress.IPv4Address(parsed[0]) in net:
            out.append(name)
    return out


def teardown(record: dict[str, Any]) -> None:
    """Remove a lab from its record: processes, containers, namespaces, links, files, record."""
    name, octet = record["name"], int(record["octet"])
    hosts = record.get("hosts", [])
    _stop([p for h in hosts for p in h.get("procs", {}).values()])
    for h in hosts:
        _delete_runc_containers(Path(h["state_path"]))
        release_roots_under(h["state_path"])  # machines' overlay roots (registry images)
    machine_ns = _machine_namespaces(octet)
    lab_ns = [n for n in netns_names() if n.startswith(f"{name}-")]
    for ns in machine_ns + lab_ns:  # the machines' processes, the hosts' strays (shims)
        kill_netns_pids(ns)
    for ns in machine_ns + lab_ns:
        delete_netns(ns)
    for link in link_names():
        if link.startswith(f"{name}-"):
            ip_quiet("link", "del", link)
    if record.get("temporary") and record.get("base"):
        shutil.rmtree(record["base"], ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY / f"{name}.json").unlink()


def lab_leftovers(record: dict[str, Any]) -> list[str]:
    name, octet = record["name"], int(record["octet"])
    left = [f"netns {n}" for n in netns_names() if n.startswith(f"{name}-")]
    left += [f"netns {n}" for n in _machine_namespaces(octet)]
    left += [f"link {n}" for n in link_names() if n.startswith(f"{name}-")]
    for h in record.get("hosts", []):
        left += [f"process {k} of {h['name']}" for k, p in h.get("procs", {}).items() if _alive(p)]
        left += [f"mount {m}" for m in mounts_under(h["state_path"])]
    if (REGISTRY / f"{name}.json").exists():
        left.append(f"record {name}")
    return left


def teardown_named(names: Sequence[str]) -> list[str]:
    """``hosts down``: tear down the named labs (all of them when ``names`` is empty); the names
    torn down. Unknown names raise LabError and nothing is removed."""
    with _registry_lock():
        labs = {lab["name"]: lab for lab in list_labs()}
    unknown = sorted(set(names) - set(labs))
    if unknown:
        raise LabError(f"no lab named {', '.join(unknown)} (python -m orchestrator hosts list)")
    chosen = list(names) or sorted(labs)
    for lab in chosen:
        teardown(labs[lab])
    return chosen


def clean_stale() -> list[str]:
    """Tear down the labs whose owner died, and lab namespaces and links that no record
    explains (a crash before the record was written cannot leave any: it is written first)."""
    with _registry_lock():
        labs = list_labs()
        known = {lab["name"] for lab in labs}
    removed = []
    for lab in labs:
        if lab["stale"]:
            teardown(lab)
            removed.append(lab["name"])
    for ns in netns_names():
        owner = ns.split("-", 1)[0]
        if LAB_RE.match(owner) and owner not in known:
            delete_netns(ns)
            removed.append(ns)
    for link in link_names():
        owner = link.split("-", 1)[0]
        if LAB_RE.match(owner) and owner not in known:
            ip_quiet("link", "del", link)
            removed.append(link)
    return removed


def describe(lab: HostLab) -> list[str]:
    """The host table and commands to try, for ``hosts up``."""
    rows = [("host", "netns", "address", "machines", "driver", "Machines API", "proxy", "gateway")]
    for h in lab.hosts:
        gateway = f"http://{h.address}:{GATEWAY_PORT}" if "gateway" in h.procs else "-"
        rows.append((h.name, h.netns, h.address, h.machine_subnet, h.driver, h.api_url,
                     h.proxy_url, gateway))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
           for r in rows]  # fmt: skip
    first, last = lab.hosts[0], lab.hosts[-1]
    body = json.dumps({"config": {
        "image": "busybox",
        "init": {"exec": ["python3", "-m", "http.server", "8080"]},
        "services": [{"protocol": "tcp", "internal_port": 8080}],
    }})  # fmt: skip
    out += [
        "",
        f"Lab {lab.name}: data in {lab.base}",
        f"  # a machine on {first.name}, serving HTTP on its own address",
        f"  curl -s -X POST {first.api_url}/v1/apps/web/machines -d '{body}'",
        f"  # or let the gateway on {first.name} place it (any region, most free capacity)",
        f"  curl -s -X POST http://{first.address}:{GATEWAY_PORT}/v1/apps/web/machines -d '{body}'",
        f"  # reach it through {last.name}'s proxy",
        f"  curl -s -H 'Host: web.{DOMAIN}' {last.proxy_url}/",
        f"  # a shell on {first.name}",
        f"  nsenter --net=/run/netns/{first.netns} sh",
        f"  # stop it all: python -m orchestrator hosts down {lab.name}",
    ]
    return out
