"""What the core asks of its host: effects (I/O to perform), notifications, and timers.

Every input method of :class:`swim.core.Membership` returns a list of effects, in order. A host
(the anyio runtime, the simulator, a test) performs them:

* :class:`Send` - send ``data`` as one datagram to ``addr``.
* :class:`SetTimer` - call ``handle_timer(timer, now)`` once ``now >= at``. Timers are never
  cancelled: a timer that no longer matters is recognised as stale by its token or its payload
  and ignored, so a host only needs a heap. A host must not lose timers; late is fine.
* :class:`OpenStream` - open a reliable stream (TCP) to ``addr``, write ``data``, read one reply
  and hand it to ``handle_stream_reply(stream_id, reply, now)``, or call
  ``handle_stream_failed(stream_id, now)`` on any error or timeout.
* :class:`StreamReply` - the answer to ``handle_stream_request(request_id, ...)``: write
  ``data`` back on that stream, then close it. No reply means: close without answering.
* :class:`StreamDone` - a stream exchange finished (``ok`` says whether its reply was valid);
  the runtime uses it to complete ``join``.
* :class:`Notification` subclasses - membership changes and user payloads, for the application.

Timers are a closed set of small frozen values (foca's shape). Each carries the ``token`` of the
core that set it; the token changes when the core leaves, so old chains die out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .member import Address, Member, NodeId

__all__ = [
    "BroadcastReceived",
    "Effect",
    "GossipTick",
    "IdentityRenewed",
    "IndirectProbe",
    "MemberAlive",
    "MemberDown",
    "MemberRenamed",
    "MemberSuspect",
    "MemberUp",
    "MemberUpdated",
    "MessageReceived",
    "NackDue",
    "Notification",
    "OpenStream",
    "ProbeTick",
    "PushPullTick",
    "ReapDown",
    "Send",
    "SetTimer",
    "StreamDone",
    "StreamReply",
    "SuspicionTimeout",
    "Timer",
]


# -- timers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeTick:
    """Conclude the current probe (suspect the target if it never acked) and start the next."""

    token: int


@dataclass(frozen=True, slots=True)
class IndirectProbe:
    """``probe_timeout`` after ping ``seq``: without an ack, ask helpers to ping-req the target."""

    token: int
    seq: int


@dataclass(frozen=True, slots=True)
class NackDue:
    """As a ping-req helper: the relayed ping ``seq`` got no ack in time. Forget the relay and,
    if the requester asked for it (``nack``), tell it with a NACK."""

    token: int
    seq: int
    nack: bool


@dataclass(frozen=True, slots=True)
class SuspicionTimeout:
    """Declare ``member`` down if still suspect at ``incarnation`` and its deadline has passed."""

    token: int
    member: NodeId
    incarnation: int


@dataclass(frozen=True, slots=True)
class GossipTick:
    """Push pending updates to a few random members."""

    token: int


@dataclass(frozen=True, slots=True)
class PushPullTick:
    """Exchange full state with one random member over a stream."""

    token: int


@dataclass(frozen=True, slots=True)
class ReapDown:
    """Forget ``member`` if it is still down: ``down_retention`` has passed."""

    token: int
    member: NodeId


Timer = (
    ProbeTick | IndirectProbe | NackDue | SuspicionTimeout | GossipTick | PushPullTick | ReapDown
)


# -- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    addr: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class SetTimer:
    at: float
    timer: Timer


@dataclass(frozen=True, slots=True)
class OpenStream:
    stream_id: int
    addr: Address
    data: bytes
    join: bool


@dataclass(frozen=True, slots=True)
class StreamReply:
    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamDone:
    stream_id: int
    ok: bool
    join: bool


# -- notifications ---------------------------------------------------------------------------


class Notification:
    """Base of everything the application is told."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class MemberUp(Notification):
    """A member became known and alive (first time, or a new identity after the old went down)."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberSuspect(Notification):
    """A member failed a probe (ours or someone's); it is still a member until declared down."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberAlive(Notification):
    """A suspect member refuted the suspicion with a higher incarnation."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberDown(Notification):
    """A member was declared down (``state`` DOWN) or left (``state`` LEFT). Final."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberRenamed(Notification):
    """An active member's address now holds a newer identity (it restarted or renewed)."""

    old: Member
    new: Member


@dataclass(frozen=True, slots=True)
class MemberUpdated(Notification):
    """An alive member changed its metadata."""

    member: Member


@dataclass(frozen=True, slots=True)
class BroadcastReceived(Notification):
    """A user broadcast from ``origin`` reached us (delivered once per broadcast)."""

    origin: NodeId
    payload: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived(Notification):
    """A direct user message from ``sender`` (sent with ``send_message``)."""

    sender: NodeId
    payload: bytes


@dataclass(frozen=True, slots=True)
class IdentityRenewed(Notification):
    """We were declared down (or lost our address to a newer identity) and renewed ourselves."""

    old: NodeId
    new: NodeId


Effect = Send | SetTimer | OpenStream | StreamReply | StreamDone | Notification
