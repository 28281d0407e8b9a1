"""The runtime's logs that stay readable under load.

A flood of the same problem (bad changesets from one peer) must not drown the log: ``Throttled``
writes the first occurrence of each reason at once and then one line per interval with the count.
``ActivityLog`` turns the replication traffic into one summary line per interval, and no line
when nothing happened. ``GossipWarnings`` says, on both sides, when a node's gossip keys or TLS
certificates differ from its peers'. ``log_member_event`` writes SWIM's membership changes.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ..addresses import format_addr

members_log = logging.getLogger("corrosion.members")
sync_log = logging.getLogger("corrosion.sync")
apply_log = logging.getLogger("corrosion.apply")


# -- throttling --------------------------------------------------------------------------------


class _Seen:
    __slots__ = ("args", "at", "fields", "msg", "repeats")

    def __init__(self, at: float, msg: str, args: tuple, fields: dict[str, Any]) -> None:
        self.at = at
        self.repeats = 0
        self.msg, self.args, self.fields = msg, args, fields


class Throttled:
    """Writes the first record of each ``key`` at once; repeats within ``interval`` seconds are
    counted and reported in one line when the interval is over (at the next occurrence or at
    ``flush``). At most ``max_keys`` keys are remembered (the oldest are forgotten)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        level: int = logging.WARNING,
        max_keys: int = 256,
    ) -> None:
        self.logger, self.interval, self.clock = logger, interval, clock
        self.level = level
        self.max_keys = max_keys
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def log(self, key: str, msg: str, *args: Any, fields: dict[str, Any] | None = None) -> None:
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.at < self.interval:
            seen.repeats += 1
            seen.args, seen.fields = args, fields or {}
            return
        repeats = seen.repeats if seen is not None else 0
        self._seen[key] = _Seen(now, msg, args, fields or {})
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        self._emit(msg, args, fields or {}, repeats)

    def flush(self) -> None:
        """Report the repeats of every key whose interval is over; forget quiet keys."""
        now = self.clock()
        for key, seen in list(self._seen.items()):
            if now - seen.at < self.interval:
                continue
            if seen.repeats:
                self._emit(seen.msg, seen.args, seen.fields, seen.repeats)
                seen.at, seen.repeats = now, 0
            else:
                del self._seen[key]

    def _emit(self, msg: str, args: tuple, fields: dict[str, Any], repeats: int) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        if repeats:
            msg += f" (and {repeats} more like it in the last {self.interval:g}s)"
            fields = {**fields, "repeats": repeats}
        self.logger.log(self.level, msg, *args, extra={"fields": fields})


# -- replication activity ----------------------------------------------------------------------


class ActivityLog:
    """What replication did over one interval, logged by ``tick`` as one ``sync summary`` line
    on ``corrosion.sync`` (none when nothing moved), and rejected or malformed input logged on
    ``corrosion.apply`` through a ``Throttled``."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.rejections = Throttled(apply_log, interval, clock)
        self._reset()

    def _reset(self) -> None:
        self.sessions = 0
        self.failed: dict[str, int] = {}
        self.pulled: dict[str, int] = {}
        self.served_sessions = 0
        self.served: dict[str, int] = {}
        self.applied_versions = 0
        self.applied_changes = 0  # column changes (cr-sqlite's rows impacted), not table rows
        self.committed = 0

    def local_commit(self) -> None:
        """A local transaction committed a version (it goes out by broadcast)."""
        self.committed += 1

    def sync_session(self, peer: str, pulled: int, ok: bool) -> None:
        """One sync this node asked ``peer`` for: ``pulled`` changesets came back."""
        self.sessions += 1
        if pulled:
            self.pulled[peer] = self.pulled.get(peer, 0) + pulled
        if not ok:
            self.failed[peer] = self.failed.get(peer, 0) + 1

    def sync_served(self, peer: str, sent: int) -> None:
        """One sync this node answered: ``sent`` changesets went to ``peer``."""
        self.served_sessions += 1
        if sent:
            self.served[peer] = self.served.get(peer, 0) + sent

    def applied(self, versions: int, changes: int) -> None:
        """``versions`` remote versions applied, made of ``changes`` column changes."""
        self.applied_versions += versions
        self.applied_changes += changes

    def rejected(self, actor: bytes, version: int, reason: str) -> None:
        self.rejections.log(
            f"rejected:{reason}",
            "changeset rejected: %s (version %d of actor %s)",
            reason,
            version,
            actor.hex(),
            fields={"actor_id": actor.hex(), "version": version, "reason": reason},
        )

    def malformed(self, peer: str, reason: str) -> None:
        self.rejections.log(
            f"malformed:{peer}:{reason}",
            "malformed frame from %s dropped: %s",
            peer,
            reason,
            fields={"peer": peer, "reason": reason},
        )

    def summary(self) -> tuple[str, dict[str, Any]] | None:
        """The summary line and its fields, or None when nothing moved."""
        pulled, served = sum(self.pulled.values()), sum(self.served.values())
        if not (pulled or served or self.applied_versions or self.failed or self.committed):
            return None
        parts = [f"{self.committed} local versions committed"]
        parts.append(
            f"{self.applied_versions} remote versions applied ({self.applied_changes} changes)"
        )
        syncs = f"{self.sessions} syncs asked"
        if self.failed:
            syncs += f", {sum(self.failed.values())} failed ({_per_peer(self.failed)})"
        if pulled:
            syncs += f", {pulled} changesets pulled ({_per_peer(self.pulled)})"
        parts.append(syncs)
        answered = f"{self.served_sessions} syncs answered"
        if served:
            answered += f", {served} changesets sent ({_per_peer(self.served)})"
        parts.append(answered)
        fields = {
            "committed": self.committed,
            "sessions": self.sessions,
            "pulled": pulled,
            "pulled_from": dict(sorted(self.pulled.items())),
            "failed": dict(sorted(self.failed.items())),
            "served_sessions": self.served_sessions,
            "served": served,
            "served_to": dict(sorted(self.served.items())),
            "applied_versions": self.applied_versions,
            "applied_changes": self.applied_changes,
        }
        return "; ".join(parts), fields

    def tick(self) -> None:
        """End of an interval: log the summary (if anything moved) and the throttled repeats."""
        line = self.summary()
        self._reset()
        if line is not None:
            fields = line[1]
            sync_log.info(
                "sync summary (%gs): %s", self.interval, line[0], extra={"fields": fields}
            )
        self.rejections.flush()


def _per_peer(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{peer}={n}" for peer, n in sorted(counts.items()))


def describe_frame(data: bytes) -> str:
    """A changeset frame's actor, version and seqs (for DEBUG lines), read without decoding it."""
    from ..core import changeset as cs

    header = cs.peek_changeset(data)
    if header is not None:
        actor, version, start, end = header
        return f"changeset {actor.hex()}:{version} seqs {start}..{end} ({len(data)} bytes)"
    names = {cs.K_EMPTY: "empty versions", cs.K_DIGEST: "digest", cs.K_SYNC_DONE: "sync done"}
    try:
        kind = cs.decode_frame(data)[0]
    except cs.FrameError:
        return f"malformed frame ({len(data)} bytes)"
    return f"{names.get(kind, f'frame kind {kind}')} ({len(data)} bytes)"


def frame_error(data: bytes, *, plumtree: bool = False) -> str:
    """Why a frame was dropped as malformed (decoded again: malformed frames are rare);
    ``plumtree``: whether this node runs ``gossip.broadcast = "plumtree"``."""
    from ..core import changeset as cs

    try:
        kind = cs.decode_frame(data)[0]
    except cs.FrameError as exc:
        return str(exc)
    control = {cs.K_IHAVE: "IHAVE", cs.K_GRAFT: "GRAFT", cs.K_PRUNE: "PRUNE"}.get(kind)
    if control is not None and not plumtree:
        return (f'a plumtree {control} frame, but this node runs gossip.broadcast = "fanout": '
                "every node of a cluster must use the same broadcast mode")  # fmt: skip
    if control is not None:
        return f"a plumtree {control} frame from a peer that is not a member here (yet)"
    return "unexpected frame kind"


# -- membership --------------------------------------------------------------------------------


def log_member_event(ev: Any, describe: Callable[[Any], tuple[str, str]]) -> None:
    """One line on ``corrosion.members`` for a SWIM notification (``describe(member)`` gives its
    actor id and address)."""
    import swim

    if isinstance(ev, swim.MemberRenamed):
        actor, addr = describe(ev.new)
        old = describe(ev.old)[0]
        members_log.info(
            "member restarted: %s is now actor %s"
            if actor != old
            else "member restarted: %s (actor %s)",
            addr,
            actor,
            extra={"fields": {"addr": addr, "actor_id": actor, "old": old}},
        )
        return
    if isinstance(ev, swim.IdentityRenewed):
        members_log.warning(
            "this node was declared down by the cluster and rejoined with a new identity"
        )
        return
    member = getattr(ev, "member", None)
    if member is None:
        return
    if isinstance(ev, swim.MemberUp):
        what, level = "member joined", logging.INFO
    elif isinstance(ev, swim.MemberSuspect):
        what, level = "member suspected", logging.INFO
    elif isinstance(ev, swim.MemberAlive):
        what, level = "member alive again", logging.INFO
    elif isinstance(ev, swim.MemberDown):
        left = member.state == swim.State.LEFT
        what, level = ("member left" if left else "member down"), logging.INFO
    elif isinstance(ev, swim.MemberUpdated):
        what, level = "member updated", logging.DEBUG
    else:
        return
    if not members_log.isEnabledFor(level):
        return
    actor, addr = describe(member)
    members_log.log(
        level,
        "%s: %s (actor %s)",
        what,
        addr,
        actor or "?",
        extra={"fields": {"addr": addr, "actor_id": actor, "incarnation": member.incarnation}},
    )


# -- gossip this node cannot read --------------------------------------------------------------

# swim's drop reasons that mean the two sides' gossip keys differ: what to say about each
_KEY_MISMATCH = {
    "decrypt": (
        "could not be decrypted with any of gossip.encryption_keys: a node with another key?",
        "the nodes of a cluster need a key in common in gossip.encryption_keys",
    ),
    "plaintext": (
        "came unencrypted, and this node requires gossip.encryption_keys: a node with "
        "gossip.plaintext = true?",
        "a cluster's nodes either all have gossip.encryption_keys or all run plaintext",
    ),
    "encrypted": (
        "came encrypted, and this node runs with gossip.plaintext = true: a node with "
        "gossip.encryption_keys?",
        "a cluster's nodes either all have gossip.encryption_keys or all run plaintext",
    ),
}
_KINDS = {"datagram": "datagram", "stream": "stream", "reply": "stream"}  # reply: to our stream
JOIN_WARN_AFTER = 3  # failed join attempts before saying so (seeds may still be starting)


_CA_REMEDY = (
    "every node's gossip.tls certificate must be signed by the CA in the others' "
    "gossip.tls.ca_file: make all of them with one 'corrosion tls ca generate'"
)


def _tls_problem(exc: ssl.SSLError, dialed: bool) -> tuple[str, str]:
    """What went wrong in a TLS handshake, and what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
        if "mismatch" in exc.verify_message.lower():
            return reason, (
                "a node's certificate must be valid for the address its peers dial: "
                "'corrosion tls server generate IP' with its gossip IP"
            )
        whose = "the peer's certificate" if dialed else "the peer's client certificate"
        return reason, f"{whose} is not trusted here; {_CA_REMEDY}"
    reason = (exc.reason or str(exc)).lower().replace("_", " ")
    if "alert" in reason:
        return reason, f"the peer refused this node's certificate; {_CA_REMEDY}"
    if not dialed and "certificate" in reason:
        return reason, (
            "this node runs mutual TLS, gossip.tls.client: every peer needs a client certificate "
            "from the cluster's CA in its gossip.tls.client too"
        )
    return reason, "do both nodes have gossip.tls set alike?"


class _Unreadable:
    __slots__ = ("counts", "shown", "since")

    def __init__(self, since: float, shown: str) -> None:
        self.since = since
        self.shown = shown
        self.counts = {"datagram": 0, "stream": 0}


class GossipWarnings:
    """What keeps this node out of its cluster, as warnings on ``corrosion.members``, so a key
    or certificate mismatch is not silent on either side: gossip that cannot be read with this
    node's keys, per source host (the first at once, then at most one line per ``interval``
    counting what came since, none once it stops), peer streams whose TLS handshake failed
    (per peer and reason, throttled alike), and join attempts that no seed answers."""

    def __init__(
        self, interval: float, clock: Callable[[], float] = time.monotonic, max_sources: int = 256
    ) -> None:
        self.interval, self.clock, self.max_sources = interval, clock, max_sources
        self._sources: OrderedDict[tuple[str, str], _Unreadable] = OrderedDict()
        self._join_warned: float | None = None
        self._tls = Throttled(members_log, interval, clock, max_keys=max_sources)

    def tls_failed(self, peer: str, exc: ssl.SSLError, *, dialed: bool) -> None:
        """A peer stream's TLS handshake with ``peer`` failed: ``dialed`` when this node opened
        it (to broadcast or sync), else the peer did. Without this line the only trace is a
        failed-sync count: the member is alive in SWIM (plain UDP) and nothing replicates."""
        reason, remedy = _tls_problem(exc, dialed)
        self._tls.log(
            f"{peer}:{reason}",
            "TLS with %s failed (%s): %s (%s)",
            peer,
            "dialed by this node" if dialed else "dialed by the peer",
            reason,
            remedy,
            fields={"peer": peer, "reason": reason, "dialed": dialed},
        )

    def dropped(self, source: tuple[str, int], reason: str, kind: str) -> None:
        """A datagram or stream (``kind``: ``datagram``, ``stream`` or ``reply``, as
        ``swim.SwimNode.on_dropped`` gives) from ``source`` was dropped for ``reason``."""
        if reason not in _KEY_MISMATCH:
            return  # another cluster's label, or garbage: not a key problem
        host = str(source[0])
        # a stream request comes from an ephemeral port: only datagrams and replies to our
        # streams show the sender's gossip port
        shown = host if kind == "stream" else format_addr((host, source[1]))
        now = self.clock()
        entry = self._sources.get((host, reason))
        if entry is None:
            entry = self._sources[(host, reason)] = _Unreadable(now, shown)
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
            entry.counts[_KINDS.get(kind, "stream")] += 1
            self._emit(reason, entry, window=False)
            return
        if kind != "stream":
            entry.shown = shown
        entry.counts[_KINDS.get(kind, "stream")] += 1
        if now - entry.since >= self.interval:
            self._emit(reason, entry, window=True)

    def join_unanswered(self, seeds: list[str], attempts: int) -> None:
        """``attempts`` joins in a row got no answer from any of ``seeds`` that this node could
        read (refused, timed out, or dropped by a seed with another key). At most one line per
        interval: each says how many attempts failed so far."""
        now = self.clock()
        if attempts < JOIN_WARN_AFTER or (
            self._join_warned is not None and now - self._join_warned < self.interval
        ):
            return
        self._join_warned = now
        listed = ", ".join(seeds[:5]) + (f" and {len(seeds) - 5} more" if len(seeds) > 5 else "")
        members_log.warning(
            "no answer from bootstrap %s after %d attempts: is it running, and does it share "
            "gossip.encryption_keys (and gossip.cluster_id)?",
            listed,
            attempts,
            extra={"fields": {"seeds": seeds, "attempts": attempts}},
        )

    def flush(self) -> None:
        """Report what came from each source since its last line once the interval is over;
        forget quiet sources."""
        self._tls.flush()
        now = self.clock()
        for key, entry in list(self._sources.items()):
            if now - entry.since < self.interval:
                continue
            if any(entry.counts.values()):
                self._emit(key[1], entry, window=True)
            else:
                del self._sources[key]

    def _emit(self, reason: str, entry: _Unreadable, *, window: bool) -> None:
        counts, now = entry.counts, self.clock()
        elapsed, entry.since = now - entry.since, now
        entry.counts = {k: 0 for k in counts}
        if not members_log.isEnabledFor(logging.WARNING):
            return
        parts = [f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in counts.items() if n]
        problem, remedy = _KEY_MISMATCH[reason]
        members_log.warning(
            "%s from %s%s %s (%s)",
            " and ".join(parts).replace(" ", " gossip ", 1),
            entry.shown,
            f" in the last {elapsed:.0f}s" if window else "",
            problem,
            remedy,
            extra={
                "fields": {
                    "source": entry.shown,
                    "reason": reason,
                    "datagrams": counts["datagram"],
                    "streams": counts["stream"],
                }
            },
        )
