"""ProcessDriver: a machine's command as a supervised process group on this host.

As root the command runs in fresh pid, mount, uts and ipc namespaces (its own PID 1 supervisor,
its own /proc, hostname = machine id); otherwise it is a plain process group. The network is the
machine's own namespace when the orchestrator prepared one (``spec.netns``, the address
``spec.address``, also in ``FLY_PRIVATE_IP``), otherwise the host's (address ``127.0.0.1``, so a
proxy on this host can reach it). Volumes (``spec.mounts``) are bind-mounted at their paths in
the machine's mount namespace (a missing mount point is created on the host); without
namespaces the command gets each volume's host directory in ``FLY_MOUNT_PATH_<PATH>``
(``/data`` → ``FLY_MOUNT_PATH_DATA``). A local image name is not unpacked: the command runs on
the host filesystem, so ``config.init.cmd`` (or ``exec``) is required. An image from a registry
(:mod:`.oci`; root only) is: the instance gets its own writable root over the cached image (an
overlay, or a copy) and the command runs chrooted in it, with the host's ``/dev`` bound in, a
private ``/proc``, the image's environment, working directory and user and, by default, its
entrypoint and command. No cgroup limits, hence
no OOM detection (``oom_killed`` is always False).

Lifecycle: ``create`` writes the spec (OCI's "created"); ``start`` spawns the shim, which starts
the command; ``stop``/``wait``/``destroy`` work from the files the shim keeps (``supervised``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import anyio

from .base import DriverError, InstanceSpec, InstanceState, InstanceStatus, UnknownInstanceError
from .images import Image
from .oci import DEFAULT_KEEP, RegistryImages, is_registry_reference, make_root, release_root
from .supervised import ShimDriver, hosts_file, read_json, write_image_process, write_json

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def mount_env(path: str) -> str:
    """The variable naming a volume's host directory when the process driver cannot mount it
    (no namespaces): ``/data`` → ``FLY_MOUNT_PATH_DATA``."""
    return "FLY_MOUNT_PATH" + re.sub(r"[^A-Z0-9]", "_", path.upper())


class ProcessDriver(ShimDriver):
    name = "process"
    registry: RegistryImages  # always: registry images are a feature of this driver

    def __init__(
        self,
        state_dir: str | Path,
        *,
        namespaces: bool | None = None,
        python: str | None = None,
        images: str | Path | None = None,
        image_cache_keep: int = DEFAULT_KEEP,
    ) -> None:
        """``images``: the registry images' cache (default ``<state_dir>/_images``), keeping
        ``image_cache_keep`` images no instance uses (:meth:`.oci.RegistryImages.sweep`)."""
        super().__init__(state_dir, python=python)
        self.namespaces = (os.geteuid() == 0) if namespaces is None else namespaces
        self.registry = RegistryImages(images or self.state_dir / "_images", keep=image_cache_keep)

    async def _registry_image(self, spec: InstanceSpec, user: Path | None = None) -> Image:
        """The spec's registry image; with ``user``, recorded as used by that instance
        directory (:meth:`.oci.RegistryImages.acquire`)."""
        if not self.namespaces or os.geteuid() != 0:
            raise DriverError(
                f"image {spec.image!r}: the process driver runs registry images only as root "
                "with namespaces (a chroot in the image)",
                transient=False,
            )
        if user is None:
            image = await anyio.to_thread.run_sync(self.registry.resolve, spec.image)
        else:
            image = await anyio.to_thread.run_sync(self.registry.acquire, spec.image, user)
        if not image.command(spec.cmd, cmd_only=spec.cmd_only):
            raise DriverError(f"image {spec.image!r} has no default command", transient=False)
        return image

    async def prepare(self, spec: InstanceSpec) -> None:
        if is_registry_reference(spec.image):
            await self._registry_image(spec)
            return
        if not spec.cmd:
            raise DriverError(
                "the process driver runs commands on the host: config.init.cmd is required",
                transient=False,
            )
        if shutil.which(spec.cmd[0], path=spec.env.get("PATH", BASE_PATH)) is None:
            raise DriverError(f"command not found: {spec.cmd[0]!r}", transient=False)

    async def create(self, spec: InstanceSpec) -> None:
        await self.prepare(spec)
        d = self._dir(spec.instance_id)
        state = (await self.status(spec.instance_id)).state
        if state is InstanceState.CREATED:
            return
        if state is not InstanceState.ABSENT:
            raise DriverError(f"instance {spec.instance_id} exists ({state})")
        release_root(d)  # debris of a create that never finished
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        if is_registry_reference(spec.image):
            image = await self._registry_image(spec, d)
            rootfs, _ = await anyio.to_thread.run_sync(make_root, image, d)
            (d / "rootfs.path").write_text(str(rootfs))  # the shim chroots there
            write_image_process(d, image)  # in the image's working directory, as its user
            env = dict(item.partition("=")[::2] for item in image.env)
            env.update(spec.env)
            command = image.command(spec.cmd, cmd_only=spec.cmd_only)
            spec = dataclasses.replace(spec, cmd=command, cmd_only=False, env=env)
        if spec.netns and self.namespaces:
            (d / "hosts").write_text(hosts_file(spec))
        if spec.mounts and self.namespaces:  # the shim binds them in the machine's namespace
            (d / "mounts").write_text("".join(f"{src}\t{dst}\n" for src, dst in spec.mounts))
        write_json(d / "spec.json", spec.to_dict())

    async def start(self, instance_id: str) -> None:
        d = self._dir(instance_id)
        state = (await self.status(instance_id)).state
        if state is InstanceState.ABSENT:
            raise UnknownInstanceError(instance_id)
        if state is not InstanceState.CREATED:
            raise DriverError(f"cannot start instance {instance_id} in state {state}")
        spec = InstanceSpec.from_dict(read_json(d / "spec.json") or {})
        env = self._exec_env(instance_id)
        namespaces = "1" if self.namespaces else "0"
        args = [namespaces, spec.machine_id, str(d / "output.log"), spec.netns or "-", "--"]
        self._spawn(instance_id, ["process", *args, *spec.cmd], env)
        await self._await_spawn(instance_id)

    def _exec_env(self, instance_id: str) -> dict[str, str]:
        """The command's environment (an exec in the machine gets the same)."""
        spec = InstanceSpec.from_dict(read_json(self._dir(instance_id) / "spec.json") or {})
        env = {"PATH": BASE_PATH, "HOME": "/root" if os.geteuid() == 0 else "/tmp"}
        env.update({"FLY_MACHINE_ID": spec.machine_id, "FLY_INSTANCE_ID": spec.instance_id})
        if spec.address:
            env["FLY_PRIVATE_IP"] = spec.address
        if not self.namespaces:  # no mount namespace: the volume is where it is on the host
            for src, dst in spec.mounts:
                env[mount_env(dst)] = src
        env.update(spec.env)
        return env

    async def status(self, instance_id: str) -> InstanceStatus:
        d = self._dir(instance_id)
        if not (d / "spec.json").exists():
            return InstanceStatus(InstanceState.ABSENT)
        try:
            pids = await self._spawned(instance_id)
        except DriverError:
            return InstanceStatus(InstanceState.ABSENT)  # setup failed: recreate
        if pids is None:
            return InstanceStatus(InstanceState.CREATED)
        exit_ = self._exit(d)
        if exit_ is not None:
            return InstanceStatus(InstanceState.EXITED, pid=int(pids["main"]), exit=exit_)
        spec = read_json(d / "spec.json") or {}
        address = spec.get("address") if spec.get("netns") else "127.0.0.1"
        return InstanceStatus(InstanceState.RUNNING, pid=int(pids["main"]), address=address)

    async def destroy(self, instance_id: str) -> None:
        await self._kill_and_forget(instance_id)

    def output(self, instance_id: str) -> str:
        """What the command wrote to stdout/stderr (for tests and debugging)."""
        try:
            return (self._dir(instance_id) / "output.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
