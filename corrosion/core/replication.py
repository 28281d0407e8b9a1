"""Replication as a sans-IO state machine: broadcast, apply queue and anti-entropy sync.

Theory of operation
===================

A :class:`Replicator` is one node's replication logic. Like ``swim.Membership`` it never touches a
socket or a clock: the host feeds it events with ``now`` and performs the effects it returns
(:class:`SendFrame`, :class:`StartSync`, :class:`SetTimer`). Randomness comes from an injected
``random.Random``; peers are chosen from lists sorted by actor id. It does use the node's
database (``corrosion.core.store.Store``) directly and synchronously: the runtime calls its database
halves from a worker thread, the simulator inline.

Ownership
=========

O1  Everything in memory here (queue, queued keys, peers, timers, stats, the HLC) and the
    store's bookie belong to the host's event loop: only the loop changes them.
O2  A worker thread runs only the database halves — ``apply_batch``, ``Store.execute_local``,
    ``sync_answer`` — which read that state and return what they did, changing nothing.
O3  The loop installs each result with one call, ``install_apply`` (bookkeeping, queued keys,
    stats) or ``install_commit`` (bookkeeping, broadcast), before the next database half may
    run (the agent holds its database lock across both), so each reads the bookkeeping of the
    ones before it and none reads it while the loop changes it. The simulator makes the same
    calls, inline.

Rules
=====

B1  A local transaction that changed replicated data is a new version of this actor (store.py
    books it in the same commit). Its chunks are sent at once to ``max(fanout, ~sqrt(n))``
    random peers, then again to ``fanout`` other peers every ``broadcast_interval * round`` for
    ``max_transmissions`` rounds (corrosion's gossip mode, ``_broadcast_round``).
B2  A received chunk is dropped (and counted) when malformed, from another cluster, our own, or
    already held or queued (checked on the frame's header, before decoding its changes).
    Otherwise it is queued for apply and, when it came by broadcast, re-broadcast once: to
    ``fanout`` peers other than its origin, and ``fanout`` more ``broadcast_interval`` later
    (``relay_rounds``; with one round, push-once epidemics miss about e^-fanout of the nodes)
    (``handle_frame``).
B4  Push-once epidemics miss a few nodes (about e^-fanout of them), and periodic sync alone would
    leave those behind for up to ``max_sync_backoff``. So every ``digest_interval`` a node that
    booked a new version sends ``fanout`` random peers a digest of that actor's head, a few times
    (``digest_repeats``); a peer still lacking it (neither held nor queued) ``digest_grace``
    later — the broadcast is usually just behind — syncs with the sender (``_on_digest_tick``,
    ``_on_digest``). Quiet clusters send no digests.
B5  With ``broadcast_mode = "plumtree"`` (a cluster-wide choice) B1, B2 and B4 give way to
    epidemic broadcast trees (``plumtree``): a local version is pushed along its origin's tree
    and announced by IHAVE; a received chunk is forwarded down the tree, a duplicate PRUNEs
    its sender, and IHAVE/GRAFT repair what the tree lost. The control frames name no sender:
    the host says who sent each frame (``handle_frame``'s ``src`` or ``sender``).
B3  Queued chunks are applied in batches, one transaction each (``apply_pending``): complete
    versions merge, partial ones are buffered until all their seqs are present, versions skipped
    over become gaps.
S1  Every sync interval (backoff from ``min_sync_backoff`` doubling to ``max_sync_backoff``, ±30 %
    jitter) the node sends its sync state (per actor: head, gaps, partial seqs) to up to
    ``sync_peers`` random peers not already syncing (``_on_sync_tick``).
S2  A node asked to sync answers with every version it holds that the asker lacks — chunks, or
    empty notices for versions whose changes were all superseded — up to a budget per round,
    then a done frame (``serve_sync``). Answers are applied like broadcasts but never relayed.
    Sync alone makes any two connected nodes converge; broadcast only makes it fast.
T1  Trace contexts are opaque bytes here (the runtime makes the spans). A local version given
    one (``install_commit``) carries it in each of its chunks; a received chunk that carries one
    is relayed with it. Either way the node remembers it for the version (at least the last
    ``TRACE_MEMORY`` traced versions), so a sync answer serving that version carries it too. A frame
    with the field goes only to peers whose metadata say they accept it (``Peer.trailing``);
    the others get it without (``without_trailing``).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import msgpack

import swim

from .bookie import validate_sync_state
from .changeset import (
    K_CHANGESET,
    K_DIGEST,
    K_EMPTY,
    K_GRAFT,
    K_HELLO,
    K_IHAVE,
    K_PRUNE,
    K_REJECT,
    K_SYNC_DONE,
    K_SYNC_REQUEST,
    MSGPACK_ERRORS,
    TRAILING_FIELDS,
    Changeset,
    EmptyVersions,
    FrameError,
    changeset_header,
    chunk_version,
    decode_frame,
    encode,
    encode_control,
    frame_of,
    unpack_frame,
    without_trailing,
)
from .hlc import HybridClock
from .plumtree import MsgId, PeerFrame, Plumtree, PlumtreeConfig, decode_ids, decode_roots
from .store import ApplyResult, LocalCommit, Statement, StatementResult, Store
from .tombstones import Watermark, hear_floors

Address = tuple[str, int]

TRACE_MEMORY = 1024  # versions whose trace context is remembered for sync answers (T1)


# -- effects and timers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Send one broadcast frame to the peer at ``addr`` (its peer-stream address)."""

    addr: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class StartSync:
    """Open a sync stream to ``addr``, send ``request``, feed every frame of the answer to
    ``handle_sync_frame`` and finally call ``sync_finished``."""

    addr: Address
    request: bytes


@dataclass(frozen=True, slots=True)
class SyncTick:
    token: int


@dataclass(frozen=True, slots=True)
class BroadcastTick:
    token: int


@dataclass(frozen=True, slots=True)
class DigestTick:
    token: int


@dataclass(frozen=True, slots=True)
class PlumtreeTick:
    token: int


Timer = SyncTick | BroadcastTick | DigestTick | PlumtreeTick


@dataclass(frozen=True, slots=True)
class SetTimer:
    timer: Timer
    at: float


Effect = SendFrame | StartSync | SetTimer


@dataclass
class ReplicationConfig:
    """Knobs; defaults follow corrosion."""

    cluster_id: int = 0
    min_sync_backoff: float = 1.0  # seconds before the first sync rounds
    max_sync_backoff: float = 15.0  # the interval sync backs off to
    sync_peers: int = 3  # peers asked per sync round
    max_syncs_in_flight: int = 3
    sync_budget_versions: int = 2000  # versions served per sync answer, at most
    broadcast: bool = True  # False: sync only (no broadcasts, relays or digests sent)
    fanout: int = 3  # peers per broadcast round (corrosion: num_indirect_probes)
    relay_rounds: int = 2  # rounds a relayed version is sent (each to fanout new peers)
    broadcast_interval: float = 0.1  # round k is sent k * this after the commit
    retransmit_mult: int = 4  # local versions: rounds = mult * ceil(log10(n + 1))
    max_queue: int = 20_000  # queued chunks beyond this are dropped (sync recovers them)
    digest_interval: float = 0.1  # seconds between digests of recently booked heads
    digest_window: float = 2.0  # a digest-announced head not received is forgotten after 10x this
    digest_repeats: int = 3  # digests sent about one head (to fanout random peers each time)
    digest_grace: float = 0.15  # a head still missing this long after a digest: sync for it
    # "fanout" (B1, B2, B4) or "plumtree" (B5): a cluster-wide choice, the two do not mix
    broadcast_mode: str = "fanout"
    plumtree: PlumtreeConfig = field(default_factory=PlumtreeConfig)

    def __post_init__(self) -> None:
        if self.broadcast_mode not in BROADCAST_MODES:
            raise ValueError(f"broadcast_mode must be one of {BROADCAST_MODES}")


BROADCAST_MODES = ("fanout", "plumtree")


@dataclass
class Peer:
    actor: bytes
    addr: Address  # peer-stream (TCP) address
    trailing: bool = False  # accepts changeset frames with optional trailing fields (T1)


@dataclass
class _Pending:
    frames: list[bytes]
    sent_to: set[bytes]
    rounds_left: int
    round: int
    due: float
    local: bool = False  # a version of this node (not a relay)
    legacy: list[bytes] | None = None  # the frames cut to ten fields, once a peer needs them

    def frames_for(self, peer: Peer) -> list[bytes]:
        if peer.trailing:
            return self.frames
        if self.legacy is None:
            self.legacy = [without_trailing(f) for f in self.frames]
        return self.legacy


@dataclass
class Stats:
    malformed: int = 0
    other_cluster: int = 0
    duplicates: int = 0
    dropped_queue_full: int = 0
    relayed: int = 0
    broadcasts_sent: int = 0
    syncs_started: int = 0
    syncs_served: int = 0
    digests_sent: int = 0
    digest_syncs: int = 0  # syncs started because a digest showed we lacked something
    sync_frames_received: int = 0
    rejected_changesets: int = 0
    applied_versions: int = 0
    changes_applied: int = 0


@dataclass(slots=True)
class _Queued:
    item: Changeset | EmptyVersions
    relay: bool


@dataclass(frozen=True, slots=True)
class SyncAnswer:
    """A sync request accepted (``open_sync``): the requester's sync state, whether it accepts
    trace contexts in changesets, and (``with_traces``) the ones to put in those served."""

    state: dict[bytes, Any]
    trailing: bool = False
    traces: dict[tuple[bytes, int], bytes] | None = None


@dataclass
class Replicator:
    store: Store
    config: ReplicationConfig
    rng: random.Random
    clock_ms: Any  # () -> int, physical milliseconds for the HLC
    peers: dict[bytes, Peer] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self.actor = self.store.actor_id
        self.hlc = HybridClock(self.clock_ms)
        self.queue: list[_Queued] = []
        self._queued_keys: set[tuple[bytes, int, int, int]] = set()
        self._pending: list[_Pending] = []
        self._token = 1
        self._backoff = self.config.min_sync_backoff
        self._syncing: dict[Address, float] = {}
        self._broadcast_timer_at: float | None = None
        self._recent: dict[bytes, float] = {}  # actor -> when a version of it was last booked
        self._digested: dict[bytes, tuple[int, int]] = {}  # actor -> (head, digests sent of it)
        # (actor, head) a digest showed us lacking -> (when first seen, who has it)
        self._expected: dict[tuple[bytes, int], tuple[float, bytes]] = {}
        # (actor, version) -> its trace context, the last TRACE_MEMORY traced versions (T1)
        self.traces: dict[tuple[bytes, int], bytes] = {}
        self.watermark = Watermark(self.actor)  # members' heads, for tombstone GC
        self._actor_at: dict[Address, bytes] = {}  # peer address -> actor (who sent a frame)
        self._peer_list: list[Peer] | None = None  # peers sorted by actor (``_sorted_peers``)
        self.plumtree: Plumtree | None = None
        if self.config.broadcast and self.config.broadcast_mode == "plumtree":
            self.plumtree = Plumtree(self.actor, self.config.plumtree, self.rng, self._holds)
        self._plumtree_timer_at: float | None = None

    # -- lifecycle and membership ----------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        effects: list[Effect] = [
            SetTimer(SyncTick(self._token), now + self._jitter(self.config.min_sync_backoff))
        ]
        if self.config.broadcast and self.plumtree is None:
            # digests belong to fan-out's push path: none in sync-only mode, and none with
            # plumtree, whose IHAVE/GRAFT do their job
            effects.append(
                SetTimer(DigestTick(self._token), now + self._jitter(self.config.digest_interval))
            )
        return effects

    def note_booked(self, actor: bytes, now: float) -> None:
        """A version of ``actor`` was booked here (local commit or apply): digest its head."""
        self._recent[actor] = now

    def member_event(self, event: swim.Notification) -> list[swim.Member]:
        """Follow a SWIM membership event: a member of this cluster that is up (or alive again,
        or updated, or the new identity of a renamed one) is a peer at the address its metadata
        advertises; one that is down, or the old identity of a renamed one, is a peer no more.
        Returns the members whose state the host remembers (``Store.save_member``). The agent
        and the simulator both call this: it is the one translation of members into peers."""
        if isinstance(event, swim.MemberDown):
            gone = decode_meta(event.member.meta)
            if gone is None:
                return []
            self.member_down(gone[0])
            self.watermark.member_down(gone[0], left=event.member.state is swim.State.LEFT)
            return [event.member]
        if isinstance(event, swim.MemberRenamed):
            old = decode_meta(event.old.meta)
            if old is not None:
                self.member_down(old[0])
            member = event.new
        elif isinstance(event, swim.MemberUp | swim.MemberAlive | swim.MemberUpdated):
            member = event.member
        else:
            return []
        info = decode_meta(member.meta)
        if info is None or info[2] != self.config.cluster_id:
            return []
        trailing = meta_trailing_fields(member.meta) >= 1
        self.member_up(info[0], peer_address(member.addr, info[1]), trailing=trailing)
        return [member]

    def member_up(self, actor: bytes, addr: Address, *, trailing: bool = False) -> None:
        if actor != self.actor:
            old = self.peers.get(actor)
            if old is not None and self._actor_at.get(old.addr) == actor:
                del self._actor_at[old.addr]
            self.peers[actor] = Peer(actor, addr, trailing)
            self._peer_list = None
            self._actor_at[addr] = actor
            self.watermark.member_up(actor)
            if self.plumtree is not None:
                self.plumtree.peer_up(actor)

    def member_down(self, actor: bytes) -> None:
        peer = self.peers.pop(actor, None)
        self._peer_list = None
        if peer is not None and self._actor_at.get(peer.addr) == actor:
            del self._actor_at[peer.addr]
        if self.plumtree is not None:
            self.plumtree.peer_down(actor)

    def _sorted_peers(self) -> list[Peer]:
        if self._peer_list is None:  # kept until the peers change: sorting 1,000 costs a ms
            self._peer_list = [self.peers[a] for a in sorted(self.peers)]
        return self._peer_list

    def _jitter(self, seconds: float) -> float:
        return seconds * self.rng.uniform(0.7, 1.3)

    # -- local writes (B1) ----------------------------------------------------------------

    def execute(
        self, statements: Sequence[Statement], now: float
    ) -> tuple[list[StatementResult], LocalCommit | None, list[Effect]]:
        """Run a local transaction and broadcast it (the runtime splits the two: the database
        part runs in a worker thread, ``install_commit`` on the event loop)."""
        results, commit = self.store.execute_local(statements, self.hlc.now())
        return results, commit, self.install_commit(commit, now)

    def install_commit(
        self, commit: LocalCommit | None, now: float, trace: bytes | None = None
    ) -> list[Effect]:
        """Book a local transaction's version and broadcast it (O3: on the loop, before the next
        transaction runs); its chunks carry ``trace`` (T1)."""
        effects: list[Effect] = []
        if commit is not None:
            self.store.install(commit)
            self.note_booked(self.actor, now)
            if trace is not None:
                self._remember_trace(self.actor, commit.version, trace)
        if commit is not None and self.config.broadcast:
            chunks = chunk_version(
                self.actor,
                commit.version,
                commit.changes,
                commit.last_seq,
                commit.ts,
                commit.db_version,
                trace=trace,
            )
            frames = [encode(c) for c in chunks]
            if self.plumtree is not None:
                ids = [(c.actor, c.version, c.seqs[0], c.seqs[1]) for c in chunks]
                return effects + self._plumtree_out(self.plumtree.broadcast(ids, frames, now))
            effects += self._broadcast(
                frames, exclude=set(), rounds=self.max_rounds(), now=now, local=True
            )
        return effects

    def _remember_trace(self, actor: bytes, version: int, trace: bytes) -> None:
        traces = self.traces
        traces[(actor, version)] = trace
        if len(traces) >= 2 * TRACE_MEMORY:
            # keep the newest (dicts keep insertion order), all at once: removing the oldest
            # one by one would scan the dict's deleted slots to find it each time
            self.traces = dict(list(traces.items())[-TRACE_MEMORY:])

    def max_rounds(self) -> int:
        """Broadcast rounds of a local version: ``retransmit_mult * ceil(log10(n + 1))``."""
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(len(self.peers) + 2)))

    def _broadcast(
        self,
        frames: list[bytes],
        *,
        exclude: set[bytes],
        rounds: int,
        now: float,
        local: bool = False,
    ) -> list[Effect]:
        pending = _Pending(frames, set(exclude), rounds, 0, now, local)
        effects = self._broadcast_round(pending, now)
        if pending.rounds_left > 0:
            self._pending.append(pending)
            effects += self._arm_broadcast_timer(pending.due)
        return effects

    def _broadcast_round(self, p: _Pending, now: float) -> list[Effect]:
        candidates = [peer for peer in self._sorted_peers() if peer.actor not in p.sent_to]
        fanout = self.config.fanout
        if p.round == 0 and p.local:
            # the origin's first round reaches ~sqrt(n) peers at once: the epidemic then needs
            # one or two relay hops fewer to cover the cluster (each hop costs a scheduling delay)
            fanout = max(fanout, math.isqrt(len(self.peers) - 1) + 1 if self.peers else fanout)
        chosen = self.rng.sample(candidates, min(fanout, len(candidates)))
        effects: list[Effect] = []
        for peer in chosen:
            p.sent_to.add(peer.actor)
            for frame in p.frames_for(peer):
                effects.append(SendFrame(peer.addr, frame))
        self.stats.broadcasts_sent += len(chosen)
        p.round += 1
        p.rounds_left -= 1
        p.due = now + self.config.broadcast_interval * p.round
        if not candidates:
            p.rounds_left = 0
        return effects

    def _arm_broadcast_timer(self, at: float) -> list[Effect]:
        if self._broadcast_timer_at is not None and self._broadcast_timer_at <= at:
            return []
        self._broadcast_timer_at = at
        return [SetTimer(BroadcastTick(self._token), at)]

    # -- receiving (B2) ---------------------------------------------------------------------

    def handle_frame(
        self, src: Address | None, data: bytes, now: float, sender: bytes | None = None
    ) -> list[Effect]:
        """A broadcast frame arrived (``src`` is the sender's peer address, ``sender`` its
        actor id, each if known: plumtree needs one of them)."""
        plumtree = self.plumtree
        if plumtree is not None and sender is None and src is not None:
            sender = self._actor_at.get(src)
        try:
            obj = unpack_frame(data)
            header = changeset_header(obj)
            if header is not None and self._is_duplicate(*header):
                self.stats.duplicates += 1
                if plumtree is not None:
                    return self._plumtree_out(plumtree.on_duplicate(sender, header))
                return []
            kind, item = frame_of(obj)
        except FrameError:
            self.stats.malformed += 1
            return []
        if kind == K_DIGEST:
            return self._on_digest(item, now)
        if kind in (K_IHAVE, K_GRAFT, K_PRUNE):
            return self._on_plumtree_control(kind, item, sender, now)
        if kind not in (K_CHANGESET, K_EMPTY):
            self.stats.malformed += 1
            return []
        # a changeset was checked for a duplicate above, against the same state
        if not self._enqueue(item, relay=True, checked=header is not None):
            return []
        if kind == K_CHANGESET and plumtree is not None:
            mid = (item.actor, item.version, item.seqs[0], item.seqs[1])
            return self._plumtree_out(plumtree.on_message(sender, mid, data, now))
        if kind == K_CHANGESET and self.config.broadcast:
            self.stats.relayed += 1
            if not self.peers:
                return []  # no one to relay to
            exclude = {item.actor, self.actor}
            for peer in self.peers.values():
                if peer.addr == src:
                    exclude.add(peer.actor)
            rounds = self.config.relay_rounds
            return self._broadcast([data], exclude=exclude, rounds=rounds, now=now)
        return []

    # -- plumtree (B5) ----------------------------------------------------------------------

    def _on_plumtree_control(
        self, kind: int, fields: list, sender: bytes | None, now: float
    ) -> list[Effect]:
        plumtree = self.plumtree
        if plumtree is None or sender is None or sender not in self.peers:
            self.stats.malformed += 1  # fan-out mode, or from no member we know
            return []
        if kind == K_PRUNE:
            roots = decode_roots(fields)
            if roots is None:
                self.stats.malformed += 1
            else:
                plumtree.on_prune(sender, roots)
            return []
        ids = decode_ids(fields)
        if ids is None:
            self.stats.malformed += 1
            return []
        if kind == K_GRAFT:
            return self._plumtree_out(plumtree.on_graft(sender, ids, now))
        plumtree.on_ihave(sender, ids, now)
        return self._plumtree_out([])

    def _holds(self, mid: MsgId) -> bool:
        return self._is_duplicate(*mid)

    def _plumtree_out(self, frames: list[PeerFrame]) -> list[Effect]:
        """Address plumtree's frames (to members we know) and arm its timer."""
        effects: list[Effect] = []
        for f in frames:
            peer = self.peers.get(f.actor)
            if peer is not None:
                effects.append(
                    SendFrame(peer.addr, f.data if peer.trailing else without_trailing(f.data))
                )
        assert self.plumtree is not None
        at = self.plumtree.wake_at
        if at is not None and (self._plumtree_timer_at is None or at < self._plumtree_timer_at):
            self._plumtree_timer_at = at
            effects.append(SetTimer(PlumtreeTick(self._token), at))
        return effects

    def _on_plumtree_tick(self, now: float) -> list[Effect]:
        self._plumtree_timer_at = None
        if self.plumtree is None:
            return []
        return self._plumtree_out(self.plumtree.tick(now))

    def _is_duplicate(self, actor: bytes, version: int, start: int, end: int) -> bool:
        if actor == self.actor or (actor, version, start, end) in self._queued_keys:
            return True
        booked = self.store.bookie.actors.get(actor)
        if booked is None:
            return False
        if version in booked.held:
            return True
        partial = booked.partials.get(version)
        return partial is not None and partial.seqs.covers(start, end)

    def _enqueue(self, item: Changeset | EmptyVersions, relay: bool, checked: bool = False) -> bool:
        """Queue ``item`` for apply unless it is a duplicate (``checked``: ``_is_duplicate``
        just said it is not) or the queue is full."""
        if item.actor == self.actor:
            self.stats.duplicates += 1
            return False
        if isinstance(item, Changeset):
            key = (item.actor, item.version, item.seqs[0], item.seqs[1])
            if not checked and self._is_duplicate(*key):
                self.stats.duplicates += 1
                return False
            if not self.hlc.observe(item.ts):
                self.stats.malformed += 1
                return False
            self._queued_keys.add(key)
            if item.trace is not None:
                self._remember_trace(item.actor, item.version, item.trace)
        if len(self.queue) >= self.config.max_queue:
            self.stats.dropped_queue_full += 1
            return False
        self.queue.append(_Queued(item, relay))
        return True

    # -- applying (B3) ----------------------------------------------------------------------

    @property
    def broadcasts_pending(self) -> int:
        """Versions with broadcast rounds still to send (for ``/metrics``)."""
        return len(self._pending)

    def apply_pending(self, limit: int | None = None, now: float = 0.0) -> ApplyResult | None:
        """Apply up to ``limit`` queued items in one transaction, and install the result."""
        batch = self.take_batch(limit)
        if not batch:
            return None
        result = None
        try:
            result = self.apply_batch(batch)
        finally:
            self.install_apply(batch, result, now)
        return result

    def take_batch(self, limit: int | None = None) -> list[Changeset | EmptyVersions]:
        n = len(self.queue) if limit is None else min(limit, len(self.queue))
        batch, self.queue = self.queue[:n], self.queue[n:]
        return [q.item for q in batch]

    def apply_batch(self, items: list[Changeset | EmptyVersions]) -> ApplyResult:
        """The database half of ``apply_pending``: runs in a worker thread while the event loop
        keeps queueing; changes nothing in memory (O2)."""
        return self.store.apply(items)

    def install_apply(
        self, items: list[Changeset | EmptyVersions], result: ApplyResult | None, now: float
    ) -> None:
        """The loop half (O3): book what ``apply_batch`` did with ``items`` (None: it failed,
        nothing to book), forget them as queued, count them, and digest the versions booked."""
        queued = self._queued_keys
        for it in items:
            if isinstance(it, Changeset):
                queued.discard((it.actor, it.version, *it.seqs))
        if result is None:
            return
        self.store.install(result)
        # once per actor, in order (dict keys: no set iteration on this path)
        for actor in dict.fromkeys(actor for actor, _version in chain(result.applied, result.kept)):
            self.note_booked(actor, now)
        self.stats.duplicates += result.duplicates
        self.stats.rejected_changesets += len(result.rejected)
        self.stats.applied_versions += len(result.applied) + result.emptied
        self.stats.changes_applied += result.changes_applied

    # -- timers -----------------------------------------------------------------------------

    def handle_timer(self, timer: Timer, now: float) -> list[Effect]:
        if timer.token != self._token:
            return []
        if isinstance(timer, SyncTick):
            return self._on_sync_tick(now)
        if isinstance(timer, DigestTick):
            return self._on_digest_tick(now)
        if isinstance(timer, PlumtreeTick):
            return self._on_plumtree_tick(now)
        return self._on_broadcast_tick(now)

    # -- digests (B4) -----------------------------------------------------------------------

    def _on_digest_tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = [
            SetTimer(DigestTick(self._token), now + self._jitter(self.config.digest_interval))
        ]
        effects += self._repair_from_digests(now)
        cutoff = now - self.config.digest_window
        for actor in [a for a, t in self._recent.items() if t < cutoff]:
            del self._recent[actor]
        if not self._recent or not self.peers:
            return effects
        heads = [[actor, self.store.bookie.head(actor)] for actor in sorted(self._recent)]
        frame = encode_control(K_DIGEST, self.actor, heads)
        peers = self._sorted_peers()
        for peer in self.rng.sample(peers, min(self.config.fanout, len(peers))):
            effects.append(SendFrame(peer.addr, frame))
        self.stats.digests_sent += 1
        return effects

    def _on_digest(self, fields: list, now: float) -> list[Effect]:
        """Remember heads we lack; ``_on_digest_tick`` syncs for those still missing after
        ``digest_grace`` (the broadcast is usually just behind the digest)."""
        if len(fields) != 2 or type(fields[0]) is not bytes or not isinstance(fields[1], list):
            self.stats.malformed += 1
            return []
        sender, heads = fields
        for entry in heads:
            if not (isinstance(entry, list) and len(entry) == 2):
                self.stats.malformed += 1
                return []
            actor, head = entry
            if type(actor) is not bytes or type(head) is not int or actor == self.actor:
                continue
            if not self._holds_through(actor, head) and (actor, head) not in self._expected:
                self._expected[(actor, head)] = (now, sender)
        return []

    def _holds_through(self, actor: bytes, head: int) -> bool:
        """Whether every version of ``actor`` up to ``head`` is held or waiting in the apply
        queue (a version in the queue needs no repair, only time)."""
        booked = self.store.bookie.actors.get(actor)
        missing = booked.held.complement_within(1, head) if booked is not None else None
        if missing is None:
            missing_versions: Iterable[int] = range(1, head + 1)
        else:
            if not missing:
                return True
            missing_versions = missing.values(limit=64)
        queued = {k[1] for k in self._queued_keys if k[0] == actor}
        return all(v in queued for v in missing_versions)

    def _repair_from_digests(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for key, (seen, sender) in list(self._expected.items()):
            if self._holds_through(*key) or now - seen > 10 * self.config.digest_window:
                del self._expected[key]
                continue
            if now - seen < self.config.digest_grace:
                continue
            peer = self.peers.get(sender)
            if peer is None or peer.addr in self._syncing:
                continue
            if len(self._syncing) >= self.config.max_syncs_in_flight:
                break
            self._syncing[peer.addr] = now
            self._expected[key] = (now, sender)  # retry later if this sync fails
            self.stats.syncs_started += 1
            self.stats.digest_syncs += 1
            effects.append(StartSync(peer.addr, self.sync_request()))
        return effects

    def _on_broadcast_tick(self, now: float) -> list[Effect]:
        self._broadcast_timer_at = None
        effects: list[Effect] = []
        keep: list[_Pending] = []
        for p in self._pending:
            if p.due <= now and p.rounds_left > 0:
                effects += self._broadcast_round(p, now)
            if p.rounds_left > 0:
                keep.append(p)
        self._pending = keep
        if keep:
            effects += self._arm_broadcast_timer(min(p.due for p in keep))
        return effects

    # -- sync, client side (S1) ---------------------------------------------------------------

    def _on_sync_tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        idle = [p for p in self._sorted_peers() if p.addr not in self._syncing]
        room = self.config.max_syncs_in_flight - len(self._syncing)
        want = min(self.config.sync_peers, room, len(idle))
        if want > 0:
            request = self.sync_request()
            for peer in self.rng.sample(idle, want):
                self._syncing[peer.addr] = now
                self.stats.syncs_started += 1
                effects.append(StartSync(peer.addr, request))
        self._backoff = min(self._backoff * 2, self.config.max_sync_backoff)
        effects.append(SetTimer(SyncTick(self._token), now + self._jitter(self._backoff)))
        return effects

    def sync_request(self) -> bytes:
        state = self.store.bookie.sync_state()
        return encode_control(K_SYNC_REQUEST, self.config.cluster_id, self.actor, state)

    def handle_sync_frame(self, addr: Address, data: bytes, now: float) -> bool:
        """One frame of a sync answer; returns False once the answer is over (done, reject or
        garbage), True while more frames are expected."""
        self.stats.sync_frames_received += 1
        try:
            kind, item = decode_frame(data)
        except FrameError:
            self.stats.malformed += 1
            return False
        if kind in (K_CHANGESET, K_EMPTY):
            self._enqueue(item, relay=False)
            return True
        if kind == K_SYNC_DONE and item:
            hear_floors(self.store, item[0])  # tombstone GC's floors, when the server has any
        return False  # done (or a reject): the answer is over

    def sync_finished(self, addr: Address) -> None:
        self._syncing.pop(addr, None)

    # -- sync, server side (S2) ---------------------------------------------------------------

    def serve_sync(self, request: bytes) -> Iterator[bytes]:
        """Answer a sync request with the frames the requester lacks, then a done frame. A
        malformed request or one from another cluster gets a reject frame."""
        opened = self.open_sync(request)
        if isinstance(opened, bytes):
            yield opened
        else:
            yield from self.sync_answer(self.with_traces(opened))

    def open_sync(self, request: bytes) -> SyncAnswer | bytes:
        """The loop half of ``serve_sync``: the requester's sync state, or the reject frame to
        answer with (counted either way)."""
        try:
            kind, fields = decode_frame(request)
            if kind != K_SYNC_REQUEST or len(fields) != 3:
                raise FrameError("not a sync request")
            cluster_id, actor, state = fields
            state = validate_sync_state(state)
        except (FrameError, ValueError):
            self.stats.malformed += 1
            return encode_control(K_REJECT, "malformed sync request")
        if cluster_id != self.config.cluster_id:
            self.stats.other_cluster += 1
            return encode_control(K_REJECT, "different cluster")
        self.stats.syncs_served += 1
        if type(actor) is bytes and len(actor) == 16:
            self.watermark.report(actor, state)
        peer = self.peers.get(actor) if type(actor) is bytes else None
        return SyncAnswer(state, trailing=peer is not None and peer.trailing)

    def with_traces(self, opened: SyncAnswer) -> SyncAnswer:
        """``opened`` with a copy of the remembered trace contexts, when its requester accepts
        them (T1). On the loop, right before ``sync_answer`` reads the database (the agent
        holds its database lock across both, so no version is booked in between)."""
        if not opened.trailing or not self.traces:
            return opened
        return replace(opened, traces=dict(self.traces))

    def sync_answer(self, opened: SyncAnswer) -> Iterator[bytes]:
        """The database half of ``serve_sync`` (O2): the frames a peer with sync state
        ``opened.state`` lacks, then a done frame."""
        budget = self.config.sync_budget_versions
        traces = opened.traces
        for actor, lack in self.store.bookie.missing_for(opened.state).items():
            if budget <= 0:
                break
            for item in self.store.serve(actor, lack, max_versions=budget):
                if isinstance(item, Changeset):
                    budget -= 1 if item.seqs[1] == item.last_seq else 0
                    if traces and (trace := traces.get((item.actor, item.version))):
                        item = replace(item, trace=trace)
                else:
                    budget -= sum(e - s + 1 for s, e in item.versions)
                yield encode(item)
        floors = self.store.tombstone_floors
        yield encode_control(K_SYNC_DONE, floors) if floors else encode_control(K_SYNC_DONE)

    # -- hello for peer streams ----------------------------------------------------------------

    def hello(self, purpose: str) -> bytes:
        return encode_control(K_HELLO, self.config.cluster_id, self.actor, purpose)

    def check_hello(self, data: bytes) -> tuple[bytes, str] | None:
        """Validate a peer's hello; None when it is malformed or from another cluster."""
        try:
            kind, fields = decode_frame(data)
        except FrameError:
            self.stats.malformed += 1
            return None
        if kind != K_HELLO or len(fields) != 3:
            self.stats.malformed += 1
            return None
        cluster_id, actor, purpose = fields
        if cluster_id != self.config.cluster_id:
            self.stats.other_cluster += 1
            return None
        if type(actor) is not bytes or len(actor) != 16 or purpose not in ("bcast", "sync"):
            self.stats.malformed += 1
            return None
        return actor, purpose


def encode_meta(
    actor: bytes, peer_port: int, cluster_id: int, schema: tuple[int, str] | None = None
) -> bytes:
    """The SWIM member metadata an agent advertises: how to reach its peer streams, (``t``)
    that it accepts changeset frames with trailing fields (T1; older decoders ignore the key),
    and the cluster schema version it runs (number, hash) once it runs one."""
    obj: dict[str, Any] = {"a": actor, "p": peer_port, "c": cluster_id, "t": TRAILING_FIELDS}
    if schema is not None:
        obj["s"] = [schema[0], schema[1]]
    return msgpack.packb(obj, use_bin_type=True)


def decode_schema(meta: bytes) -> tuple[int, str] | None:
    """The cluster schema version a member advertises (``encode_meta``), None if none."""
    try:
        version, digest = msgpack.unpackb(meta, raw=False)["s"]
    except (*MSGPACK_ERRORS, KeyError, TypeError, ValueError):
        return None
    if type(version) is not int or type(digest) is not str:
        return None
    return version, digest


def meta_trailing_fields(meta: bytes) -> int:
    """The ``t`` of a member's metadata: 0 for a peer that refuses frames longer than ten."""
    try:
        t = msgpack.unpackb(meta, raw=False).get("t", 0)
    except (*MSGPACK_ERRORS, AttributeError):
        return 0
    return t if type(t) is int else 0


def peer_address(member_addr: tuple[str, int], meta_port: int) -> tuple[str, int]:
    """Where a member's peer streams listen: its advertised port, or (port 0) its gossip
    address, which serves them next to SWIM's own streams."""
    return (member_addr[0], meta_port or member_addr[1])


@functools.lru_cache(maxsize=8192)  # a pure function of the bytes: members repeat (and a
# simulated world of n nodes decodes each of n metas n times at a warm start)
def decode_meta(meta: bytes) -> tuple[bytes, int, int] | None:
    try:
        obj = msgpack.unpackb(meta, raw=False)
        actor, port, cluster = obj["a"], obj["p"], obj["c"]
    except (*MSGPACK_ERRORS, KeyError):  # not msgpack, not a mapping, or a key missing
        return None
    if type(actor) is not bytes or len(actor) != 16 or type(port) is not int:
        return None
    return actor, port, cluster
