"""SWIM + Lifeguard membership: a sans-IO core (``Membership``) and an anyio runtime.

Read ``swim/core.py`` first: its docstring lists every protocol rule and where it is enforced.

* ``Membership`` - the state machine; feed it events with ``now``, perform its effects.
* ``Config`` - knobs with memberlist's presets ``Config.lan()``, ``.wan()``, ``.local()``.
* ``Keyring`` - AES-GCM keys for encrypted gossip, rotatable without downtime.
* ``SwimNode`` - the anyio UDP + TCP runtime hosting a ``Membership`` (asyncio or trio).
* ``swim.events`` - effects, notifications and timers; ``swim.testing`` - an in-memory host.
"""

from typing import TYPE_CHECKING

from .config import Config, ConfigError
from .core import Membership, PayloadTooLarge, Stats
from .errors import SwimError
from .events import (
    BroadcastReceived,
    Effect,
    IdentityRenewed,
    MemberAlive,
    MemberDown,
    MemberRenamed,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
    MessageReceived,
    Notification,
    OpenStream,
    Send,
    SetTimer,
    StreamDone,
    StreamReply,
    Timer,
)
from .keyring import Keyring
from .member import Address, Member, NodeId, State

__all__ = [
    "Address",
    "BroadcastReceived",
    "Config",
    "ConfigError",
    "Effect",
    "IdentityRenewed",
    "Keyring",
    "Member",
    "MemberAlive",
    "MemberDown",
    "MemberRenamed",
    "MemberSuspect",
    "MemberUp",
    "MemberUpdated",
    "Membership",
    "MessageReceived",
    "NodeId",
    "Notification",
    "OpenStream",
    "PayloadTooLarge",
    "Send",
    "SetTimer",
    "State",
    "Stats",
    "StreamDone",
    "StreamReply",
    "SwimError",
    "SwimNode",
    "Timer",
]


if TYPE_CHECKING:
    from .runtime import SwimNode


def __getattr__(name: str) -> "type[SwimNode]":
    # The runtime imports anyio; keep ``import swim`` light for pure-core users (simulator).
    if name == "SwimNode":
        from .runtime import SwimNode

        return SwimNode
    raise AttributeError(name)
