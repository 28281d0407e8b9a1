"""The faulty virtual network: per-link delay, loss, duplication, reordering, and partitions.

Every datagram gets a *fate* when it is sent: dropped (partition or loss), or delivered once or
twice, each copy after its own sampled one-way delay. Delays are drawn independently per packet,
so packets on one link overtake each other whenever the distribution has spread; ``reorder``
additionally holds a packet back by up to ``reorder_delay`` (TigerBeetle's packet simulator has
the same knobs: one-way delay, loss, replay, partitions symmetric or not).

Each kind of draw has its own random stream (``net.delay``, ``net.loss``, ...), so turning on
duplication does not change which packets are lost. Streams (TCP) are reliable: they see the
delay and the partitions, never loss.

A *channel* (the core a datagram belongs to: ``swim``, ``corrosion``) can have link models of its
own, so one protocol's traffic can be lossy while another's stays clean, and can be *muted* on
chosen directed links: every datagram of that channel on that link is dropped, for as long as
the mute lasts (a topology, not a fault: healing leaves it), while streams still pass. Muting
the replication channel on some links leaves anti-entropy sync alone to deliver across them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .rng import Streams

__all__ = ["Delay", "LinkModel", "Network", "NetworkStats", "Partition"]

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Delay:
    """A one-way delay distribution in seconds, never below ``low`` nor above ``high``.

    ``kind``: ``"fixed"`` (always ``low``), ``"uniform"`` (between ``low`` and ``high``) or
    ``"exponential"`` (``low`` plus an exponential tail of mean ``mean - low``, cut at ``high``;
    the usual shape of LAN latency).
    """

    kind: str = "exponential"
    low: float = 0.0005
    mean: float = 0.001
    high: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "exponential"):
            raise ValueError(f"unknown delay kind {self.kind!r}")
        if not 0 <= self.low <= self.mean <= self.high or not math.isfinite(self.high):
            raise ValueError(f"delay needs 0 <= low <= mean <= high, got {self}")

    @property
    def max(self) -> float:
        return self.low if self.kind == "fixed" else self.high

    def sample(self, rng) -> float:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return self.low + rng.random() * (self.high - self.low)
        tail = self.mean - self.low
        if tail <= 0:
            return self.low
        return min(self.low + rng.expovariate(1.0 / tail), self.high)


@dataclass(frozen=True, slots=True)
class LinkModel:
    """What one directed link does to datagrams."""

    delay: Delay = field(default_factory=Delay)
    loss: float = 0.0
    """Probability a datagram is lost."""
    duplicate: float = 0.0
    """Probability a delivered datagram arrives twice (each copy with its own delay)."""
    reorder: float = 0.0
    """Probability a datagram is held back by an extra uniform delay up to ``reorder_delay``."""
    reorder_delay: float = 0.05

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        if self.reorder_delay < 0:
            raise ValueError("reorder_delay must be >= 0")

    @property
    def max_delay(self) -> float:
        return self.delay.max + (self.reorder_delay if self.reorder else 0.0)

    @property
    def clean(self) -> bool:
        """No loss: every datagram arrives (possibly late, duplicated or out of order)."""
        return self.loss == 0.0


@dataclass(frozen=True, slots=True)
class Partition:
    """Members split into groups; traffic between groups is cut.

    Symmetric: cut both ways. Asymmetric: only traffic from a lower-numbered group to a
    higher-numbered one is cut (group 0 cannot reach group 1, group 1 still reaches group 0).
    """

    groups: tuple[tuple[Address, ...], ...]
    symmetric: bool = True
    label: str = "split"
    _index: dict[Address, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[Address, int] = {}
        for g, members in enumerate(self.groups):
            for a in members:
                if a in index:
                    raise ValueError(f"{a} is in two groups of a partition")
                index[a] = g
        object.__setattr__(self, "_index", index)

    @classmethod
    def split(
        cls, groups: Sequence[Iterable[Address]], *, symmetric: bool = True, label: str = "split"
    ) -> Partition:
        return cls(tuple(tuple(g) for g in groups), symmetric, label)

    def blocks(self, src: Address, dst: Address) -> bool:
        gs = self._index.get(src)
        gd = self._index.get(dst)
        if gs is None or gd is None or gs == gd:
            return False
        return self.symmetric or gs < gd

    def describe(self) -> str:
        sizes = "/".join(str(len(g)) for g in self.groups)
        way = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.label} {sizes} {way}"


@dataclass(slots=True)
class NetworkStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    cut: int = 0  # dropped by a partition
    duplicated: int = 0
    to_down: int = 0  # arrived at a crashed node or an unknown address
    overflow: int = 0  # dropped by a clogged node's full receive queue
    muted: int = 0  # dropped because their channel is muted on that link
    streams: int = 0
    streams_failed: int = 0


class Network:
    """Decides the fate of datagrams and streams; the world schedules the deliveries."""

    def __init__(self, streams: Streams, default: LinkModel | None = None) -> None:
        self.default = default or LinkModel()
        self.links: dict[tuple[Address, Address], LinkModel] = {}
        # (channel, src, dst) -> model; (channel, None, None) is the channel's default
        self.channel_links: dict[tuple[str, Address | None, Address | None], LinkModel] = {}
        self.muted: dict[tuple[str, Address, Address], None] = {}
        self.partitions: dict[int, Partition] = {}
        self.stats = NetworkStats()
        self._delay_rng = streams("net.delay")
        self._loss_rng = streams("net.loss")
        self._dup_rng = streams("net.dup")
        self._reorder_rng = streams("net.reorder")
        self._next_partition = 0

    # -- configuration ------------------------------------------------------------------------

    def set_link(self, src: Address, dst: Address, model: LinkModel | None) -> None:
        """Override the model of the directed link ``src -> dst`` (None restores the default)."""
        if model is None:
            self.links.pop((src, dst), None)
        else:
            self.links[(src, dst)] = model

    def set_channel_link(
        self,
        channel: str,
        model: LinkModel | None,
        src: Address | None = None,
        dst: Address | None = None,
    ) -> None:
        """Override the model of ``channel``'s datagrams on ``src -> dst`` (both None: on every
        link); None restores what applies without it."""
        if (src is None) != (dst is None):
            raise ValueError("give both ends of the link, or neither")
        if model is None:
            self.channel_links.pop((channel, src, dst), None)
        else:
            self.channel_links[(channel, src, dst)] = model

    def mute(self, channel: str, src: Address, dst: Address, muted: bool = True) -> None:
        """Drop every datagram of ``channel`` on ``src -> dst`` (``muted=False``: stop)."""
        if muted:
            self.muted[(channel, src, dst)] = None
        else:
            self.muted.pop((channel, src, dst), None)

    def model(self, src: Address, dst: Address, channel: str = "") -> LinkModel:
        if self.channel_links:
            m = self.channel_links.get((channel, src, dst)) or self.channel_links.get(
                (channel, None, None)
            )
            if m is not None:
                return m
        if self.links:
            return self.links.get((src, dst), self.default)
        return self.default

    def add_partition(self, p: Partition) -> int:
        self._next_partition += 1
        self.partitions[self._next_partition] = p
        return self._next_partition

    def remove_partition(self, pid: int) -> Partition | None:
        return self.partitions.pop(pid, None)

    def blocked(self, src: Address, dst: Address) -> bool:
        if not self.partitions:
            return False
        return any(p.blocks(src, dst) for p in self.partitions.values())

    @property
    def max_delay(self) -> float:
        """The longest one-way delay any link can impose now."""
        models = [self.default, *self.links.values(), *self.channel_links.values()]
        return max(m.max_delay for m in models)

    @property
    def clean(self) -> bool:
        """No lossy link (a muted channel is a topology, not loss)."""
        models = [self.default, *self.links.values(), *self.channel_links.values()]
        return all(m.clean for m in models)

    # -- fates --------------------------------------------------------------------------------

    def fate(self, src: Address, dst: Address, channel: str = "") -> tuple[float, ...]:
        """Delays of the copies of one ``channel`` datagram that will arrive (empty: dropped)."""
        st = self.stats
        st.sent += 1
        if self.partitions and self.blocked(src, dst):
            st.cut += 1
            return ()
        if self.muted and (channel, src, dst) in self.muted:
            st.muted += 1
            return ()
        if self.channel_links:
            m = self.model(src, dst, channel)
        else:
            m = self.links.get((src, dst), self.default) if self.links else self.default
        if m.loss and self._loss_rng.random() < m.loss:
            st.lost += 1
            return ()
        d = m.delay.sample(self._delay_rng)
        if m.reorder and self._reorder_rng.random() < m.reorder:
            d += self._reorder_rng.random() * m.reorder_delay
        if m.duplicate and self._dup_rng.random() < m.duplicate:
            st.duplicated += 1
            d2 = m.delay.sample(self._delay_rng)
            return (d, d2)
        return (d,)

    def stream_delay(self, src: Address, dst: Address) -> float | None:
        """One-way delay of a stream segment, or None when a partition cuts the path."""
        if self.partitions and self.blocked(src, dst):
            return None
        m = self.links.get((src, dst), self.default) if self.links else self.default
        return m.delay.sample(self._delay_rng)
