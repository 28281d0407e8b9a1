"""Drivers run machine instances: pilot's contract, as the FSM steps see it.

``FakeDriver`` (in memory, fault-injectable), ``ProcessDriver`` (a command in its own namespaces
as root, a plain process group otherwise) and ``RuncDriver`` (OCI bundles through runc) share the
:class:`Driver` protocol from :mod:`.base`.
"""

from .base import (
    Driver,
    DriverError,
    ExitStatus,
    ImageNotFoundError,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    UnknownInstanceError,
)
from .fake import FakeDriver
from .process import ProcessDriver
from .runc import RuncDriver, runc_available

__all__ = [
    "Driver",
    "DriverError",
    "ExitStatus",
    "FakeDriver",
    "ImageNotFoundError",
    "InstanceSpec",
    "InstanceState",
    "InstanceStatus",
    "ProcessDriver",
    "RuncDriver",
    "UnknownInstanceError",
    "runc_available",
]
