"""Configuration of a SWIM member: every knob, its unit, its default and what it trades.

Three presets follow memberlist's (``config.go``): :meth:`Config.lan` for a data centre,
:meth:`Config.wan` for members spread over the internet, :meth:`Config.local` for loopback and
tests. Start from a preset and override what you must::

    cfg = Config.lan(label="prod", push_pull_interval=15.0)

A ``Config`` validates itself on construction and raises :class:`ConfigError` naming the key.
All durations are seconds (floats). The formulas that scale the protocol with cluster size live at
the bottom of this module so tests can check them against memberlist's published values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import SwimError

__all__ = [
    "Config",
    "ConfigError",
    "push_pull_scale",
    "remaining_suspicion_time",
    "retransmit_limit",
    "suspicion_timeout",
]


class ConfigError(SwimError, ValueError):
    """An invalid configuration value; the message names the key."""


@dataclass(frozen=True, slots=True)
class Config:
    """Tuning of the failure detector, the dissemination and the wire.

    The cluster should share one configuration: members with different intervals still work
    together, but a member with a smaller ``max_packet_size`` drops its peers' larger packets.
    """

    # -- failure detection (SWIM, Lifeguard) -------------------------------------------------
    probe_interval: float = 1.0
    """Seconds between two probes (the SWIM protocol period T'). Default 1 s (LAN), 5 s (WAN),
    1 s (local). Lower detects failures sooner and costs more packets; it must leave room for a
    ping, an indirect ping-req and the replies: keep it at least twice ``probe_timeout``."""

    probe_timeout: float = 0.4
    """Seconds to wait for a direct ack before asking ``indirect_checks`` members to probe the
    target. Default 400 ms (LAN; memberlist has 500 ms), 3 s (WAN), 200 ms (local). Set it
    near the 99th percentile round trip; too low turns slow networks into indirect probes
    (more packets), too high leaves the indirect probes little time before the period ends."""

    indirect_checks: int = 3
    """Members asked to ping an unresponsive target on our behalf (SWIM's k). Default 3 (LAN,
    WAN), 1 (local). More helpers make a false suspicion (lost packets on our own path) less
    likely, at 4 packets per helper per failed probe. 0 disables indirect probing."""

    suspicion_mult: int = 4
    """Lifeguard's alpha: the minimum suspicion timeout is ``suspicion_mult * max(1, log10 n) *
    probe_interval``, and ``suspicion_mult - 2`` independent confirmations bring the timeout
    down to that minimum. Default 4 (LAN), 6 (WAN), 3 (local). Higher gives a suspect longer to
    refute (fewer false positives) and detects real failures later."""

    suspicion_max_timeout_mult: int = 6
    """Lifeguard's beta: a suspicion with no confirmation lasts ``suspicion_max_timeout_mult``
    times the minimum. Default 6. Higher protects a member that only one peer suspects (that
    peer may be the unhealthy one), at the cost of slower detection when few members probe."""

    awareness_max_multiplier: int = 8
    """Lifeguard's local health multiplier S: the awareness score runs 0..S-1 and scales the
    probe interval by (score + 1), so a member that misses acks and nacks probes less and
    accuses others less. Default 8 (probe interval up to 8 s on LAN). 1 disables the backoff."""

    # -- dissemination ----------------------------------------------------------------------
    retransmit_mult: int = 4
    """Each update is piggybacked on at most ``retransmit_mult * ceil(log10(n + 1))`` packets.
    Default 4 (LAN, WAN), 2 (local). Higher makes a lost update less likely at the price of
    bytes in every packet."""

    gossip_interval: float = 0.2
    """Seconds between gossip rounds that push pending updates to ``gossip_nodes`` random
    members (nothing is sent when no update is pending). Default 200 ms (LAN), 500 ms (WAN),
    100 ms (local). Lower spreads news faster and sends more packets while news is pending."""

    gossip_nodes: int = 3
    """Members each gossip round sends to. Default 3 (LAN, local), 4 (WAN). 0 disables gossip
    rounds: updates then only ride on probes."""

    eager_gossip_nodes: int = 3
    """ALIVE members told at once when this member learns a state change (a suspicion, a
    refutation, a death) while nothing else is queued, instead of at the next gossip round; at
    most one such round per ``gossip_interval``. Default 3 (every preset). In a quiet cluster
    a death then reaches everyone in network round trips, not gossip intervals; during churn
    the ticks batch news as before. 0 restores memberlist's behaviour."""

    gossip_to_the_dead_time: float = 30.0
    """Seconds a member declared down still receives gossip, so it can learn it was declared
    down and rejoin under a renewed identity. Default 30 s (LAN), 60 s (WAN), 15 s (local)."""

    push_pull_interval: float = 30.0
    """Seconds between full state exchanges (a stream) with one random member; scaled up with
    cluster size above 32 members (see :func:`push_pull_scale`). Default 30 s (LAN), 60 s
    (WAN), 15 s (local). This anti-entropy repairs what gossip lost; lower converges faster
    after partitions and costs a full member list per exchange. 0 disables it."""

    stream_timeout: float = 10.0
    """Seconds allowed for a whole stream exchange (connect, send, receive) in the runtime.
    Default 10 s (LAN), 30 s (WAN), 1 s (local)."""

    # -- membership records -----------------------------------------------------------------
    down_retention: float = 86400.0
    """Seconds a member declared down (or left) is remembered before it is forgotten. While
    remembered, stale news about that identity is ignored. Default 24 h, as foca; memory is
    bounded by the number of addresses, not identities."""

    join_announce: int = 64
    """After a successful join exchange, send our alive message directly to at most this many
    of the members just learned, so they see us without waiting for gossip. Default 64; 0
    restores memberlist's behaviour (the seed gossips us). Costs one small packet per member,
    once per join."""

    # -- wire -------------------------------------------------------------------------------
    max_packet_size: int = 1400
    """Largest datagram sent, in bytes, including label and encryption overhead; larger
    received datagrams are dropped. Default 1400 (fits a 1500 B Ethernet MTU, RFC 8085)."""

    meta_max_size: int = 512
    """Largest member metadata, in bytes. Default 512 (memberlist's MetaMaxSize). It rides in
    every alive message, so it takes room from other piggybacked updates."""

    label: str = ""
    """Cluster label carried outside each packet and stream (and authenticated when encrypted);
    packets with another label are dropped. Default empty. At most 255 UTF-8 bytes."""

    max_stream_size: int = 20 * 1024 * 1024
    """Largest stream payload accepted (push/pull state), in bytes. Default 20 MiB (memberlist's
    maxPushStateBytes)."""

    def __post_init__(self) -> None:
        _validate(self)

    # -- presets ----------------------------------------------------------------------------
    @classmethod
    def lan(cls, **overrides: Any) -> Config:
        """memberlist's DefaultLANConfig, a local network with round trips well under 100 ms,
        but for ``probe_timeout``: 400 ms instead of 500 ms. Still hundreds of LAN round trips,
        and it brings the median detection of a death at n = 100 under 9.5 s with the same
        false positives (``bench/sim_papers.py``; ``probe_timeout=0.5`` restores memberlist's).
        """
        return cls._preset({}, overrides)

    @classmethod
    def wan(cls, **overrides: Any) -> Config:
        """memberlist's DefaultWANConfig: members across the internet, slow and lossy links."""
        return cls._preset(
            dict(
                probe_interval=5.0,
                probe_timeout=3.0,
                suspicion_mult=6,
                gossip_interval=0.5,
                gossip_nodes=4,
                gossip_to_the_dead_time=60.0,
                push_pull_interval=60.0,
                stream_timeout=30.0,
            ),
            overrides,
        )

    @classmethod
    def local(cls, **overrides: Any) -> Config:
        """memberlist's DefaultLocalConfig: loopback or one host, fast and reliable."""
        return cls._preset(
            dict(
                probe_interval=1.0,
                probe_timeout=0.2,
                indirect_checks=1,
                retransmit_mult=2,
                suspicion_mult=3,
                gossip_interval=0.1,
                gossip_nodes=3,
                gossip_to_the_dead_time=15.0,
                push_pull_interval=15.0,
                stream_timeout=1.0,
            ),
            overrides,
        )

    @classmethod
    def _preset(cls, base: dict[str, Any], overrides: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"unknown swim config key {key!r}")
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (and validated)."""
        return type(self)._preset(dataclasses.asdict(self), changes)

    # -- derived values ---------------------------------------------------------------------
    @property
    def label_bytes(self) -> bytes:
        return self.label.encode("utf-8")

    def suspicion_bounds(self, n: int) -> tuple[float, float, int]:
        """(min, max, k) of a suspicion started in a cluster of ``n`` members (self included)."""
        low = suspicion_timeout(self.suspicion_mult, n, self.probe_interval)
        high = self.suspicion_max_timeout_mult * low
        k = self.suspicion_mult - 2
        if n - 2 < k:  # not enough other members to ever confirm: go straight to the minimum
            k = 0
        return low, high, max(k, 0)

    def retransmit_limit(self, n: int) -> int:
        return retransmit_limit(self.retransmit_mult, n)

    def push_pull_period(self, n: int) -> float:
        return push_pull_scale(self.push_pull_interval, n)


_POSITIVE_SECONDS = (
    "probe_interval",
    "probe_timeout",
    "gossip_interval",
    "gossip_to_the_dead_time",
    "stream_timeout",
    "down_retention",
)


def _validate(c: Config) -> None:
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if f.type in ("float", float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{f.name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{f.name} must be finite, got {value!r}")
        elif f.type in ("int", int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
        elif f.type in ("str", str) and not isinstance(value, str):
            raise ConfigError(f"{f.name} must be a string, got {value!r}")
    for key in _POSITIVE_SECONDS:
        if getattr(c, key) <= 0:
            raise ConfigError(f"{key} must be > 0 seconds, got {getattr(c, key)!r}")
    if c.push_pull_interval < 0:
        raise ConfigError(
            f"push_pull_interval must be >= 0 (0 disables), got {c.push_pull_interval}"
        )
    if c.probe_timeout >= c.probe_interval:
        raise ConfigError(
            f"probe_timeout ({c.probe_timeout} s) must be less than probe_interval "
            f"({c.probe_interval} s)"
        )
    for key, low in (
        ("indirect_checks", 0),
        ("gossip_nodes", 0),
        ("eager_gossip_nodes", 0),
        ("join_announce", 0),
        ("suspicion_mult", 1),
        ("suspicion_max_timeout_mult", 1),
        ("awareness_max_multiplier", 1),
        ("retransmit_mult", 1),
        ("meta_max_size", 0),
    ):
        if getattr(c, key) < low:
            raise ConfigError(f"{key} must be >= {low}, got {getattr(c, key)}")
    if not 512 <= c.max_packet_size <= 65507:
        raise ConfigError(f"max_packet_size must be in 512..65507 bytes, got {c.max_packet_size}")
    if c.meta_max_size > c.max_packet_size // 2:
        raise ConfigError(
            f"meta_max_size ({c.meta_max_size}) must be at most half of max_packet_size "
            f"({c.max_packet_size}) so an alive message always fits"
        )
    if c.max_stream_size < c.max_packet_size:
        raise ConfigError(
            f"max_stream_size ({c.max_stream_size}) must be >= max_packet_size "
            f"({c.max_packet_size})"
        )
    if len(c.label.encode("utf-8")) > 255:
        raise ConfigError("label must be at most 255 bytes in UTF-8")


# -- formulas (memberlist util.go / suspicion.go), checked against its tests ----------------


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """Lifeguard's minimum suspicion timeout: alpha * max(1, log10 n) * interval.

    The node scale is truncated to thousandths as memberlist does (it computes in integer
    milliseconds), so the values match its tests exactly.
    """
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return suspicion_mult * int(node_scale * 1000) * interval / 1000


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many packets may carry one update: mult * ceil(log10(n + 1))."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


PUSH_PULL_SCALE_THRESHOLD = 32


def push_pull_scale(interval: float, n: int) -> float:
    """Push/pull period for ``n`` members: unchanged up to 32, then times ceil(log2 n - 5) + 1."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return mult * interval


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, low: float, high: float
) -> float:
    """Seconds left on a suspicion after ``confirmations`` of the ``k`` wanted (may be < 0).

    max(Min, Max - (Max - Min) * ln(C + 1) / ln(K + 1)) - elapsed, floored to milliseconds.
    """
    if k < 1:
        return low - elapsed
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    raw = high - frac * (high - low)
    timeout = math.floor(1000.0 * raw) / 1000.0
    return max(timeout, low) - elapsed
