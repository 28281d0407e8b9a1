"""The agent's spans: a write's journey through the cluster, sync sessions, membership changes.

A write's trace (see docs/agent.md, Tracing)::

    POST /v1/transactions         node A: the request (server span, continuing the caller's
                                  traceparent), with the version's attributes and the events
                                  ``commit`` and ``broadcast``; its context rides in the
                                  version's changesets (corrosion/core/changeset.py)
      corrosion.apply             B, C...: received (by broadcast, relayed or not) and applied;
                                  start = received, end = applied
      corrosion.sync              C: a sync session that carried the version instead...
        corrosion.apply           C: ...and its apply
      corrosion.sync.serve        B: the sync session that served it

A write made in-process (``Agent.execute``) is described on a ``corrosion.transaction`` span
instead (a child of the caller's current span, if any).

Costs: with tracing off every method returns at its first line (``tracing.enabled``); on, the
spans are per transaction, per version applied and per session, never per row, and only for
versions that carry a trace context. Everything here runs on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

import swim

from ..core.changeset import Changeset, EmptyVersions, trace_of
from ..core.replication import SendFrame
from ..core.store import ApplyResult, LocalCommit
from . import tracing
from .apply_records import ApplyRecord

MAX_TRACKED = 20_000  # traced chunks waiting in the apply queue whose arrival is remembered
MAX_LINKS = 16  # other traces a sync session carried, linked from its span
MAX_NAMES = 4096  # actor ids and seq ranges remembered in their text form


# A traced chunk's arrival: when (time_ns), from whom, "broadcast" or "sync", and the sync
# session's span when it came by sync (a tuple: one is made per chunk received)
_Arrival = tuple[int, str, str, Span | None]


def _seqs(start: int, end: int) -> str:
    return f"{start}..{end}"


class SyncSpan:
    """One sync session as client (``corrosion.sync``). Its span starts when the session did
    but is made at the first traced version it receives, as a child of that version's trace,
    so the write's trace shows the session that carried it; otherwise it is made at the end,
    on its own."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.began_ns = time.time_ns()
        self.span: Span | None = None
        self._links = 0

    def carried(self, trace: bytes) -> Span:
        if self.span is None:
            self.span = tracing.tracer().start_span(
                "corrosion.sync",
                context=tracing.context_from_bytes(trace),
                kind=SpanKind.CLIENT,
                start_time=self.began_ns,
                attributes={"corrosion.peer": self.peer, "corrosion.sync.role": "client"},
            )
        elif self._links < MAX_LINKS:
            other = tracing.span_context_from_bytes(trace)
            if other is not None and other.trace_id != self.span.get_span_context().trace_id:
                self._links += 1
                self.span.add_link(other)
        return self.span

    def finish(
        self, ok: bool, *, request_bytes: int, frames: int, changes: int, nbytes: int, pulled: int
    ) -> None:
        span = self.span
        if span is None:
            span = tracing.tracer().start_span(
                "corrosion.sync",
                kind=SpanKind.CLIENT,
                start_time=self.began_ns,
                attributes={"corrosion.peer": self.peer, "corrosion.sync.role": "client"},
            )
        if span.is_recording():
            span.set_attributes(
                {
                    "corrosion.sync.request_bytes": request_bytes,
                    "corrosion.sync.frames_received": frames,
                    "corrosion.sync.changes_received": changes,
                    "corrosion.sync.bytes_received": nbytes,
                    "corrosion.sync.changesets_queued": pulled,
                }
            )
            if not ok:
                span.set_status(Status(StatusCode.ERROR, "sync session failed"))
        span.end()


class AgentSpans:
    """Makes the agent's spans; ``actor`` is this node's id (on every span, with the resource's
    ``service.instance.id``)."""

    def __init__(self, actor: bytes) -> None:
        self.actor = actor.hex()
        self._arrivals: dict[tuple[bytes, int, tuple[int, int]], _Arrival] = {}
        # what the apply spans repeat, made once: actor ids in hex, seq ranges as text
        self._actor_ids: dict[bytes, str] = {}
        self._seqs: dict[tuple[int, int], str] = {}

    @staticmethod
    def enabled() -> bool:
        return tracing.enabled()

    # -- local writes ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Span | None]:
        """The span a local transaction is described on: the HTTP request's server span when
        it came through ``POST /v1/transactions``, else a ``corrosion.transaction`` span of its
        own (a child of the caller's current span, if any); None when tracing is off or the
        request's trace is not sampled (its span is not current: this is where that is
        known)."""
        if not tracing.enabled():
            yield None
            return
        span = tracing.request_span.get()
        if span is not None:
            yield span if span.is_recording() else None
            return
        with tracing.tracer().start_as_current_span("corrosion.transaction") as span:
            yield span

    def committed(self, span: Span | None, commit: LocalCommit | None) -> bytes | None:
        """Describe the committed version on ``span``; return the context its changesets
        carry: ``span``'s own."""
        if span is None or commit is None or not span.is_recording():
            return None
        span.set_attributes(
            {
                "corrosion.actor_id": self.actor,
                "corrosion.version": commit.version,
                "corrosion.seqs": f"0..{commit.last_seq}",  # (_seqs: this is per write)
                "corrosion.changes": len(commit.changes),
            }
        )
        return tracing.context_bytes(span)

    @staticmethod
    def broadcast(span: Span | None, commit: LocalCommit | None, effects: Sequence[Any]) -> None:
        """A ``commit`` event on the transaction's span once it is booked and its broadcast
        queued: the peers of the first round and the frames sent to them (none with
        ``perf.broadcast = false``: sync carries it)."""
        if span is None or commit is None or not span.is_recording():
            return
        peers = set()
        frames = 0
        for effect in effects:  # (one loop: a comprehension is a call, this is per write)
            if isinstance(effect, SendFrame):
                frames += 1
                peers.add(f"{effect.addr[0]}:{effect.addr[1]}")
        span.add_event("commit", {"corrosion.peers": sorted(peers), "corrosion.frames": frames})

    # -- receiving and applying -----------------------------------------------------------------

    def queued(
        self, items: Sequence[Any], peer: str, via: str, session: SyncSpan | None = None
    ) -> None:
        """Chunks just queued for apply (``replicator.queue`` items): remember when and from
        whom the traced ones came."""
        now = 0
        for q in items:
            item = q.item
            if not isinstance(item, Changeset) or item.trace is None:
                continue
            if not now:  # only now: asking whether tracing is on costs more than this loop
                if not tracing.enabled():
                    return
                now = time.time_ns()
            if len(self._arrivals) >= MAX_TRACKED:
                return
            span = session.carried(item.trace) if session is not None else None
            self._arrivals[item.actor, item.version, item.seqs] = (now, peer, via, span)

    def applied(
        self, batch: Sequence[Changeset | EmptyVersions], result: ApplyResult | None
    ) -> None:
        """One ``corrosion.apply`` span per traced version in an applied batch (its chunks
        together), from its arrival to now; ``corrosion.outcome`` says when it was not
        applied (``partial``: buffered until its other chunks arrive; ``kept``: waiting for
        this node's schema; ``rejected``, ``failed``)."""
        arrivals = self._arrivals
        if not arrivals:
            return
        applied = set(result.applied) if result is not None else set()
        now = time.time_ns()
        # an applied version of one chunk that came by broadcast (most of them): a tuple for
        # the exporter to encode (its parent the context the chunk carries), not a span
        queue_records = tracing.apply_recorder()
        records: list[ApplyRecord] = []
        groups: dict[tuple[bytes, int], list[tuple[Changeset, _Arrival]]] = {}
        seq_texts, actor_ids = self._seqs, self._actor_ids
        for item in batch:
            if not isinstance(item, Changeset) or item.trace is None:
                continue
            actor, version, seqs = item.actor, item.version, item.seqs
            arrival = arrivals.pop((actor, version, seqs), None)
            if arrival is None:
                continue
            if seqs[0] != 0 or seqs[1] != item.last_seq:
                groups.setdefault((actor, version), []).append((item, arrival))
                continue
            text = seq_texts.get(seqs)
            if text is None:
                text = seq_texts[seqs] = _seqs(*seqs)
            if queue_records is None or arrival[3] is not None or (actor, version) not in applied:
                changes = len(item.changes)
                self._record(item, arrival, text, changes, arrival[0], now, applied, result)
                continue
            actor_id = actor_ids.get(actor)
            if actor_id is None:
                actor_id = actor_ids[actor] = actor.hex()
            records.append(
                (
                    item.trace,
                    arrival[0],
                    now,
                    actor_id,
                    version,
                    text,
                    len(item.changes),
                    arrival[1],
                    arrival[2],
                )
            )
        if records:
            queue_records(records)  # type: ignore[misc]  # (not None: records were made)
        for chunks in groups.values():
            first, arrival = chunks[0]
            text = ",".join(_seqs(*c.seqs) for c, _a in chunks)
            changes = sum(len(c.changes) for c, _a in chunks)
            arrived = min(a[0] for _c, a in chunks)
            self._record(first, arrival, text, changes, arrived, now, applied, result)
        if len(self._seqs) > MAX_NAMES or len(self._actor_ids) > MAX_NAMES:
            self._seqs.clear()
            self._actor_ids.clear()

    def _record(
        self,
        first: Changeset,
        arrival: _Arrival,
        seqs: str,
        changes: int,
        arrived: int,
        now: int,
        applied: set[tuple[bytes, int]],
        result: ApplyResult | None,
    ) -> None:
        """The ``corrosion.apply`` span of the version ``first`` is (a chunk of)."""
        _at, peer, via, session = arrival
        parent = (
            session.get_span_context()
            if session is not None
            else tracing.span_context_from_bytes(first.trace)
        )
        if parent is None:
            return  # a context this node cannot read: no trace to add the apply to
        actor = first.actor
        actor_id = self._actor_ids.get(actor)
        if actor_id is None:
            actor_id = self._actor_ids[actor] = actor.hex()
        # few attributes: each costs the exporter an encoding (this span is per version)
        attributes: dict[str, str | int] = {
            "corrosion.actor_id": actor_id,
            "corrosion.version": first.version,
            "corrosion.seqs": seqs,
            "corrosion.changes": changes,
            "corrosion.peer": peer,
            "corrosion.via": via,
        }
        status = None
        if (actor, first.version) not in applied:
            status = self._outcome(actor, first.version, result, attributes)
        tracing.record_span(
            "corrosion.apply", parent, SpanKind.CONSUMER, arrived, now, attributes, status
        )

    @staticmethod
    def _outcome(
        actor: bytes, version: int, result: ApplyResult | None, attributes: dict[str, str | int]
    ) -> Status | None:
        """Why a version was not applied, on its apply span: ``corrosion.outcome`` (and an
        error status when it failed)."""
        if result is not None and (actor, version) in result.kept:
            attributes["corrosion.outcome"] = "kept"  # waits for this node's schema
            return None
        rejected = {(a, v): why for a, v, why in result.rejected} if result is not None else {}
        if (actor, version) in rejected or result is None:
            attributes["corrosion.outcome"] = "rejected" if result is not None else "failed"
            why = rejected.get((actor, version), "the apply transaction failed")
            return Status(StatusCode.ERROR, str(why))
        attributes["corrosion.outcome"] = "partial"  # buffered until the rest arrives
        return None

    # -- sync -----------------------------------------------------------------------------------

    def sync_session(self, peer: str) -> SyncSpan | None:
        return SyncSpan(peer) if tracing.enabled() else None

    def sync_served(
        self,
        peer: str,
        began_ns: int,
        frames: Sequence[bytes],
        changes: int,
        traced: bool,
        ok: bool,
    ) -> None:
        """``corrosion.sync.serve``: a session this node answered, in the trace of the first
        traced version it served (linking the others'), else on its own."""
        if not tracing.enabled():
            return
        contexts = [t for f in frames if (t := trace_of(f)) is not None] if traced else []
        first = tracing.context_from_bytes(contexts[0]) if contexts else None
        links: list[Link] = []
        for t in dict.fromkeys(contexts[1:]):
            other = tracing.span_context_from_bytes(t)
            if other is not None and len(links) < MAX_LINKS:
                links.append(Link(other))
        span = tracing.tracer().start_span(
            "corrosion.sync.serve",
            context=first,
            kind=SpanKind.SERVER,
            start_time=began_ns,
            links=links,
            attributes={
                "corrosion.node": self.actor,
                "corrosion.peer": peer,
                "corrosion.sync.role": "server",
                "corrosion.sync.frames_sent": len(frames),
                "corrosion.sync.changes_sent": changes,
                "corrosion.sync.bytes_sent": sum(map(len, frames)),
            },
        )
        if not ok:
            span.set_status(Status(StatusCode.ERROR, "sync answer not delivered"))
        span.end()

    # -- membership -----------------------------------------------------------------------------

    def member_event(self, ev: Any, describe: Any) -> None:
        """A short ``corrosion.member`` span per SWIM state change this node saw (its own
        trace: membership has no request to belong to)."""
        if not tracing.enabled():
            return
        kind = {
            swim.MemberUp: "up",
            swim.MemberSuspect: "suspect",
            swim.MemberAlive: "alive",
            swim.MemberDown: "down",
            swim.MemberRenamed: "renamed",
            swim.MemberUpdated: "updated",
        }.get(type(ev))
        if kind is None:
            return
        member = ev.new if isinstance(ev, swim.MemberRenamed) else ev.member
        actor, addr = describe(member)
        attrs = {
            "corrosion.node": self.actor,
            "corrosion.member.event": kind,
            "corrosion.member.actor_id": actor,
            "corrosion.member.addr": addr,
            "corrosion.member.state": member.state.name.lower(),
            "corrosion.member.incarnation": member.incarnation,
        }
        tracing.tracer().start_span("corrosion.member", attributes=attrs).end()
