"""Machine networking: each machine in a network namespace of its own, with a private address
from this worker's subnet on a bridge of this host (flyd's "assign an address to this
interface" step), so two machines can bind the same port and other hosts reach a machine at the
address published in its row.

With ``machine_subnet = "10.213.1.0/24"`` and ``machine_bridge = "corro0"`` the worker keeps:

* the bridge ``corro0`` in its own network namespace, holding the subnet's first address (the
  machines' gateway), and IPv4 forwarding on in that namespace so traffic from other hosts
  (routed to the subnet through this host) reaches the machines;
* per machine, the namespace ``corro-10-213-1-2-<machine id>`` (a file in ``/run/netns``) and a
  veth pair: ``cm0ad50102`` (``cm`` + the address in hex) on the bridge, ``eth0`` in the
  machine's namespace with the address and a default route via the gateway, ``lo`` up.

Names carry the address, so they are unique on the machine as long as workers' subnets do not
overlap, and a worker recognises its own leftovers by their address alone.

Allocation is durable: ``network.json`` in the driver's state directory maps machine ids to
addresses and is fsynced before the namespace is created, so a restarted worker never hands a
live machine's address to another machine. A machine keeps its address for its whole life
(stop, start, update) and gives it back when destroyed. Addresses are handed out round robin
from a persisted cursor: a freed address is reused only after the rest of the subnet, so a stale
replica's row for a destroyed machine does not point at a new one.

Everything is done with iproute2's ``ip`` (root required); :func:`netns_unavailable` says why it
cannot be, and the caller then falls back to the host's network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio

from corrosion.files import write_json_durably

from .errors import OrchestratorError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "corro-"
VETH_PREFIX = "cm"
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_NETNS_RE = re.compile(r"^corro-(\d+)-(\d+)-(\d+)-(\d+)-([A-Za-z0-9_-]+)$")
_VETH_RE = re.compile(r"^cm([0-9a-f]{8})$")


class NetworkError(OrchestratorError):
    """An ``ip`` command failed, or the subnet has no free address."""


def netns_unavailable() -> str | None:
    """Why machines cannot get network namespaces here, or None when they can."""
    if os.geteuid() != 0:
        return "machine networking needs root"
    if shutil.which("ip") is None:
        return "machine networking needs iproute2's ip command (apt-get install iproute2)"
    return None


def run_ip(*args: str, netns: str | None = None, batch: str | None = None) -> str:
    """Run ``ip`` (in the named namespace with ``netns``, a batch of commands on stdin with
    ``batch``); its stdout, or NetworkError with ip's own message."""
    argv = ["ip", *(("-n", netns) if netns else ()), *(("-batch", "-") if batch else ()), *args]
    proc = subprocess.run(argv, input=batch, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def ip_quiet(*args: str, netns: str | None = None) -> bool:
    """``run_ip`` for cleanup: whether it succeeded (a missing link or namespace is fine)."""
    try:
        run_ip(*args, netns=netns)
    except NetworkError:
        return False
    return True


def netns_names() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def link_names(netns: str | None = None) -> list[str]:
    """Interface names in this namespace (or the named one)."""
    out = run_ip("-o", "link", "show", netns=netns)
    return [line.split(":", 2)[1].strip().split("@", 1)[0] for line in out.splitlines() if line]


def kill_netns_pids(name: str) -> list[int]:
    """SIGKILL every process in the named namespace (a machine's, or a test host's)."""
    try:
        pids = [int(p) for p in run_ip("netns", "pids", name).split()]
    except NetworkError:
        return []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def delete_netns(name: str) -> None:
    """Kill what runs in a namespace and delete it (absent is fine)."""
    if not (NETNS_DIR / name).exists():
        return
    kill_netns_pids(name)
    ip_quiet("netns", "del", name)


def netns_name(address: str, machine_id: str) -> str:
    return f"{NETNS_PREFIX}{address.replace('.', '-')}-{machine_id}"


def veth_name(address: str) -> str:
    """The machine's end on the bridge: ``cm`` + the address in hex (15 characters at most)."""
    return f"{VETH_PREFIX}{int(ipaddress.IPv4Address(address)):08x}"


def parse_netns_name(name: str) -> tuple[str, str] | None:
    """(address, machine id) of a machine namespace's name, or None for other namespaces."""
    match = _NETNS_RE.match(name)
    if match is None:
        return None
    try:
        address = str(ipaddress.IPv4Address(".".join(match.group(i) for i in range(1, 5))))
    except ValueError:
        return None
    return address, match.group(5)


def check_subnet(value: object) -> ipaddress.IPv4Network:
    """An IPv4 subnet with room for a gateway and machines, or ValueError saying why not."""
    if not isinstance(value, str):
        raise ValueError("expected an IPv4 subnet such as '10.213.1.0/24'")
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"invalid IPv4 subnet {value!r}: {e}") from None
    if net.prefixlen > 29:
        raise ValueError(f"subnet {value!r} is too small (at most /29)")
    return net


def check_ifname(value: object) -> str:
    if not isinstance(value, str) or not _IFNAME_RE.match(value):
        raise ValueError(f"invalid interface name {value!r} (1-15 letters, digits, '_.-')")
    return value


@dataclass(frozen=True)
class Attachment:
    """A machine's place on the network: its namespace (a path runc and the shim can join)."""

    machine_id: str
    address: str
    netns: str

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)


class AddressBook:
    """Machine id → address, durable (fsynced JSON, replaced atomically), with the round-robin
    cursor. Not thread-safe: :class:`MachineNetwork` serializes its callers."""

    def __init__(self, path: Path, subnet: ipaddress.IPv4Network) -> None:
        self.path = path
        self.subnet = subnet
        self.gateway = subnet.network_address + 1
        self.machines: dict[str, str] = {}
        self.cursor = 0
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except json.JSONDecodeError as e:
            raise NetworkError(f"{path}: unreadable address book ({e})") from None
        self.machines = {
            mid: addr
            for mid, addr in data.get("machines", {}).items()
            if ipaddress.IPv4Address(addr) in subnet  # a changed subnet forgets the old ones
        }
        self.cursor = int(data.get("cursor", 0))

    def _candidates(self) -> list[ipaddress.IPv4Address]:
        return [a for a in self.subnet.hosts() if a != self.gateway]

    def allocate(self, machine_id: str) -> str:
        if machine_id in self.machines:
            return self.machines[machine_id]
        taken = set(self.machines.values())
        candidates = self._candidates()
        for step in range(len(candidates)):
            index = (self.cursor + step) % len(candidates)
            address = str(candidates[index])
            if address not in taken:
                self.machines[machine_id] = address
                self.cursor = index + 1
                self._save()
                return address
        raise NetworkError(f"subnet {self.subnet} has no free address")

    def release(self, machine_id: str) -> None:
        if self.machines.pop(machine_id, None) is not None:
            self._save()

    def _save(self) -> None:
        write_json_durably(
            self.path,
            {"subnet": str(self.subnet), "cursor": self.cursor, "machines": self.machines},
        )


class MachineNetwork:
    """The machines' network on one worker (see the module docstring)."""

    def __init__(
        self, subnet: str | ipaddress.IPv4Network, state_path: str | Path, *, bridge: str = "corro0"
    ) -> None:
        self.subnet = subnet if isinstance(subnet, ipaddress.IPv4Network) else check_subnet(subnet)
        self.bridge = check_ifname(bridge)
        self.book = AddressBook(Path(state_path) / "network.json", self.subnet)
        self.gateway = str(self.book.gateway)
        self._lock = anyio.Lock()
        self._attached: dict[str, Attachment] = {}

    async def _sync(self, fn, *args):
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    def _setup(self) -> None:
        if self.bridge not in link_names():
            try:
                run_ip("link", "add", self.bridge, "type", "bridge")
            except NetworkError:
                if self.bridge not in link_names():  # another worker made it meanwhile: fine
                    raise
        run_ip("addr", "replace", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:  # this namespace's, not the host's
            f.write("1\n")

    async def setup(self) -> None:
        """The bridge with the gateway address, and forwarding on."""
        await self._sync(self._setup)
        log.info(
            "machine networking: subnet %s on bridge %s (gateway %s)",
            self.subnet, self.bridge, self.gateway,
        )  # fmt: skip

    def address(self, machine_id: str) -> str | None:
        return self.book.machines.get(machine_id)

    def _attach(self, machine_id: str, address: str) -> Attachment:
        ns, veth = netns_name(address, machine_id), veth_name(address)
        fresh = not (NETNS_DIR / ns).exists()
        if fresh:  # the usual case, in one ``ip`` run: namespace, veth pair, onto the bridge
            try:
                run_ip(batch=(
                    f"netns add {ns}\n"
                    f"link add {veth} type veth peer name eth0 netns {ns}\n"
                    f"link set {veth} master {self.bridge} up\n"
                ))  # fmt: skip
            except NetworkError:  # debris of an earlier attempt in the way: the careful way
                fresh = False
        if not fresh:
            if not (NETNS_DIR / ns).exists():
                run_ip("netns", "add", ns)
            links = link_names()
            if veth in links and "eth0" not in link_names(ns):  # its peer went with an old netns
                ip_quiet("link", "del", veth)
                links.remove(veth)
            if veth not in links:
                run_ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run_ip("link", "set", veth, "master", self.bridge, "up")
        prefix = self.subnet.prefixlen
        run_ip(netns=ns, batch=(
            "link set lo up\n"
            f"addr replace {address}/{prefix} dev eth0\n"
            "link set eth0 up\n"
            f"route replace default via {self.gateway} dev eth0\n"
        ))  # fmt: skip
        return Attachment(machine_id, address, ns)

    def _made(self, machine_id: str) -> Attachment | None:
        """The attachment made since the last call, if its namespace is still there (taken
        once: a later attach, such as a restart's, checks the links again)."""
        done = self._attached.pop(machine_id, None)
        return done if done is not None and os.path.exists(done.netns_path) else None

    async def attach(self, machine_id: str) -> Attachment:
        """The machine's namespace and address, made now if missing (idempotent: an FSM step
        calls it again after a crash). The address is on disk before the namespace exists.
        The next call after one that made it returns at once while its namespace exists (so
        an early attach, see the service's create, costs ``create_instance`` nothing)."""
        async with self._lock:
            done = self._made(machine_id)
            if done is not None:
                return done
            address = await self._sync(self.book.allocate, machine_id)
            done = await self._sync(self._attach, machine_id, address)
            self._attached[machine_id] = done
            return done

    def _detach(self, machine_id: str, address: str) -> None:
        delete_netns(netns_name(address, machine_id))  # its eth0 goes, and the pair with it
        veth = veth_name(address)
        if veth in link_names():
            ip_quiet("link", "del", veth)

    async def release(self, machine_id: str) -> None:
        """Remove the machine's namespace and veth, then free its address (absent is fine)."""
        async with self._lock:
            self._attached.pop(machine_id, None)
            address = self.book.machines.get(machine_id)
            if address is None:
                return
            await self._sync(self._detach, machine_id, address)
            await self._sync(self.book.release, machine_id)

    def _sweep(self) -> list[str]:
        """Namespaces and veths with an address of this subnet that no allocation explains."""
        removed = []
        owned = {(a, mid) for mid, a in self.book.machines.items()}
        for name in netns_names():
            parsed = parse_netns_name(name)
            if parsed is None or ipaddress.IPv4Address(parsed[0]) not in self.subnet:
                continue
            if parsed not in owned:
                delete_netns(name)
                removed.append(name)
        allocated = {veth_name(a) for a in self.book.machines.values()}
        for link in link_names():
            match = _VETH_RE.match(link)
            if match is None or link in allocated:
                continue
            if ipaddress.IPv4Address(int(match.group(1), 16)) in self.subnet:
                ip_quiet("link", "del", link)
                removed.append(link)
        return removed

    async def reconcile(self, live_ids: Iterable[str]) -> list[str]:
        """After a restart: release the machines that no longer exist and remove debris.
        Returns the machine ids released."""
        live = set(live_ids)
        gone = sorted(mid for mid in self.book.machines if mid not in live)
        for mid in gone:
            await self.release(mid)
        async with self._lock:
            removed = await self._sync(self._sweep)
        if gone or removed:
            log.info("machine networking: released %s; removed %s", gone, removed)
        return gone
