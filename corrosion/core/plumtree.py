"""Plumtree: epidemic broadcast trees (Leitão, Pereira, Rodrigues 2007) as a sans-IO core.

Theory of operation
===================

Fan-out gossip (``replication`` rule B1/B2) sends every changeset to a few random peers from
every node that receives it, so each node receives it several times. Plumtree sends the full
message only along the edges of a spanning tree (*eager* push) and just its id to a few other
peers (*lazy* push, batched into IHAVE frames); a node that hears of a message by IHAVE but did
not receive it asks the announcer for it (GRAFT), which also makes that link part of the tree.
A node that receives a message twice by eager push tells the second sender to stop (PRUNE):
links whose copies come in late leave the tree. Once the tree has formed, each node receives
each message about once.

A :class:`Plumtree` never touches a socket or a clock. The host (``Replicator``) feeds it what
arrived with ``now`` and sends the :class:`PeerFrame` values it returns; it reads
:attr:`Plumtree.wake_at` after each call and calls :meth:`Plumtree.tick` then. Randomness comes
from an injected ``random.Random``; peers are sampled from lists sorted by actor id.

Choices (where the paper leaves room, or assumes a partial view)
================================================================

P1  Full membership. The paper runs over HyParView's small active view; here every node knows
    every member (SWIM), so a node picks its eager and lazy peers at random among them, and a
    member going down is dropped from every set (its subtree repairs itself by GRAFT).
P2  One tree per origin. Every node writes, and a tree shared by all origins makes the path from
    one origin to another node as long as the tree's diameter; riak_core's plumtree keeps one
    tree per root for the same reason. A node's eager and lazy sets are therefore per origin
    actor (:class:`_Tree`), created on the first message of that origin: ``eager_fanout`` eager
    and ``lazy_fanout`` lazy peers; the origin itself pushes its own messages eagerly to
    ``max(eager_fanout, ~sqrt(n))`` peers, so the tree is shallow (each hop costs a delay).
P3  Links are one-way. Receiving a message from a peer does not make that peer eager (it is
    upstream in that origin's tree); only a GRAFT from a peer puts it in our eager set.
P4  PRUNE on a duplicate eager receipt: the receiver tells the sender to move it to lazy, and
    drops the sender from its own eager set for that origin. A duplicate of a message that
    arrived by sync (not by broadcast) prunes nothing: the sender may well be our parent; nor
    does a second copy from the node that sent the first (the answer to a repeated GRAFT, or a
    datagram the network duplicated): pruning it would cut us off the tree.
P5  Lazy peers come from a ring, not from chance: in origin R's tree a node announces to the
    ``lazy_fanout`` members that follow it when all members are ordered by ``actor XOR R``
    (skipping its eager peers). Every node then hears IHAVEs from exactly ``lazy_fanout``
    predecessors (random picks leave e^-k of the nodes with no announcer at all, and those
    wait for sync when their eager copy is lost), and IHAVE bytes per message per node are
    bounded by ``lazy_fanout`` ids. The lazy set is worked out again whenever the eager set
    changes, so a ring successor that was eager and is pruned goes back to IHAVEs (without
    that, a node whose announcers both adopted and then lost it would hear of nothing).
P6  IHAVE announcements are batched per peer and flushed every ``ihave_interval``. A node that
    learns of a message it lacks waits ``graft_timeout`` (the eager copy may be on its way),
    then GRAFTs the first announcer, then the next one (round robin) every 2 x ``graft_timeout``
    until the message arrives or ``GRAFT_ATTEMPTS`` were sent; sync (``replication`` S1) still
    repairs what broadcast misses.
P7  A delivered message's frame is kept ``message_ttl`` seconds (the newest ``max_kept`` at
    most) to answer GRAFTs; a GRAFT for an older one is not answered (the grafting node tries
    another announcer, then sync).
P8  A member that comes up or goes down changes the rings: each tree's lazy set is worked
    out again on its next use, so a new member is announced to (and grafts itself into every
    tree) and a gone one is no longer.

Wire: IHAVE and GRAFT carry lists of message ids ``[actor, version, seq_start, seq_end]`` (one
changeset chunk), PRUNE a list of origin actors; the sender is known from the peer stream (the
transport's hello), so frames do not repeat it. The eager messages are the changeset frames
themselves. A node in fan-out mode drops the three control kinds as malformed: the mode is a
cluster-wide setting (``gossip.broadcast``).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .changeset import K_GRAFT, K_IHAVE, K_PRUNE, encode_control

__all__ = ["MsgId", "PeerFrame", "Plumtree", "PlumtreeConfig", "PlumtreeStats"]

RING_SPARE = 4  # ring successors kept beyond lazy_fanout, to stand in for eager ones
GRAFT_ATTEMPTS = 6  # GRAFTs sent for one missing message before leaving it to sync

MsgId = tuple[bytes, int, int, int]
"""(origin actor, version, seq start, seq end): one changeset chunk."""


@dataclass(frozen=True, slots=True)
class PeerFrame:
    """Send ``data`` to the peer whose actor id is ``actor``."""

    actor: bytes
    data: bytes


@dataclass
class PlumtreeConfig:
    """Knobs (seconds where a time)."""

    eager_fanout: int = 4  # eager peers of a new tree (fewer after PRUNEs, more after GRAFTs)
    lazy_fanout: int = 2  # lazy peers of a tree: IHAVE targets, at most this many
    ihave_interval: float = 0.05  # IHAVE batches are flushed this often
    graft_timeout: float = 0.1  # wait this long for the eager copy before GRAFTing
    message_ttl: float = 30.0  # a delivered message's frame is kept this long for GRAFTs
    max_kept: int = 20_000  # ...and only the newest this many (memory stays bounded)

    def __post_init__(self) -> None:
        if self.eager_fanout < 1 or self.lazy_fanout < 0:
            raise ValueError("plumtree needs eager_fanout >= 1 and lazy_fanout >= 0")
        if min(self.ihave_interval, self.graft_timeout, self.message_ttl, self.max_kept) <= 0:
            raise ValueError("plumtree intervals must be positive")


@dataclass
class PlumtreeStats:
    eager_sent: int = 0
    ihave_ids_sent: int = 0
    grafts_sent: int = 0
    grafts_answered: int = 0
    prunes_sent: int = 0
    prunes_received: int = 0


@dataclass
class _Tree:
    """One origin's tree as this node sees it (dicts: insertion order, never set order)."""

    eager: dict[bytes, None] = field(default_factory=dict)
    lazy: dict[bytes, None] = field(default_factory=dict)
    ring: int = -1  # the membership generation ``after`` was worked out for (P5, P8)
    after: list[bytes] = field(default_factory=list)  # the next members on the ring (P5)


@dataclass
class _Missing:
    """A message announced by IHAVE that we lack: whom to GRAFT, and when next."""

    announcers: list[bytes]
    due: float
    grafts: int = 0


class Plumtree:
    """One node's Plumtree state. ``have(id)``: whether the host already holds (or has queued)
    that chunk by any path, broadcast or sync."""

    def __init__(
        self,
        actor: bytes,
        config: PlumtreeConfig,
        rng: random.Random,
        have: Callable[[MsgId], bool],
    ) -> None:
        self.actor = actor
        self.config = config
        self.rng = rng
        self.have = have
        self.stats = PlumtreeStats()
        self._peers: dict[bytes, None] = {}
        self._sorted: list[bytes] | None = None
        self._ring = 0  # membership generation
        self._by_int: dict[int, bytes] = {int.from_bytes(actor): actor}  # members and us
        self._trees: dict[bytes, _Tree] = {}
        # delivered by broadcast: id -> (expiry, frame); insertion order is expiry order
        self._delivered: dict[MsgId, tuple[float, bytes, bytes | None]] = {}  # + first sender
        self._missing: dict[MsgId, _Missing] = {}
        self._ihave: dict[bytes, list[MsgId]] = {}
        self._ihave_at: float | None = None

    # -- membership (P1, P8) ----------------------------------------------------------------

    def peer_up(self, actor: bytes) -> None:
        if actor == self.actor or actor in self._peers:
            return
        self._peers[actor] = None
        self._by_int[int.from_bytes(actor)] = actor
        self._sorted = None
        self._ring += 1

    def peer_down(self, actor: bytes) -> None:
        if self._peers.pop(actor, None) is None:
            return
        del self._by_int[int.from_bytes(actor)]
        self._sorted = None
        self._ring += 1
        for tree in self._trees.values():
            tree.eager.pop(actor, None)
            tree.lazy.pop(actor, None)
        self._ihave.pop(actor, None)
        for m in self._missing.values():
            if actor in m.announcers:
                m.announcers.remove(actor)

    @property
    def peers(self) -> list[bytes]:
        """Known peers, sorted (sampling from this keeps runs deterministic)."""
        if self._sorted is None:
            self._sorted = sorted(self._peers)
        return self._sorted

    def tree(self, root: bytes) -> _Tree:
        """``root``'s tree, created (P2) on first use, its lazy set up to date (P5, P8)."""
        tree = self._trees.get(root)
        if tree is None:
            tree = self._trees[root] = self._new_tree(root)
        if tree.ring != self._ring:
            tree.after = self._ring_after(root)
            tree.ring = self._ring
            self._refresh_lazy(tree)
        return tree

    def _new_tree(self, root: bytes) -> _Tree:
        peers = self.peers
        eager_n = self.config.eager_fanout
        if root == self.actor:
            eager_n = max(eager_n, math.isqrt(len(peers)) + 1)
        chosen = self.rng.sample(peers, min(len(peers), eager_n + 1))  # one spare: the root
        return _Tree(eager=dict.fromkeys([a for a in chosen if a != root][:eager_n]))

    def _ring_after(self, root: bytes) -> list[bytes]:
        """The members after this node on ``root``'s ring (P5): ``lazy_fanout`` of them and a
        few spare, to skip those that are eager."""
        want = self.config.lazy_fanout
        if want == 0:
            return []
        # the ring orders members by ``actor XOR root``; XOR is its own inverse, so the keys
        # map back to actors, and the successors are the smallest keys above ours (then, past
        # the top, the smallest ones): O(n), no sort of the whole membership
        r = int.from_bytes(root)
        mine = int.from_bytes(self.actor) ^ r
        keys = [i ^ r for i in self._by_int]
        k = want + RING_SPARE + 1
        after = heapq.nsmallest(k, [x for x in keys if x > mine])
        if len(after) < k:
            after += heapq.nsmallest(k - len(after), [x for x in keys if x < mine])
        by_int = self._by_int
        return [a for x in after if (a := by_int[x ^ r]) != root]

    def _refresh_lazy(self, tree: _Tree) -> None:
        """Lazy peers: the first ``lazy_fanout`` members after us on the ring that are not
        eager (worked out again whenever the eager set or the ring changes)."""
        want = self.config.lazy_fanout
        lazy: dict[bytes, None] = {}
        for a in tree.after:
            if len(lazy) == want:
                break
            if a not in tree.eager:
                lazy[a] = None
        tree.lazy = lazy

    def snapshot(self) -> dict[str, Any]:
        """What an operator asks of the trees (``corrosion plumtree stats``, ``/metrics``): the
        counters since start and the state now. Origins in sorted order, so the answer is the
        same for the same state."""
        trees = {
            root.hex(): {"eager": [a.hex() for a in t.eager], "lazy": [a.hex() for a in t.lazy]}
            for root, t in sorted(self._trees.items())
        }
        return {
            **asdict(self.stats),
            "peers": len(self._peers),
            "trees": trees,
            "eager_links": sum(len(t.eager) for t in self._trees.values()),
            "lazy_links": sum(len(t.lazy) for t in self._trees.values()),
            "missing": len(self._missing),
            "delivered_kept": len(self._delivered),
        }

    # -- sending and receiving messages ------------------------------------------------------

    def broadcast(
        self, ids: Sequence[MsgId], frames: Sequence[bytes], now: float
    ) -> list[PeerFrame]:
        """This node's own new message (one id and frame per chunk)."""
        out: list[PeerFrame] = []
        for mid, frame in zip(ids, frames, strict=True):
            out += self._deliver(None, mid, frame, now)
        return out

    def on_message(
        self, sender: bytes | None, mid: MsgId, frame: bytes, now: float
    ) -> list[PeerFrame]:
        """The first copy of ``mid`` arrived by eager push (or in answer to a GRAFT) from
        ``sender``: forward it down the tree and announce it to the lazy peers."""
        self._missing.pop(mid, None)
        return self._deliver(sender, mid, frame, now)

    def _deliver(
        self, sender: bytes | None, mid: MsgId, frame: bytes, now: float
    ) -> list[PeerFrame]:
        self._expire(now)
        self._delivered[mid] = (now + self.config.message_ttl, frame, sender)
        if len(self._delivered) > self.config.max_kept:
            del self._delivered[next(iter(self._delivered))]
        tree = self.tree(mid[0])
        out = [PeerFrame(a, frame) for a in tree.eager if a != sender and a != mid[0]]
        self.stats.eager_sent += len(out)
        for a in tree.lazy:
            if a != sender and a != mid[0]:
                self._ihave.setdefault(a, []).append(mid)
        if self._ihave and self._ihave_at is None:
            self._ihave_at = now + self.config.ihave_interval
        return out

    def on_duplicate(self, sender: bytes | None, mid: MsgId) -> list[PeerFrame]:
        """A copy of a message we already hold came from ``sender`` (P4)."""
        held = self._delivered.get(mid)
        if sender is None or held is None or sender not in self._peers or held[2] == sender:
            return []  # the first sender again: a repeated GRAFT's answer, not a second path
        tree = self.tree(mid[0])
        if sender in tree.eager:
            del tree.eager[sender]
            self._refresh_lazy(tree)
        self.stats.prunes_sent += 1
        return [PeerFrame(sender, encode_control(K_PRUNE, [mid[0]]))]

    def on_ihave(self, sender: bytes, ids: Iterable[MsgId], now: float) -> None:
        for mid in ids:
            if mid in self._delivered or mid[0] == self.actor or self.have(mid):
                continue
            missing = self._missing.get(mid)
            if missing is None:
                self._missing[mid] = _Missing([sender], now + self.config.graft_timeout)
            elif sender not in missing.announcers:
                missing.announcers.append(sender)

    def on_graft(self, sender: bytes, ids: Iterable[MsgId], now: float) -> list[PeerFrame]:
        """``sender`` lacks ``ids``: it joins our eager set of their trees, and gets them."""
        self._expire(now)
        out: list[PeerFrame] = []
        for mid in ids:
            if sender in self._peers and mid[0] != sender:
                tree = self.tree(mid[0])
                tree.lazy.pop(sender, None)
                tree.eager[sender] = None
            held = self._delivered.get(mid)
            if held is not None:
                out.append(PeerFrame(sender, held[1]))
        self.stats.grafts_answered += len(out)
        return out

    def on_prune(self, sender: bytes, roots: Iterable[bytes]) -> None:
        self.stats.prunes_received += 1
        for root in roots:
            tree = self._trees.get(root)
            if tree is not None and sender in tree.eager:
                del tree.eager[sender]
                self._refresh_lazy(tree)  # a ring successor goes back to IHAVEs

    # -- timers (P6) -----------------------------------------------------------------------

    @property
    def wake_at(self) -> float | None:
        """When :meth:`tick` has work next (None: nothing pending)."""
        times = [m.due for m in self._missing.values()]
        if self._ihave_at is not None:
            times.append(self._ihave_at)
        return min(times) if times else None

    def tick(self, now: float) -> list[PeerFrame]:
        out: list[PeerFrame] = []
        if self._ihave_at is not None and self._ihave_at <= now:
            self._ihave_at = None
            for actor, ids in self._ihave.items():
                out.append(PeerFrame(actor, encode_control(K_IHAVE, [list(m) for m in ids])))
                self.stats.ihave_ids_sent += len(ids)
            self._ihave = {}
        grafts: dict[bytes, list[MsgId]] = {}
        for mid, m in list(self._missing.items()):
            if m.due > now:
                continue
            if (
                not m.announcers
                or m.grafts >= GRAFT_ATTEMPTS
                or mid in self._delivered
                or self.have(mid)
            ):
                del self._missing[mid]
                continue
            target = m.announcers.pop(0)
            m.announcers.append(target)  # round robin: a GRAFT or its answer can be lost too
            m.grafts += 1
            # the answer takes a round trip: retry after two timeouts, not one (a retry that
            # crosses the answer only costs a duplicate)
            m.due = now + 2 * self.config.graft_timeout
            grafts.setdefault(target, []).append(mid)
            tree = self.tree(mid[0])  # the announcer becomes our parent in that tree
            tree.lazy.pop(target, None)
        for actor, ids in grafts.items():
            out.append(PeerFrame(actor, encode_control(K_GRAFT, [list(m) for m in ids])))
            self.stats.grafts_sent += 1
        return out

    def _expire(self, now: float) -> None:
        delivered = self._delivered
        while delivered:
            mid = next(iter(delivered))
            if delivered[mid][0] > now:
                break
            del delivered[mid]

    # -- introspection (tests, metrics) ------------------------------------------------------

    def eager_peers(self, root: bytes) -> list[bytes]:
        tree = self._trees.get(root)
        return list(tree.eager) if tree else []

    def lazy_peers(self, root: bytes) -> list[bytes]:
        tree = self._trees.get(root)
        return list(tree.lazy) if tree else []

    @property
    def missing(self) -> int:
        return len(self._missing)


def decode_ids(fields: list) -> list[MsgId] | None:
    """The ids of an IHAVE or GRAFT frame's fields, or None when malformed."""
    if len(fields) != 1 or not isinstance(fields[0], list):
        return None
    ids: list[MsgId] = []
    for entry in fields[0]:
        if not (isinstance(entry, list) and len(entry) == 4):
            return None
        actor, version, start, end = entry
        if type(actor) is not bytes or len(actor) != 16:
            return None
        if type(version) is not int or type(start) is not int or type(end) is not int:
            return None
        ids.append((actor, version, start, end))
    return ids


def decode_roots(fields: list) -> list[bytes] | None:
    """The origins of a PRUNE frame's fields, or None when malformed."""
    if len(fields) != 1 or not isinstance(fields[0], list):
        return None
    roots = fields[0]
    if not all(type(r) is bytes and len(r) == 16 for r in roots):
        return None
    return list(roots)
