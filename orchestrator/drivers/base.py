"""The driver contract: what an FSM step may ask of the thing that runs instances.

An *instance* is one version of a machine (``instance_id``; an update makes a new one). Its life,
as OCI describes containers: ``absent`` → ``created`` (prepared, not running) → ``running`` →
``exited`` → (destroy) ``absent``. Starting an exited instance again means destroy + create: a
stopped machine restarts from a clean image, as on Fly.

Every method is idempotent with respect to the state it leads to (``destroy`` of an absent
instance succeeds, ``start`` of a running one is refused with :class:`DriverError` but steps check
``status`` first), because FSM steps run at least once. Instances outlive the orchestrator
process: after a restart, ``status`` and ``wait`` find them again from the driver's state
directory.

Errors: :class:`DriverError` with ``transient=False`` means retrying cannot help (the FSM step
turns it into an unrecoverable halt); ``transient=True`` errors are retried with backoff.
"""

from __future__ import annotations

import enum
import signal as _signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import OrchestratorError


class DriverError(OrchestratorError):
    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class ImageNotFoundError(DriverError):
    def __init__(self, image: str) -> None:
        super().__init__(f"image {image!r} not found", transient=False)
        self.image = image


class UnknownInstanceError(DriverError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id} does not exist", transient=False)
        self.instance_id = instance_id


class ExecTimeoutError(DriverError):
    status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


@dataclass(frozen=True)
class ExecResult:
    """A command run in an instance (Fly's exec answer)."""

    stdout: str
    stderr: str
    exit_code: int | None
    exit_signal: int | None


@dataclass(frozen=True)
class ProcessInfo:
    """One process of an instance (Fly's ps entry, the fields a host can tell)."""

    pid: int  # as the instance sees it
    host_pid: int
    command: str
    rss: int  # bytes


@runtime_checkable
class Operable(Protocol):
    """What a driver that runs real processes also offers: the Machines API's exec, ps and logs.
    A driver without them answers those endpoints with 501."""

    async def exec(self, instance_id: str, cmd: list[str], *, timeout: float) -> ExecResult: ...

    async def ps(self, instance_id: str) -> list[ProcessInfo]: ...

    def logs(self, instance_id: str, lines: int) -> list[str]: ...


class InstanceState(enum.StrEnum):
    ABSENT = "absent"
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True)
class InstanceSpec:
    """What to run. ``cmd`` empty means the image's default command (``Image.command``).
    ``netns`` (a namespace file such as ``/run/netns/<name>``) is the network namespace to run
    in, prepared by
    :mod:`..network`, where the instance has the private ``address``; without it, the host's.
    ``mounts`` are host directories (volumes, :mod:`..volumes`) to bind at paths inside."""

    instance_id: str
    machine_id: str
    image: str
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    memory_mb: int | None = None
    cpus: int | None = None
    netns: str | None = None
    address: str | None = None
    mounts: tuple[tuple[str, str], ...] = ()  # (host directory, path in the instance)
    cmd_only: bool = False  # ``cmd`` is ``init.cmd`` alone: the image's entrypoint stays

    def to_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "machine_id": self.machine_id,
            "image": self.image,
            "cmd": list(self.cmd),
            "env": dict(self.env),
            "memory_mb": self.memory_mb,
            "cpus": self.cpus,
            "netns": self.netns,
            "address": self.address,
            "mounts": [list(pair) for pair in self.mounts],
            "cmd_only": self.cmd_only,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InstanceSpec:
        return cls(
            instance_id=d["instance_id"],
            machine_id=d["machine_id"],
            image=d["image"],
            cmd=tuple(d.get("cmd") or ()),
            env=dict(d.get("env") or {}),
            memory_mb=d.get("memory_mb"),
            cpus=d.get("cpus"),
            netns=d.get("netns"),
            address=d.get("address"),
            mounts=tuple((str(s), str(t)) for s, t in d.get("mounts") or ()),
            cmd_only=bool(d.get("cmd_only", False)),
        )


@dataclass(frozen=True)
class ExitStatus:
    """How the main process ended (fly-go's MachineExitEvent fields).

    Exactly one of ``exit_code`` / ``signal`` is set when known; both are None when the driver
    lost track (its supervisor was killed).
    """

    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    requested_stop: bool = False
    exited_at: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether on-failure restart applies: anything but a clean exit 0."""
        return self.exit_code != 0 or self.oom_killed

    def to_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "oom_killed": self.oom_killed,
            "requested_stop": self.requested_stop,
            "exited_at": self.exited_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExitStatus:
        return cls(
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            oom_killed=bool(d.get("oom_killed", False)),
            requested_stop=bool(d.get("requested_stop", False)),
            exited_at=float(d.get("exited_at") or 0.0),
        )


@dataclass(frozen=True)
class InstanceStatus:
    state: InstanceState
    pid: int | None = None
    address: str | None = None
    exit: ExitStatus | None = None


@runtime_checkable
class Driver(Protocol):
    """pilot's contract. All methods are coroutines; none blocks the event loop."""

    name: str

    async def prepare(self, spec: InstanceSpec) -> None:
        """Make the image/rootfs ready. ImageNotFoundError when the image is unknown."""
        ...

    async def create(self, spec: InstanceSpec) -> None:
        """absent → created. Recreating a created instance is a no-op."""
        ...

    async def start(self, instance_id: str) -> None:
        """created → running."""
        ...

    async def signal(self, instance_id: str, sig: int) -> None:
        """Deliver ``sig`` to the main process (no-op unless running)."""
        ...

    async def stop(
        self, instance_id: str, *, signal: int = _signal.SIGTERM, timeout: float = 10.0
    ) -> ExitStatus:
        """Send ``signal``, wait up to ``timeout`` seconds, then SIGKILL; returns the exit."""
        ...

    async def wait(self, instance_id: str) -> ExitStatus:
        """Until the running instance exits (returns at once if it already has)."""
        ...

    async def destroy(self, instance_id: str) -> None:
        """Kill if needed and remove every trace; absent is fine."""
        ...

    async def status(self, instance_id: str) -> InstanceStatus: ...

    async def aclose(self) -> None:
        """Release the driver's own resources (instances keep running)."""
        ...


def parse_signal(value: str | int | None, default: int = _signal.SIGTERM) -> int:
    """``"SIGTERM"``, ``"TERM"``, ``15`` → 15; ValueError on anything else."""
    if value is None or value == "":
        return int(default)
    if isinstance(value, bool):
        raise ValueError(f"invalid signal {value!r}")
    if isinstance(value, int):
        if value in {int(s) for s in _signal.Signals}:
            return value
        raise ValueError(f"invalid signal number {value}")
    name = str(value).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(_signal.Signals[name])
    except KeyError:
        raise ValueError(f"invalid signal {value!r}") from None
