"""Shared machinery of the drivers that run real processes through ``shim.py``.

Each instance has a directory ``<state_dir>/<instance_id>/`` holding what the shim and the
driver agree on (see ``shim.py``): ``shim.json`` (how to run), ``pids.json`` (who to signal),
``exit.json`` (how it ended), ``error.json`` (setup failed), ``stop_requested`` (the driver asked
it to stop, so the exit is not a crash). Everything the driver knows is in those files, which is
what lets a restarted orchestrator pick its instances up again.

Waiting is polling on those files with a short, growing interval (a few ms, up to 20 ms): it
survives orchestrator restarts (no pipe to lose) and costs nothing measurable for tens of
instances.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal as _signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from .base import (
    DriverError,
    ExecResult,
    ExecTimeoutError,
    ExitStatus,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    ProcessInfo,
    UnknownInstanceError,
)
from .images import Image
from .oci import RegistryImages, is_registry_reference, release_root

SHIM = Path(__file__).with_name("shim.py")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
SPAWN_GRACE = 10.0  # seconds a shim may take to report its pids before it is presumed lost


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def write_image_process(d: Path, image: Image) -> None:
    """``<dir>/cwd`` and ``<dir>/user`` (uid, gid, groups): where and as whom the image's
    command runs (the shim reads them), and, for the user, an exec in the machine too."""
    (d / "cwd").write_text(image.cwd)
    if image.user is not None:
        ids = (image.user.uid, image.user.gid, *image.user.additional_gids)
        (d / "user").write_text(" ".join(map(str, ids)))


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def process_alive(pid: int, starttime: int | None) -> bool:
    """Alive and the same process (not a reused pid, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if fields[0] in ("Z", "X"):
        return False
    return starttime is None or int(fields[19]) == starttime


def hosts_file(spec: InstanceSpec) -> str:
    """``/etc/hosts`` for an instance on its own network: without its hostname (the machine id)
    in it, looking the hostname up goes to DNS, which such an instance may not reach, and waits
    for the resolver's timeout (python's http.server does so at start: 5 s)."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    if spec.address:
        lines.append(f"{spec.address} {spec.machine_id}")
    return "\n".join(lines) + "\n"


def process_info(pid: int, pid_ns: str | None, pgid: int | None) -> ProcessInfo | None:
    """``pid`` described if it belongs to an instance: in the pid namespace ``pid_ns`` when
    given, else in process group ``pgid``; None otherwise (or when it vanished)."""
    try:
        if pid_ns is not None:
            if os.readlink(f"/proc/{pid}/ns/pid") != pid_ns:
                return None
        elif pgid is None or os.getpgid(pid) != int(pgid):
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        inner, rss_kb = pid, 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    inner = int(line.split()[-1])
                elif line.startswith("VmRSS:"):
                    rss_kb = int(line.split()[1])
                elif line.startswith("State:") and line.split()[1] in ("Z", "X"):
                    return None  # dead, waiting for its reaper
    except (OSError, ValueError):
        return None
    return ProcessInfo(pid=inner, host_pid=pid, command=" ".join(argv), rss=rss_kb * 1024)


class ShimDriver:
    """Base of ProcessDriver and RuncDriver: instance directories, shim spawning, waiting."""

    name = "shim"

    def __init__(self, state_dir: str | Path, *, python: str | None = None) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        self._procs: dict[str, subprocess.Popen] = {}

    registry: RegistryImages | None = None  # the registry-image cache, in drivers that have one

    def _image_cache(self) -> RegistryImages | None:
        """The driver's registry-image cache, if it has one."""
        return self.registry

    async def pin_image(self, image: str) -> str:
        """A registry image's reference pinned to its current digest (see :mod:`.oci`); any
        other image as it is."""
        registry = self.registry
        if registry is None or not is_registry_reference(image):
            return image
        return await anyio.to_thread.run_sync(registry.pin, image)

    # --- files --------------------------------------------------------------------------------

    def _dir(self, instance_id: str) -> Path:
        if not isinstance(instance_id, str) or not _ID_RE.match(instance_id):
            raise DriverError(f"invalid instance id {instance_id!r}", transient=False)
        return self.state_dir / instance_id

    def instance_ids(self) -> list[str]:
        return sorted(
            p.name for p in self.state_dir.iterdir() if p.is_dir() and _ID_RE.match(p.name)
        )

    def _pids(self, d: Path) -> dict[str, Any] | None:
        return read_json(d / "pids.json")

    def _reap(self) -> None:
        for iid, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[iid]

    def _shim_alive(self, pids: dict[str, Any]) -> bool:
        self._reap()
        return process_alive(int(pids["shim"]), pids.get("starttime"))

    def _exit(self, d: Path) -> ExitStatus | None:
        """The recorded exit, a synthesized one if the shim died without recording, or None."""
        data = read_json(d / "exit.json")
        requested = (d / "stop_requested").exists()
        if data is None:
            pids = self._pids(d)
            if pids is None or self._shim_alive(pids):
                return None
            data = read_json(d / "exit.json")  # it may have written just before dying
            if data is None:
                data = {"exit_code": None, "signal": None}
        data["requested_stop"] = requested
        return ExitStatus.from_dict(data)

    def _spawn(self, instance_id: str, args: list[str], env: dict[str, str] | None = None) -> None:
        """Start the shim for an instance; ``shim.json`` records that (and how) it was started."""
        d = self._dir(instance_id)
        argv = [self.python, "-I", "-S", str(SHIM), str(d), *args]
        write_json(d / "shim.json", {"argv": argv})
        with open(d / "shim.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env if env is not None else {"PATH": os.environ.get("PATH", "")},
                start_new_session=True,
                close_fds=True,
            )
        self._procs[instance_id] = proc

    async def _await_spawn(self, instance_id: str, timeout: float = SPAWN_GRACE) -> dict[str, Any]:
        """Until the shim reports its pids; DriverError if it reported a setup error or died."""
        d = self._dir(instance_id)
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            pids = self._pids(d)
            if pids is not None:
                return pids
            err = read_json(d / "error.json")
            if err is not None:
                raise DriverError(f"instance {instance_id}: {err.get('message', '').strip()}")
            proc = self._procs.get(instance_id)
            if proc is not None and proc.poll() is not None and self._pids(d) is None:
                if read_json(d / "error.json") is None:
                    raise DriverError(f"instance {instance_id}: shim exited ({proc.returncode})")
                continue
            if time.monotonic() > deadline:
                raise DriverError(f"instance {instance_id}: shim did not start in {timeout} s")
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.005)

    @staticmethod
    def _shim_pids(d: Path) -> list[int]:
        """Processes running the shim for this instance directory (a scan of /proc)."""
        needle = f"{SHIM}\0{d}\0".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def _shim_running(self, d: Path) -> bool:
        proc = self._procs.get(d.name)
        if proc is not None and proc.poll() is None:
            return True
        return bool(self._shim_pids(d))

    async def _spawned(self, instance_id: str) -> dict[str, Any] | None:
        """The shim's pids, waiting for a shim that is starting; None when no shim was ever
        started (including an orchestrator killed between writing shim.json and spawning)."""
        d = self._dir(instance_id)
        pids = self._pids(d)
        if pids is not None or not (d / "shim.json").exists():
            return pids
        if (d / "error.json").exists():
            raise DriverError(f"instance {instance_id}: {read_json(d / 'error.json')}")
        if self._shim_running(d):
            return await self._await_spawn(instance_id)
        pids = self._pids(d)  # it may have reported and exited just now
        if pids is None:
            (d / "shim.json").unlink(missing_ok=True)
        return pids

    # --- contract pieces shared by subclasses -------------------------------------------------

    async def status(self, instance_id: str) -> InstanceStatus:
        raise NotImplementedError  # each driver reads its instances' state its own way

    async def wait(self, instance_id: str) -> ExitStatus:
        d = self._dir(instance_id)
        delay = 0.002
        while True:
            if not d.exists():
                raise UnknownInstanceError(instance_id)
            status = self._exit(d)
            if status is not None:
                return status
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    async def _wait_for(self, instance_id: str, timeout: float) -> ExitStatus | None:
        with anyio.move_on_after(timeout):
            return await self.wait(instance_id)
        return None

    async def signal(self, instance_id: str, sig: int) -> None:
        d = self._dir(instance_id)
        pids = self._pids(d)
        if pids is None or self._exit(d) is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pids["main"]), sig)

    def _kill(self, pids: dict[str, Any]) -> None:
        if pids.get("pgid"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pids["pgid"]), _signal.SIGKILL)
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pids["main"]), _signal.SIGKILL)

    async def stop(
        self, instance_id: str, *, signal: int = _signal.SIGTERM, timeout: float = 10.0
    ) -> ExitStatus:
        status = await self.status(instance_id)
        if status.state is InstanceState.ABSENT:
            raise UnknownInstanceError(instance_id)
        if status.state is InstanceState.CREATED:
            raise DriverError(f"instance {instance_id} was never started", transient=False)
        d = self._dir(instance_id)
        if status.state is InstanceState.RUNNING:
            (d / "stop_requested").touch()
            await self.signal(instance_id, signal)
            if await self._wait_for(instance_id, timeout) is None:
                pids = self._pids(d)
                if pids is not None:
                    self._kill(pids)
                if await self._wait_for(instance_id, 30.0) is None:
                    raise DriverError(f"instance {instance_id} survived SIGKILL for 30 s")
        exit_ = self._exit(d)
        assert exit_ is not None
        return exit_

    async def _kill_and_forget(self, instance_id: str) -> None:
        """SIGKILL whatever runs, wait for the shim to record it, remove the directory."""
        d = self._dir(instance_id)
        if not d.exists():
            return
        try:  # a shim may be mid-start: let it report so nothing escapes
            pids = await self._spawned(instance_id)
        except DriverError:
            pids = self._pids(d)
        if pids is not None and self._exit(d) is None:
            (d / "stop_requested").touch()
            self._kill(pids)
            if await self._wait_for(instance_id, 30.0) is None:
                raise DriverError(f"instance {instance_id} survived SIGKILL for 30 s")
        elif pids is None:
            # a shim that failed before reporting may still have a supervisor: each shim
            # process leads its own process group (the command is in the supervisor's)
            for pid in self._shim_pids(d):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, _signal.SIGKILL)
        if pids is not None:  # the shim exits right after recording: let it finish
            with anyio.move_on_after(5):
                # the shim may be another process's child (a restarted orchestrator's driver):
                # no exit event to wait on, only its pid to look at
                while self._shim_alive(pids):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
        self._procs.pop(instance_id, None)
        release_root(d)  # an instance's overlay root (registry images) before its files
        shutil.rmtree(d, ignore_errors=True)
        cache = self._image_cache()
        if cache is not None:  # its image may go now (the cache's keep policy)
            cache.release(d)
            await anyio.to_thread.run_sync(cache.sweep)

    # --- operating a running instance (signal is above) ---------------------------------------

    def _running_pids(self, instance_id: str) -> dict[str, Any]:
        d = self._dir(instance_id)
        pids = self._pids(d)
        if pids is None or self._exit(d) is not None:
            raise DriverError(f"instance {instance_id} is not running", transient=False)
        return pids

    def _exec_argv(self, instance_id: str, cmd: list[str]) -> list[str]:
        """How to run ``cmd`` inside the instance: nsenter into every namespace of its init
        (pid, mount, uts, ipc, net) when it has its own, otherwise as a plain host process."""
        main = int(self._running_pids(instance_id)["main"])
        if os.readlink(f"/proc/{main}/ns/pid") != os.readlink("/proc/self/ns/pid"):
            nsenter = shutil.which("nsenter") or "nsenter"
            argv = [nsenter, "--target", str(main), "--all", "--root"]
            d = self._dir(instance_id)
            # in the target's working directory (an image's: the shim's supervisor and runc's
            # init run in it) as the image's user, as the command
            argv.append("--wd")
            ids = (read_text(d / "user") or "").split()
            if ids:
                argv += ["--setuid", ids[0], "--setgid", ids[1]]
            return [*argv, "--", *cmd]
        return cmd

    def _exec_env(self, instance_id: str) -> dict[str, str]:
        spec = read_json(self._dir(instance_id) / "spec.json") or {}
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        env.update(spec.get("env") or {})
        return env

    async def exec(self, instance_id: str, cmd: list[str], *, timeout: float) -> ExecResult:
        """Run ``cmd`` in the running instance; its output and exit code, or DriverError when it
        outlives ``timeout`` seconds (it is killed then)."""
        argv = self._exec_argv(instance_id, cmd)
        proc = await anyio.open_process(
            argv, stdin=subprocess.DEVNULL, env=self._exec_env(instance_id),
            start_new_session=True,
        )  # fmt: skip
        out: dict[str, bytes] = {"stdout": b"", "stderr": b""}

        async def drain(name: str, stream: Any) -> None:
            chunks = []
            async for chunk in stream:
                chunks.append(chunk)
            out[name] = b"".join(chunks)

        async with proc:
            with anyio.move_on_after(timeout) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(drain, "stdout", proc.stdout)
                    tg.start_soon(drain, "stderr", proc.stderr)
                await proc.wait()
            if scope.cancelled_caught:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, _signal.SIGKILL)
                with anyio.CancelScope(shield=True):
                    await proc.wait()
                raise ExecTimeoutError(f"command did not finish in {timeout:g} s: killed")
        code = proc.returncode
        assert code is not None
        return ExecResult(
            stdout=out["stdout"].decode(errors="replace"),
            stderr=out["stderr"].decode(errors="replace"),
            exit_code=code if code >= 0 else None,
            exit_signal=-code if code < 0 else None,
        )

    async def ps(self, instance_id: str) -> list[ProcessInfo]:
        """The instance's processes: those in its pid namespace when it has one, else those of
        its process group. ``pid`` is as seen inside the instance."""
        return await anyio.to_thread.run_sync(self._ps, instance_id)

    def _ps(self, instance_id: str) -> list[ProcessInfo]:
        pids = self._running_pids(instance_id)
        main = int(pids["main"])
        ns = os.readlink(f"/proc/{main}/ns/pid")
        own_ns = ns != os.readlink("/proc/self/ns/pid")
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            info = process_info(int(entry), ns if own_ns else None, pids.get("pgid"))
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda p: p.pid)

    def logs(self, instance_id: str, lines: int) -> list[str]:
        """The last ``lines`` lines the instance wrote to stdout/stderr (one interleaved log)."""
        path = self._dir(instance_id) / "output.log"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - lines * 1024))  # lines are rarely longer than 1 KiB
                data = f.read()
        except FileNotFoundError:
            raise UnknownInstanceError(instance_id) from None
        text = data.decode(errors="replace").splitlines()
        if size > lines * 1024 and text:
            text = text[1:]  # the first line read is likely cut
        return text[-lines:] if lines else []

    async def destroy_all(self) -> list[str]:
        """Destroy every instance under the state directory (test teardown, host cleanup)."""
        ids = self.instance_ids()
        for iid in ids:
            await self.destroy(iid)  # type: ignore[attr-defined]
        return ids

    async def aclose(self) -> None:
        self._reap()
