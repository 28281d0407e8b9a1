"""Prometheus metrics: ``GET /metrics`` in the text exposition format (version 0.0.4).

Names follow corrosion's (its ``corro.*`` families with dots as underscores, see
shared/research/corrosion.md §1.12). Where corrosion exports the same quantity, it is exported
under corrosion's exact name, type and labels (``CORROSION_FAMILIES``; its counters do not end in
``_total``), so its dashboards and alerts work; our own families' counters end in ``_total``.
The values are read at scrape time from counters the agent already keeps
(``agent.replicator.stats``, ``agent.events``, ``agent.swim.stats``, ``agent.telemetry``, the
API's ``limits.ApiLoad``), so serving metrics costs nothing between scrapes, except the row count
of every replicated table (``corro_db_table_rows_total``), read in a worker thread per scrape.
The agent's extensions add their own families (``runtime.extensions.MetricsExtension``), and a
program without an agent serves families of its own with ``start_families``.

The server is a few lines of HTTP/1.1 on an anyio TCP listener (one request per connection), so it
runs on asyncio and trio alike and adds no dependency.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskGroup

from crdt.schema import is_internal
from crdt.tableinfo import crr_tables

from ..runtime.extensions import MetricFamily, MetricSample, extension_metrics
from ..version import package_version
from .interfaces import MetricsAgent
from .limits import STREAMING_ROUTES, api_load
from .schema_api import schema_families
from .serving import serve_listener

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 16 * 1024

# a sample: its labels and value; a histogram's carry their name's suffix first
_Sample = MetricSample

# corrosion's families exported here with their meaning, name and type (a test reads them all
# from a running agent): dashboards written for corrosion find them
CORROSION_FAMILIES: dict[str, str] = {
    "corro_build_info": "gauge",
    "corro_agent_changes_commit_lag_seconds": "histogram",
    "corro_agent_changes_in_queue": "gauge",
    "corro_agent_changesets_in_queue": "gauge",
    "corro_api_active_streams": "gauge",
    "corro_api_queries_count": "counter",
    "corro_broadcast_duplicate_count": "counter",
    "corro_broadcast_recv_count": "counter",
    "corro_changes_committed": "counter",
    "corro_db_gaps_sum": "gauge",
    "corro_db_size": "gauge",
    "corro_db_table_rows_total": "gauge",
    "corro_db_wal_size": "gauge",
    "corro_gossip_cluster_size": "gauge",
    "corro_gossip_member_states": "gauge",
    "corro_gossip_members": "gauge",
    "corro_subs_changes_matched_count": "counter",
    "corro_sync_changes_recv": "counter",
    "corro_sync_changes_sent": "counter",
    "corro_sync_client_member": "counter",
}


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def table_rows(agent: MetricsAgent) -> dict[str, int]:
    """The row count of every replicated table (in a worker thread: it reads the database)."""
    conn = agent.reads.connection()
    try:
        counts = {}
        for table in crr_tables(conn):
            if is_internal(table):  # the cluster schema's versions: not a user table
                continue
            quoted = '"' + table.replace('"', '""') + '"'
            row = conn.execute(f"SELECT count(*) FROM {quoted}").fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts
    finally:
        agent.reads.release(conn)


def histogram_samples(histogram: Any, labels: dict[str, str] | None = None) -> list[_Sample]:
    """The samples of a ``runtime.telemetry.Histogram``, each with ``labels`` too."""
    labels = labels or {}
    samples: list[_Sample] = [
        ("_bucket", {**labels, "le": "+Inf" if math.isinf(b) else repr(float(b))}, float(n))
        for b, n in histogram.cumulative()
    ]
    return [
        *samples,
        ("_sum", dict(labels), histogram.sum),
        ("_count", dict(labels), float(histogram.count)),
    ]


PLUMTREE_COUNTERS = (
    ("eager_sent", "Changeset frames pushed to eager peers (gossip.broadcast = plumtree)."),
    ("ihave_ids_sent", "Message ids announced to lazy peers in IHAVE frames."),
    ("grafts_sent", "GRAFTs sent for messages announced but not received."),
    ("grafts_answered", "Frames sent in answer to peers' GRAFTs."),
    ("prunes_sent", "PRUNEs sent on duplicate deliveries (a peer moved to lazy)."),
    ("prunes_received", "PRUNEs received (this node moved a peer to lazy)."),
)


def plumtree_families(snap: dict[str, Any]) -> list[tuple[str, str, str, list[_Sample]]]:
    """The broadcast trees' counters and state, from ``Plumtree.snapshot()``."""
    fams: list[tuple[str, str, str, list[_Sample]]] = [
        (f"corro_plumtree_{key}_total", "counter", text, [({}, float(snap[key]))])
        for key, text in PLUMTREE_COUNTERS
    ]
    fams += [
        ("corro_plumtree_links", "gauge", "Peers per kind over every origin's tree.",
         [({"kind": "eager"}, float(snap["eager_links"])),
          ({"kind": "lazy"}, float(snap["lazy_links"]))]),
        ("corro_plumtree_trees", "gauge", "Origins this node keeps a tree for.",
         [({}, float(len(snap["trees"])))]),
        ("corro_plumtree_missing", "gauge",
         "Messages announced by IHAVE and not received yet (GRAFT pending or given up to sync).",
         [({}, float(snap["missing"]))]),
    ]  # fmt: skip
    return fams


def collect(
    agent: MetricsAgent, rows: dict[str, int] | None = None
) -> list[tuple[str, str, str, list[_Sample]]]:
    """Every family as ``(name, type, help, [(labels, value)])``; ``rows``: the row counts of
    the replicated tables (``table_rows``), when read."""
    rep = agent.replicator.stats if agent.replicator is not None else None
    ev = agent.events
    sw = agent.swim.stats if agent.swim is not None else None
    db = str(agent.config.db.path)

    def one(v: float) -> list[_Sample]:
        return [({}, float(v))]

    fams: list[tuple[str, str, str, list[_Sample]]] = [
        (
            "corro_build_info",
            "gauge",
            "Build information.",
            [({"version": package_version()}, 1.0)],
        ),
    ]
    if agent.swim is not None:
        states: dict[str, int] = {"alive": 0, "suspect": 0, "down": 0, "left": 0}
        for m in agent.swim.all_members():
            key = m.state.name.lower()
            states[key] = states.get(key, 0) + 1
        fams += [
            ("corro_gossip_members", "gauge", "Members seen alive (not counting this node).",
             one(agent.alive_members())),
            ("corro_gossip_cluster_size", "gauge", "Members alive, this node included.",
             one(agent.alive_members() + 1)),
            ("corro_gossip_member_states", "gauge", "Known members by SWIM state.",
             [({"state": s}, float(n)) for s, n in sorted(states.items())]),
        ]  # fmt: skip
    if agent.store is not None:
        fams.append(
            ("corro_db_gaps_sum", "gauge", "Versions known to exist but not held here.",
             one(agent.gaps()))
        )  # fmt: skip
    if agent.replicator is not None:
        fams += [
            ("corro_agent_changes_in_queue", "gauge", "Received changeset chunks waiting to apply.",
             one(agent.queue_size())),
            ("corro_agent_changesets_in_queue", "gauge",
             "Received changeset chunks waiting to apply (corrosion's name).",
             one(agent.queue_size())),
        ]  # fmt: skip
    committed = agent.telemetry.changes_committed
    live = {sub.hash: sub for sub in agent.subscriptions.by_id.values()}
    agent.telemetry.forget_subscriptions(set(live))
    matched = agent.telemetry.subs_matched
    fams += [
        ("corro_db_size_bytes", "gauge", "Size of the database file.", one(_file_size(db))),
        ("corro_db_wal_size_bytes", "gauge", "Size of the database's write-ahead log.",
         one(_file_size(db + "-wal"))),
        ("corro_db_size", "gauge", "Size of the database file, bytes (corrosion's name).",
         one(_file_size(db))),
        ("corro_db_wal_size", "gauge", "Size of the write-ahead log, bytes (corrosion's name).",
         one(_file_size(db + "-wal"))),
        ("corro_db_table_rows_total", "gauge", "Rows in each replicated table.",
         [({"table": t}, float(n)) for t, n in sorted((rows or {}).items())]),
        ("corro_agent_changes_commit_lag_seconds", "histogram",
         "Seconds from a remote version's commit at its origin to its apply here.",
         histogram_samples(agent.lag.histogram)),
        ("corro_changes_committed", "counter",
         "Changes committed here, by table and source (local transactions, remote versions).",
         [({"table": t, "source": src}, float(n)) for (t, src), n in sorted(committed.items())]),
        ("corro_sync_changes_recv", "counter", "Changes received in sync sessions.",
         [({"traffic": "sync"}, float(ev.sync_changes_recv))]),
        ("corro_sync_changes_sent", "counter", "Changes sent in sync sessions.",
         [({"traffic": "sync"}, float(ev.sync_changes_sent))]),
        ("corro_broadcast_recv_count", "counter", "Changes received by broadcast.",
         [({"kind": "change"}, float(ev.broadcast_changes_recv))]),
        ("corro_subs_active", "gauge", "Subscriptions this agent runs.", one(len(live))),
        ("corro_subs_changes_matched_count", "counter",
         "Committed changes on the tables a subscription reads, by subscription and table.",
         [({"sql_hash": h, "table": t}, float(n)) for (h, t), n in sorted(matched.items())]),
        ("corro_agent_versions_applied_total", "counter",
         "Remote versions applied (with data or known empty).", one(ev.applied_versions)),
        ("corro_peer_stream_errors_total", "counter",
         "Peer (broadcast/sync) streams that failed.", one(ev.peer_stream_errors)),
        ("corro_peer_streams_unauthenticated_total", "counter",
         "Peer streams cut because no gossip key authenticated their frames.",
         one(ev.peer_streams_unauthenticated)),
        ("corro_peer_tls_failures_total", "counter",
         "Peer streams whose TLS handshake failed (a certificate not trusted, either way).",
         one(ev.peer_tls_failures)),
        ("corro_broadcast_dropped_total", "counter",
         "Broadcast frames dropped because a peer's send queue was full.",
         one(ev.frames_dropped)),
        ("corro_agent_pending_schema_versions", "gauge",
         "Received versions kept until this node has their table or column.",
         one(agent.pending_schema.versions)),
        ("corro_agent_pending_schema_changes", "gauge",
         "Changes of kept versions, by the table or table.column they wait for.",
         [({"missing": k}, float(n)) for k, n in sorted(agent.pending_schema.missing.items())]),
        ("corro_agent_pending_schema_kept_total", "counter",
         "Versions kept for want of schema (since start).",
         one(agent.pending_schema.kept_total)),
        ("corro_agent_pending_schema_applied_total", "counter",
         "Kept versions applied once their schema arrived (since start).",
         one(agent.pending_schema.applied_total)),
        *schema_families(agent.schema.status),
    ]  # fmt: skip
    tree = agent.replicator.plumtree if agent.replicator is not None else None
    if tree is not None:
        fams += plumtree_families(tree.snapshot())
    reaper = agent.reaper
    if reaper is not None:
        fams += [
            ("corro_db_tombstones_reaped_total", "counter",
             "Deleted rows whose metadata (clock and primary-key rows) tombstone GC collected.",
             [({"table": t}, float(n)) for t, n in sorted(reaper.stats.reaped.items())]),
            ("corro_db_tombstone_clock_rows_reaped_total", "counter",
             "Clock rows tombstone GC deleted.", one(reaper.stats.clock_rows)),
            ("corro_db_tombstone_gc_passes_total", "counter",
             "Tombstone GC passes that ran (the watermark had settled).",
             one(reaper.stats.passes)),
        ]  # fmt: skip
    if agent.pg_servers:
        pg = [s.stats for s in agent.pg_servers]
        fams += [
            ("corro_pg_connections_total", "counter", "PostgreSQL protocol connections accepted.",
             one(sum(s.connections for s in pg))),
            ("corro_pg_protocol_errors_total", "counter",
             "PostgreSQL connections closed for bytes that are not the protocol.",
             one(sum(s.protocol_errors for s in pg))),
            ("corro_pg_auth_failures_total", "counter",
             "PostgreSQL connections refused for a wrong or missing password.",
             one(sum(s.auth_failures for s in pg))),
        ]  # fmt: skip
    if rep is not None:
        fams += [
            ("corro_agent_changes_applied_total", "counter",
             "Rows changed in replicated tables by applied remote versions.",
             one(rep.changes_applied)),
            ("corro_broadcast_sent_total", "counter",
             "Broadcast sends (one per peer and round).", one(rep.broadcasts_sent)),
            ("corro_broadcast_relayed_total", "counter",
             "Received changesets relayed onwards.", one(rep.relayed)),
            ("corro_broadcast_duplicate_total", "counter",
             "Received chunks already held or queued.", one(rep.duplicates)),
            ("corro_broadcast_duplicate_count", "counter",
             "Received chunks already held or queued (corrosion's name).", one(rep.duplicates)),
            ("corro_agent_changes_dropped_total", "counter",
             "Chunks dropped because the apply queue was full.", one(rep.dropped_queue_full)),
            ("corro_agent_changesets_rejected_total", "counter",
             "Changesets that failed to merge (bad data).", one(rep.rejected_changesets)),
            ("corro_peer_frames_malformed_total", "counter",
             "Peer frames dropped as malformed.", one(rep.malformed)),
            ("corro_peer_frames_other_cluster_total", "counter",
             "Peer frames dropped because they came from another cluster.",
             one(rep.other_cluster)),
            ("corro_sync_client_started_total", "counter",
             "Sync rounds started with a peer.", one(rep.syncs_started)),
            ("corro_sync_client_member", "counter",
             "Sync rounds started with a peer (corrosion's name).",
             [({"traffic": "sync"}, float(rep.syncs_started))]),
            ("corro_sync_requests_recv_total", "counter",
             "Sync requests served to peers.", one(rep.syncs_served)),
            ("corro_sync_frames_recv_total", "counter",
             "Frames received in sync answers.", one(rep.sync_frames_received)),
        ]  # fmt: skip
    if agent.config.api.addrs:
        fams += _api_families(agent)
    fams += _flow_families(agent)
    fams += extension_metrics(agent.extensions)
    if sw is not None:
        fams += [
            ("corro_swim_packets_recv_total", "counter", "SWIM datagrams received.",
             one(sw.packets_in)),
            ("corro_swim_packets_sent_total", "counter", "SWIM datagrams sent.",
             one(sw.packets_out)),
            ("corro_swim_bytes_recv_total", "counter", "SWIM datagram bytes received.",
             one(sw.bytes_in)),
            ("corro_swim_bytes_sent_total", "counter", "SWIM datagram bytes sent.",
             one(sw.bytes_out)),
            ("corro_swim_probes_total", "counter", "Failure-detector probes.", one(sw.probes)),
            ("corro_swim_probes_failed_total", "counter", "Probes that got no ack.",
             one(sw.probes_failed)),
            ("corro_swim_suspicions_total", "counter", "Members suspected.", one(sw.suspicions)),
            ("corro_swim_declared_down_total", "counter", "Members declared down.",
             one(sw.declared_down)),
            ("corro_swim_malformed_total", "counter", "SWIM datagrams dropped, by reason.",
             [({"reason": r}, float(n)) for r, n in sorted(sw.dropped.items())]),
        ]  # fmt: skip
    return fams


def _api_families(agent: MetricsAgent) -> list[tuple[str, str, str, list[_Sample]]]:
    load = api_load(agent)
    routes = sorted(load.limits)
    return [
        ("corro_api_active_streams", "gauge", "Streaming responses being sent, by source.",
         [({"source": r, "protocol": "http"}, float(load.in_flight[r])) for r in STREAMING_ROUTES]),
        ("corro_api_queries_count", "counter", "Queries accepted (/v1/queries).",
         [({}, float(load.accepted["queries"]))]),
        ("corro_api_requests_in_flight", "gauge", "API requests being served, by route.",
         [({"route": r}, float(load.in_flight[r])) for r in routes]),
        ("corro_api_concurrency_limit", "gauge",
         "The most requests a route serves at once (api.concurrency_limit; beyond: 503).",
         [({"route": r}, float(load.limits[r])) for r in routes]),
        ("corro_api_requests_accepted_total", "counter", "API requests admitted, by route.",
         [({"route": r}, float(load.accepted[r])) for r in routes]),
        ("corro_api_requests_refused_total", "counter",
         "API requests answered 503 because their route was at its limit.",
         [({"route": r}, float(load.refused[r])) for r in routes]),
        ("corro_api_requests_misdirected_total", "counter",
         "API requests answered 421: meant for another api.endpoint_name.",
         _one(load.misdirected)),
    ]  # fmt: skip


def _flow_families(agent: MetricsAgent) -> list[MetricFamily]:
    """How changes flow through this node: apply lag by origin, sync sessions, the broadcast
    queues, and changesets refused or waiting, by reason."""
    rep = agent.replicator.stats if agent.replicator is not None else None
    sync = agent.events.sync
    by_origin = agent.lag.by_origin
    queues: list[MetricSample] = []
    if agent.peers is not None:
        queues.append(({"queue": "peer_send"}, float(agent.peers.queued_frames())))
    if agent.replicator is not None:
        queues.append(({"queue": "rounds"}, float(agent.replicator.broadcasts_pending)))
    rejected: list[MetricSample] = (
        []
        if rep is None
        else [
            ({"reason": "malformed"}, float(rep.malformed)),
            ({"reason": "other_cluster"}, float(rep.other_cluster)),
            ({"reason": "apply_queue_full"}, float(rep.dropped_queue_full)),
            ({"reason": "merge_failed"}, float(rep.rejected_changesets)),
        ]
    )
    pending: list[MetricSample] = [({"reason": "schema"}, float(agent.pending_schema.versions))]
    if agent.replicator is not None:
        pending.append(({"reason": "apply_queue"}, float(agent.queue_size())))
    if agent.store is not None:
        pending.append(({"reason": "gap"}, float(agent.gaps())))
    return [
        ("corro_agent_apply_lag_seconds", "histogram",
         "Seconds from a remote version's commit at its origin to its apply here, by origin "
         "(the committing actor's id).",
         [s for actor in sorted(by_origin)
          for s in histogram_samples(by_origin[actor], {"origin": actor.hex()})]),
        ("corro_sync_duration_seconds", "histogram",
         "Seconds a sync session took, by role (client: this node asked; server: it answered) "
         "and outcome (ok, error).",
         [s for key in sorted(sync.seconds)
          for s in histogram_samples(sync.seconds[key], {"role": key[0], "outcome": key[1]})]),
        ("corro_sync_session_changes", "histogram",
         "Changes one sync session carried (received as client, sent as server), by role.",
         [s for role in sorted(sync.changes)
          for s in histogram_samples(sync.changes[role], {"role": role})]),
        ("corro_sync_session_bytes", "histogram",
         "Frame bytes one sync session carried (received as client, sent as server), by role.",
         [s for role in sorted(sync.bytes)
          for s in histogram_samples(sync.bytes[role], {"role": role})]),
        ("corro_broadcast_queue_depth", "gauge",
         "Broadcasts waiting: frames in the peers' send queues (peer_send), versions with "
         "rounds still to send (rounds).", queues),
        ("corro_agent_changesets_refused_total", "counter",
         "Received changesets and frames refused, by reason (malformed, other_cluster, "
         "apply_queue_full, merge_failed).", rejected),
        ("corro_agent_changesets_pending", "gauge",
         "What waits to be applied, by reason: chunks in the apply queue (apply_queue), "
         "versions kept for want of schema (schema), versions known but not held (gap).",
         pending),
    ]  # fmt: skip


def _one(v: float) -> list[_Sample]:
    return [({}, float(v))]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def render(families: Iterable[MetricFamily]) -> str:
    """The text exposition format: HELP and TYPE lines, then one line per sample."""
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for sample in samples:
            suffix, labels, value = sample if len(sample) == 3 else ("", *sample)
            if labels:
                inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
                lines.append(f"{name}{suffix}{{{inner}}} {_number(value)}")
            else:
                lines.append(f"{name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"


# -- the HTTP server ---------------------------------------------------------------------------


async def start_metrics(
    agent: MetricsAgent, tg: TaskGroup, addr: tuple[str, int]
) -> tuple[Callable[[], Awaitable[None]], tuple[str, int]]:
    """Serve ``/metrics`` on ``addr`` inside ``tg``; return the closer and the bound address
    (port 0 picks a free one)."""

    async def body() -> str:
        rows = await anyio.to_thread.run_sync(table_rows, agent)
        return render(collect(agent, rows))

    return await start_families(tg, addr, body)


async def start_families(
    tg: TaskGroup, addr: tuple[str, int], families: Callable[[], Awaitable[str] | Iterable[Any]]
) -> tuple[Callable[[], Awaitable[None]], tuple[str, int]]:
    """Serve ``/metrics`` on ``addr`` from ``families``: an async function returning the body, or
    a function returning ``MetricFamily``s (for a program without an agent, e.g. an
    orchestrator embedded alone); return the closer and the bound address."""

    async def body() -> str:
        out = families()
        return await out if isinstance(out, Awaitable) else render(out)

    host, port = addr
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    bound_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    close = await serve_listener(tg, listener, lambda stream: _handle(body, stream))
    return close, (host, bound_port)


async def _handle(body: Callable[[], Awaitable[str]], stream: SocketStream) -> None:
    async with stream:
        with contextlib.suppress(Exception), anyio.fail_after(10):
            head = bytearray()
            while b"\r\n\r\n" not in head and b"\n\n" not in head:
                if len(head) > MAX_HEAD:
                    await stream.send(_response(431, "text/plain", "request head too large\n"))
                    return
                head += await stream.receive(4096)
            request_line = bytes(head).split(b"\n", 1)[0].decode("latin-1").strip()
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await stream.send(_response(400, "text/plain", "bad request\n"))
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if target not in ("/metrics", "/"):
                await stream.send(_response(404, "text/plain", "not found; try /metrics\n"))
            elif method not in ("GET", "HEAD"):
                await stream.send(_response(405, "text/plain", "method not allowed\n"))
            elif target == "/":
                await stream.send(_response(200, "text/plain", "corrosion metrics: /metrics\n"))
            else:
                text = await body()
                await stream.send(_response(200, CONTENT_TYPE, text, head_only=method == "HEAD"))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}  # fmt: skip


def _response(status: int, content_type: str, body: str, *, head_only: bool = False) -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + data
