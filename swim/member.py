"""Who a member is (``NodeId``), what we believe about it (``State``) and a snapshot (``Member``).

An address holds at most one member. The identity at an address is ``(host, port, gen)``: a
member declared down can never come back under the same identity (down is final), so to rejoin
it *renews* itself, bumping ``gen``. A larger ``gen`` wins the address; news about a smaller one
is stale. The incarnation, by contrast, is how one identity refutes suspicion: only the member
itself raises it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["INCARNATION_MAX", "Address", "Member", "NodeId", "State"]

Address = tuple[str, int]
"""A UDP/TCP endpoint: ``(host, port)``."""

INCARNATION_MAX = 2**32 - 1
"""Incarnations are u32 on the wire; a member that would pass this renews its identity."""

GEN_MAX = 2**64 - 1
"""Generations are u64 on the wire (a microsecond clock reaches this in 500 000 years)."""


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A member's identity: its advertised address plus a generation that renewal bumps."""

    host: str
    port: int
    gen: int

    @property
    def addr(self) -> Address:
        return (self.host, self.port)

    def renew(self, above: int = 0) -> NodeId:
        """The next identity at this address, with a generation above both ours and ``above``."""
        return NodeId(self.host, self.port, max(self.gen, above) + 1)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}#{self.gen}"


class State(enum.IntEnum):
    """What one member believes about another. The wire carries these integers."""

    ALIVE = 0
    SUSPECT = 1
    DOWN = 2  # declared failed by the cluster; final for this identity
    LEFT = 3  # announced its own departure; final for this identity

    @property
    def active(self) -> bool:
        """Alive or suspect: still probed, still counted in the cluster size."""
        return self <= State.SUSPECT


@dataclass(frozen=True, slots=True)
class Member:
    """An immutable snapshot of one member as seen by the local node."""

    id: NodeId
    incarnation: int
    state: State
    meta: bytes = b""

    @property
    def addr(self) -> Address:
        return self.id.addr

    @property
    def active(self) -> bool:
        return self.state.active
