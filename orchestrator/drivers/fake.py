"""FakeDriver: instances in memory, faults on demand, time from the injected clock.

For tests and the simulator. Instances live in the driver object, so keeping the object across an
orchestrator "restart" models VMs that survive their supervisor, and dropping it models a host
reboot. Faults:

* ``fail_next(op, times, transient)`` — the next calls of prepare/create/start/stop/destroy raise;
* ``stop_delay`` / ``ignore_sigterm(iid)`` — slow stops: the process reacts to its stop signal
  after ``stop_delay`` seconds, or never (then ``stop`` escalates to SIGKILL after its timeout);
* ``crash(iid, exit_code)`` / ``oom(iid)`` — the main process exits on its own;
* ``exit_on_start(iid, exit_code, times)`` — the next starts of that instance exit at once (a
  crash loop: the exit happens before whoever started it has finished its run);
* ``images`` — when given, only those images exist (others: ImageNotFoundError).
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio

from ..clock import Clock, SystemClock
from .base import (
    DriverError,
    ExitStatus,
    ImageNotFoundError,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    UnknownInstanceError,
)

OPS = ("prepare", "create", "start", "stop", "destroy")


@dataclass
class FakeInstance:
    spec: InstanceSpec
    state: InstanceState = InstanceState.CREATED
    pid: int | None = None
    address: str | None = None
    exit: ExitStatus | None = None
    exited: anyio.Event = field(default_factory=anyio.Event)
    ignores_sigterm: bool = False
    stop_requested: bool = False


def image_name(image: str) -> str:
    """``docker.io/library/busybox:1.36`` → ``busybox`` (registry, path and tag dropped)."""
    name = image.rsplit("/", 1)[-1]
    name = name.split("@", 1)[0]
    return name.split(":", 1)[0]


class FakeDriver:
    name = "fake"

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        images: Iterable[str] | None = None,
        latency: float = 0.0,
    ) -> None:
        self.clock = clock if clock is not None else SystemClock()
        self.images = None if images is None else {image_name(i) for i in images}
        self.latency = latency
        self.stop_delay = 0.0
        self.instances: dict[str, FakeInstance] = {}
        self.calls: list[tuple[str, str]] = []
        self._faults: dict[str, list[DriverError]] = {op: [] for op in OPS}
        self._exit_on_start: dict[str, tuple[int, int]] = {}  # iid -> (exit code, starts left)
        self._pids = 1000

    # --- fault injection ----------------------------------------------------------------------

    def fail_next(
        self, op: str, times: int = 1, *, message: str = "injected fault", transient: bool = True
    ) -> None:
        if op not in self._faults:
            raise ValueError(f"unknown driver op {op!r}; one of {OPS}")
        for _ in range(times):
            self._faults[op].append(DriverError(f"{op}: {message}", transient=transient))

    def ignore_sigterm(self, instance_id: str, ignore: bool = True) -> None:
        self._get(instance_id).ignores_sigterm = ignore

    def crash(self, instance_id: str, exit_code: int = 1) -> None:
        self._exit(self._get(instance_id), ExitStatus(exit_code=exit_code))

    def oom(self, instance_id: str) -> None:
        self._exit(self._get(instance_id), ExitStatus(signal=int(_signal.SIGKILL), oom_killed=True))

    def exit_on_start(self, instance_id: str, exit_code: int = 1, times: int = 1) -> None:
        """The next ``times`` starts of ``instance_id`` (recreated instances of that id too) exit
        with ``exit_code`` as soon as they are running, before ``start`` returns."""
        if times < 0:
            raise ValueError("times must be >= 0")
        self._exit_on_start[instance_id] = (exit_code, times)

    # --- driver -------------------------------------------------------------------------------

    async def _enter(self, op: str, instance_id: str) -> None:
        self.calls.append((op, instance_id))
        if self.latency:
            await self.clock.sleep(self.latency)
        else:
            await anyio.lowlevel.checkpoint()
        if self._faults[op]:
            raise self._faults[op].pop(0)

    def _get(self, instance_id: str) -> FakeInstance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise UnknownInstanceError(instance_id)
        return inst

    def _exit(self, inst: FakeInstance, status: ExitStatus) -> None:
        if inst.state is not InstanceState.RUNNING:
            return
        inst.state = InstanceState.EXITED
        inst.exit = ExitStatus(
            exit_code=status.exit_code,
            signal=status.signal,
            oom_killed=status.oom_killed,
            requested_stop=inst.stop_requested,
            exited_at=self.clock.now(),
        )
        inst.exited.set()

    async def prepare(self, spec: InstanceSpec) -> None:
        await self._enter("prepare", spec.instance_id)
        if self.images is not None and image_name(spec.image) not in self.images:
            raise ImageNotFoundError(spec.image)

    async def create(self, spec: InstanceSpec) -> None:
        await self._enter("create", spec.instance_id)
        if self.images is not None and image_name(spec.image) not in self.images:
            raise ImageNotFoundError(spec.image)
        inst = self.instances.get(spec.instance_id)
        if inst is not None:
            if inst.state is InstanceState.CREATED:
                return
            raise DriverError(f"instance {spec.instance_id} exists ({inst.state})")
        self.instances[spec.instance_id] = FakeInstance(spec=spec)

    async def start(self, instance_id: str) -> None:
        await self._enter("start", instance_id)
        inst = self._get(instance_id)
        if inst.state is not InstanceState.CREATED:
            raise DriverError(f"cannot start instance {instance_id} in state {inst.state}")
        self._pids += 1
        inst.pid = self._pids
        inst.address = f"fdaa:0:1:a7b::{self._pids:x}"
        inst.state = InstanceState.RUNNING
        code, left = self._exit_on_start.get(instance_id, (0, 0))
        if left:
            self._exit_on_start[instance_id] = (code, left - 1)
            self._exit(inst, ExitStatus(exit_code=code))

    async def signal(self, instance_id: str, sig: int) -> None:
        inst = self._get(instance_id)
        await anyio.lowlevel.checkpoint()
        if inst.state is not InstanceState.RUNNING:
            return
        terminating = sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGKILL, _signal.SIGQUIT)
        ignored = sig == _signal.SIGTERM and inst.ignores_sigterm
        if terminating and not ignored:
            self._exit(inst, ExitStatus(signal=int(sig)))

    async def stop(
        self, instance_id: str, *, signal: int = _signal.SIGTERM, timeout: float = 10.0
    ) -> ExitStatus:
        await self._enter("stop", instance_id)
        inst = self._get(instance_id)
        if inst.state is InstanceState.RUNNING:
            inst.stop_requested = True
            reacts = signal == _signal.SIGKILL or not (
                inst.ignores_sigterm and signal == _signal.SIGTERM
            )
            if reacts and self.stop_delay <= timeout:
                if self.stop_delay:
                    await self.clock.sleep(self.stop_delay)
                self._exit(inst, ExitStatus(signal=int(signal)))
            else:
                await self.clock.sleep(timeout)
                self._exit(inst, ExitStatus(signal=int(_signal.SIGKILL)))
        if inst.state is InstanceState.CREATED:
            raise DriverError(f"instance {instance_id} was never started", transient=False)
        assert inst.exit is not None
        return inst.exit

    async def wait(self, instance_id: str) -> ExitStatus:
        inst = self._get(instance_id)
        if inst.state is InstanceState.CREATED:
            raise DriverError(f"instance {instance_id} was never started", transient=False)
        await inst.exited.wait()
        assert inst.exit is not None
        return inst.exit

    async def destroy(self, instance_id: str) -> None:
        await self._enter("destroy", instance_id)
        inst = self.instances.pop(instance_id, None)
        if inst is not None and inst.state is InstanceState.RUNNING:
            inst.stop_requested = True
            self._exit(inst, ExitStatus(signal=int(_signal.SIGKILL)))

    async def status(self, instance_id: str) -> InstanceStatus:
        await anyio.lowlevel.checkpoint()
        inst = self.instances.get(instance_id)
        if inst is None:
            return InstanceStatus(InstanceState.ABSENT)
        return InstanceStatus(inst.state, pid=inst.pid, address=inst.address, exit=inst.exit)

    async def aclose(self) -> None:
        return None
