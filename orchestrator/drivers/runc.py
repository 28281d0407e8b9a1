"""RuncDriver: machines as real OCI containers, run by runc from bundles we write.

A bundle is ``<state>/<instance>/bundle/config.json`` whose root is a local image's shared
read-only rootfs (``images``), or, for an image from a registry (:mod:`.oci`), the instance's own
writable root over the cached image (an overlay, or a copy). ``create`` writes it and starts
the shim, which runs ``runc create`` and stays as the container's reaper (so exit codes survive
an orchestrator restart); ``start`` is ``runc start``; stop signals the container's init,
escalating to SIGKILL after the timeout; ``destroy`` is ``runc delete --force``. The OOM flag
comes from the container's memory cgroup (``memory.oom_control``'s ``oom_kill`` count).

The init: PID 1 of a pid namespace ignores the signals it has no handler for (only SIGKILL from
outside gets through), so a command run as PID 1 (``sleep``, most servers) would ignore the stop
signal and always wait out the timeout. The command therefore runs under a static ``tini``
(Debian's ``tini`` package ships ``/usr/bin/tini-static``), bind-mounted read-only at
:data:`INIT_PATH` on the container's ``/run`` tmpfs so no image needs it: tini is PID 1, forwards
signals to the command and reaps zombies; ``start`` returns once tini runs the command, so a stop
right after it is not lost. tini exits with the command's code, or 128+N when the command died
of signal N, and that is the exit recorded. Without tini the command is PID 1 (one warning when
the driver starts).

Networking: an instance whose spec names a network namespace (``spec.netns``, prepared by the
orchestrator with the machine's private ``spec.address``) joins it through the OCI config's
``network`` namespace ``path``. Otherwise, by default, the container shares the host's network
namespace (address ``127.0.0.1``), so a proxy on this host reaches it; ``network="none"`` gives it
a private namespace with only loopback. runc state lives under ``<state>/runc`` (``runc
--root``), apart from any other runc user on the host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio

from .base import DriverError, InstanceSpec, InstanceState, InstanceStatus, UnknownInstanceError
from .images import Image, ImageStore, ImageUser, static_busybox, static_executable
from .oci import DEFAULT_KEEP, RegistryImages, is_registry_reference, make_root
from .supervised import ShimDriver, hosts_file, read_json, write_image_process, write_json

log = logging.getLogger(__name__)

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
INIT_CANDIDATES = ("/usr/bin/tini-static", "/usr/sbin/tini-static", "/sbin/tini-static")
INIT_PATH = "/run/orchestrator/init"  # on the container's /run tmpfs, not in the shared image


def runc_available() -> str | None:
    """Why the runc driver cannot run here, or None when it can (root, runc, static busybox)."""
    if os.geteuid() != 0:
        return "the runc driver needs root"
    if shutil.which("runc") is None:
        return "runc is not installed (scripts/setup-test-deps installs it as root)"
    if static_busybox() is None:
        return "busybox-static is not installed (scripts/setup-test-deps installs it as root)"
    return None


def oci_config(
    spec: InstanceSpec,
    rootfs: Path,
    args: list[str],
    env: list[str],
    *,
    network: str,
    init: str | None = None,
    hosts: str | None = None,
    readonly: bool = True,
    cwd: str = "/",
    user: ImageUser | None = None,
) -> dict[str, Any]:
    """config.json for one instance (OCI runtime spec 1.0); with ``init`` (a static tini on the
    host) the command runs under it; ``hosts`` is a file to bind at /etc/hosts (the host's by
    default); ``readonly`` False for an instance's own writable root; ``cwd`` and ``user`` the
    image's working directory and user (root by default)."""
    process_user: dict[str, Any] = {"uid": 0, "gid": 0}
    if user is not None:
        process_user = {"uid": user.uid, "gid": user.gid}
        if user.additional_gids:
            process_user["additionalGids"] = list(user.additional_gids)
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if spec.netns:
        namespaces.append({"type": "network", "path": spec.netns})
    elif network == "none":
        namespaces.append({"type": "network"})
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.memory_mb:
        limit = int(spec.memory_mb) * 1024 * 1024
        resources["memory"] = {"limit": limit, "swap": limit}
    if spec.cpus:
        resources["cpu"] = {"shares": 1024 * int(spec.cpus)}
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=755", "size=16384k"]},
    ]  # fmt: skip
    if network != "none" or spec.netns:
        for name in ("resolv.conf", "hosts"):
            source = hosts if name == "hosts" and hosts is not None else f"/etc/{name}"
            if os.path.exists(source):
                mounts.append(
                    {"destination": f"/etc/{name}", "type": "bind", "source": source,
                     "options": ["rbind", "ro"]}
                )  # fmt: skip
    for source, target in spec.mounts:  # volumes (runc creates a missing mount point)
        mounts.append({"destination": target, "type": "bind", "source": source,
                       "options": ["rbind", "rw", "nosuid", "nodev"]})  # fmt: skip
    if init is not None:  # after /run's tmpfs, so its mount point is created there
        mounts.append({"destination": INIT_PATH, "type": "bind", "source": init,
                       "options": ["bind", "ro", "nosuid", "nodev"]})  # fmt: skip
        args = [INIT_PATH, "--", *args]
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": process_user,
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: DEFAULT_CAPS for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": readonly},
        "hostname": spec.machine_id,
        "mounts": mounts,
        "linux": {
            "resources": resources,
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }  # fmt: skip


class RuncDriver(ShimDriver):
    name = "runc"
    registry: RegistryImages  # always: registry images are a feature of this driver

    def __init__(
        self,
        state_dir: str | Path,
        *,
        images: ImageStore | str | Path | None = None,
        runc: str | None = None,
        network: str = "host",
        python: str | None = None,
        init: str | bool = True,
        image_cache_keep: int = DEFAULT_KEEP,
    ) -> None:
        """``init``: True finds the host's static tini, a path names a static init, False runs
        the command as PID 1. ``image_cache_keep``: unused registry images kept
        (:meth:`.oci.RegistryImages.sweep`)."""
        super().__init__(state_dir, python=python)
        if network not in ("host", "none"):
            raise ValueError(f"network must be 'host' or 'none', not {network!r}")
        self.network = network
        self.init = self._find_init(init)
        self.runc = runc or shutil.which("runc") or "runc"
        self.root = self.state_dir / "_runc"
        self.root.mkdir(parents=True, exist_ok=True)
        if images is None:
            images = self.state_dir / "_images"
        self.images = images if isinstance(images, ImageStore) else ImageStore(images)
        self.registry = RegistryImages(self.images.path, keep=image_cache_keep)

    @staticmethod
    def _find_init(init: str | bool) -> str | None:
        if init is False:
            return None
        if init is True:
            found = static_executable(INIT_CANDIDATES)
            if found is None:
                log.warning(
                    "runc driver: no static init (apt-get install tini for /usr/bin/tini-static); "
                    "each machine's command runs as PID 1, which ignores SIGTERM unless it "
                    "handles it, so a stop waits stop_config.timeout, then SIGKILLs"
                )
            return found
        if static_executable((str(init),)) is None:
            raise ValueError(f"init {init!r} is not a statically linked executable")
        return str(init)

    def instance_ids(self) -> list[str]:
        return [i for i in super().instance_ids() if not i.startswith("_")]

    async def _runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = await anyio.run_process(
            [self.runc, "--root", str(self.root), *args], check=False, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip()
            raise DriverError(f"runc {args[0]} failed ({proc.returncode}): {msg}")
        return proc

    async def _runc_state(self, instance_id: str) -> str | None:
        proc = await self._runc("state", instance_id, check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout).get("status")

    def _resolve(self, ref: str) -> Image:
        if is_registry_reference(ref):
            return self.registry.resolve(ref)
        return self.images.resolve(ref)

    async def prepare(self, spec: InstanceSpec) -> None:
        await anyio.to_thread.run_sync(self._resolve, spec.image)

    async def create(self, spec: InstanceSpec) -> None:
        image = await anyio.to_thread.run_sync(self._resolve, spec.image)
        state = (await self.status(spec.instance_id)).state
        if state is InstanceState.CREATED:
            return
        if state is not InstanceState.ABSENT:
            raise DriverError(f"instance {spec.instance_id} exists ({state})")
        d = self._dir(spec.instance_id)
        if d.exists():  # debris of a create that never finished
            await self._cleanup(spec.instance_id)
        (d / "bundle").mkdir(parents=True)
        rootfs, readonly, stored = image.rootfs, True, spec
        if is_registry_reference(spec.image):
            image = await anyio.to_thread.run_sync(self.registry.acquire, spec.image, d)
            rootfs, _ = await anyio.to_thread.run_sync(make_root, image, d)
            write_image_process(d, image)  # an exec runs where and as whom the command does
            readonly = False
            # an exec in the machine gets the image's environment too, as the command does
            env_of_image = dict(item.partition("=")[::2] for item in image.env)
            stored = dataclasses.replace(spec, env={**env_of_image, **spec.env})
        write_json(d / "spec.json", stored.to_dict())
        args = list(image.command(spec.cmd, cmd_only=spec.cmd_only))
        if not args:
            raise DriverError(f"image {image.name} has no default command", transient=False)
        env = {"PATH": BASE_PATH, "HOME": "/root"}
        for item in image.env:
            k, _, v = item.partition("=")
            env[k] = v
        env.update({"FLY_MACHINE_ID": spec.machine_id, "FLY_INSTANCE_ID": spec.instance_id})
        if spec.address:
            env["FLY_PRIVATE_IP"] = spec.address
        env.update(spec.env)
        hosts = None
        if spec.netns:
            (d / "hosts").write_text(hosts_file(spec))
            hosts = str(d / "hosts")
        config = oci_config(
            spec, rootfs, args, [f"{k}={v}" for k, v in env.items()],
            network=self.network, init=self.init, hosts=hosts, readonly=readonly,
            cwd=image.cwd, user=image.user,
        )  # fmt: skip
        write_json(d / "bundle" / "config.json", config)
        bundle = str(d / "bundle")
        args = [self.runc, str(self.root), bundle, spec.instance_id, str(d / "output.log")]
        self._spawn(spec.instance_id, ["runc", *args])
        await self._await_spawn(spec.instance_id)

    async def start(self, instance_id: str) -> None:
        proc = await self._runc("start", instance_id, check=False)
        if proc.returncode == 0:
            (self._dir(instance_id) / "started").touch()
            if self.init is not None:
                await self._await_init(instance_id)
            return
        state = (await self.status(instance_id)).state
        if state is InstanceState.ABSENT:
            raise UnknownInstanceError(instance_id)
        msg = proc.stderr.decode(errors="replace").strip()
        raise DriverError(f"cannot start instance {instance_id} in state {state}: {msg}")

    async def _await_init(self, instance_id: str, timeout: float = 10.0) -> None:
        """Until tini has started the command, which it does after blocking the signals it
        forwards. Before that a stop's SIGTERM would reach a PID 1 with no handler (runc's
        init, or tini just exec'd) and be dropped, and the stop would wait its whole timeout."""
        pids = self._pids(self._dir(instance_id))
        if pids is None:
            return
        pid = int(pids["main"])
        children = Path(f"/proc/{pid}/task/{pid}/children")
        delay = 0.0005
        with anyio.move_on_after(timeout):
            while True:
                try:
                    # a /proc file is the kernel's answer from memory: the read never blocks
                    if children.read_text().strip():  # noqa: ASYNC240
                        return
                except OSError:
                    return  # it has exited already (or this kernel cannot say: do not wait)
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.01)

    async def status(self, instance_id: str) -> InstanceStatus:
        d = self._dir(instance_id)
        if not (d / "spec.json").exists():
            return InstanceStatus(InstanceState.ABSENT)
        if (d / "error.json").exists():
            return InstanceStatus(InstanceState.ABSENT)  # runc create failed: recreate
        try:
            pids = await self._spawned(instance_id)
        except DriverError:
            return InstanceStatus(InstanceState.ABSENT)
        if pids is None:  # the shim never ran: debris to clean up on create
            return InstanceStatus(InstanceState.ABSENT)
        exit_ = self._exit(d)
        if exit_ is not None:
            return InstanceStatus(InstanceState.EXITED, pid=int(pids["main"]), exit=exit_)
        # "started" is written after runc start succeeded; without it (not started yet, or
        # the orchestrator died in between) runc itself is asked
        runc_state = "running" if (d / "started").exists() else await self._runc_state(instance_id)
        if runc_state == "created":
            return InstanceStatus(InstanceState.CREATED, pid=int(pids["main"]))
        spec = read_json(d / "spec.json") or {}
        if spec.get("netns"):
            address = spec.get("address")
        else:
            address = "127.0.0.1" if self.network == "host" else None
        return InstanceStatus(InstanceState.RUNNING, pid=int(pids["main"]), address=address)

    async def _cleanup(self, instance_id: str) -> None:
        await self._runc("delete", "--force", instance_id, check=False)
        await self._kill_and_forget(instance_id)

    async def destroy(self, instance_id: str) -> None:
        self._dir(instance_id)
        await self._cleanup(instance_id)

    def output(self, instance_id: str) -> str:
        try:
            return (self._dir(instance_id) / "output.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
