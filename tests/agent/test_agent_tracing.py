"""Tracing end to end: real agent processes export OTLP/HTTP to a receiver the test runs
(tests/support/otlp_receiver.py), and one write's trace is reassembled from what arrived: the
request's span on the node that took it, its transaction and broadcast, and the apply on every
other node as their descendants, across three processes; when the write reaches the others by
sync, the sync sessions that carried it are in the same trace."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from agent_helpers import cluster
from cli_helpers import agent_started, node_mapping, short_tmp, write_config
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import Proc, wait_for
from support.otlp_receiver import OtlpReceiver, ReceivedSpan, is_descendant

from corrosion.runtime import tracing

pytestmark = pytest.mark.anyio

# a trace id the client chose: the write's spans must continue it
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@asynccontextmanager
async def agent_processes(
    base: Path, n: int, receiver: OtlpReceiver, **sections: Any
) -> AsyncIterator[list[dict]]:
    """``n`` ``corrosion agent`` processes joined through the first, exporting spans to
    ``receiver`` (the config key on the first, the OTEL_* environment on the others: both
    ways a user can ask); yields each one's "agent started" record."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 100 ms, not every 5 s
    }
    procs: list[Proc] = []
    started: list[dict] = []
    try:
        for i in range(n):
            seeds = [started[0]["gossip_addr"]] if started else []
            data = node_mapping(base, f"n{i}", seeds, log={"format": "json"}, **sections)
            proc_env = dict(env)
            if i == 0:
                exporter = {"exporter": {"endpoint": receiver.url}}
                data.setdefault("telemetry", {})["open-telemetry"] = exporter
            else:
                proc_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
            cfg = write_config(base / f"n{i}.toml", data)
            out = base / f"out{i}"
            out.mkdir()
            cmd = [sys.executable, "-m", "corrosion", "-c", str(cfg), "agent"]
            procs.append(Proc(cmd, out, env=proc_env))
            started.append(await agent_started(procs[-1]))
        async with httpx.AsyncClient(timeout=30) as client:

            async def all_joined() -> bool:
                for s in started:
                    resp = await client.get(f"http://{s['api_addrs'][0]}/v1/cluster/members")
                    members = resp.json()
                    if sum(1 for m in members if m.get("state") == "alive") < n:
                        return False
                return True

            await wait_for(all_joined, what="the agent processes to see each other")
        yield started
    finally:
        for p in procs:
            p.kill()


async def write(api: str, sql: str) -> dict:
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(
            f"http://{api}/v1/transactions", json=[sql], headers={"traceparent": TRACEPARENT}
        )
    assert resp.status_code == 200, resp.text
    return resp.json()


def one(spans: list[ReceivedSpan], name: str, **attributes: Any) -> ReceivedSpan:
    found = [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (name, attributes, [(s.name, s.attributes) for s in spans])
    return found[0]


async def test_a_writes_trace_spans_three_processes_with_parent_links(otlp_receiver):
    with short_tmp() as base:
        async with agent_processes(base, 3, otlp_receiver) as nodes:
            actors = [n["actor_id"] for n in nodes]
            done = await write(nodes[0]["api_addrs"][0], "INSERT INTO todos (id) VALUES (1)")
            version = done["version"]

            def applied_everywhere(spans: list[ReceivedSpan]) -> bool:
                # each process exports on its own schedule: wait for every span checked below
                traced = [s for s in spans if s.trace_id == TRACE_ID]
                applies = [s for s in traced if s.name == "corrosion.apply"]
                return {s.instance for s in applies} >= set(actors[1:]) and any(
                    s.name == "POST /v1/transactions" for s in traced
                )

            await otlp_receiver.wait_for(
                applied_everywhere, what="the write's span on A and the apply spans of B and C"
            )

    spans = otlp_receiver.trace(TRACE_ID)
    txn = one(spans, "POST /v1/transactions")
    assert txn.parent_id == "00f067aa0ba902b7"  # the client's span: its traceparent
    assert txn.attributes["http.response.status_code"] == 200
    assert txn.instance == actors[0] and txn.service == "corrosion"
    changes = txn.attributes["corrosion.changes"]
    assert changes >= 1 and txn.attributes["corrosion.seqs"] == f"0..{changes - 1}"
    described = {
        "corrosion.actor_id": actors[0],
        "corrosion.version": version,
        "corrosion.changes": changes,
    }
    assert txn.attributes.items() >= described.items()
    [(event, fields)] = txn.events
    assert event == "commit" and len(fields["corrosion.peers"]) == 2  # broadcast to B and C

    applies = [s for s in spans if s.name == "corrosion.apply"]
    by_node = {s.instance: s for s in applies}
    assert set(by_node) >= set(actors[1:])
    assert actors[0] not in by_node  # a node never applies its own write
    assert {s.instance for s in spans} >= set(actors)  # the three processes
    for node in actors[1:]:
        apply = by_node[node]
        assert is_descendant(apply, txn, spans), "an apply span outside the write's tree"
        assert apply.attributes.items() >= described.items()
        assert "corrosion.outcome" not in apply.attributes  # said only when not applied
        assert apply.attributes["corrosion.seqs"] == txn.attributes["corrosion.seqs"]
        assert apply.attributes["corrosion.peer"]  # who sent it
        assert apply.attributes["corrosion.via"] in ("broadcast", "sync")
        assert apply.start_ns <= apply.end_ns
    assert otlp_receiver.rejected == 0

    # membership: each node's view of the others joining, as short spans of their own
    joined = {
        (s.instance, s.attributes["corrosion.member.actor_id"])
        for s in otlp_receiver.named("corrosion.member")
        if s.attributes["corrosion.member.event"] == "up"
    }
    assert {(a, b) for a in actors for b in actors if a != b} <= joined


async def test_a_write_that_arrives_by_sync_has_the_sync_session_in_its_trace(otlp_receiver):
    """With broadcast off (``perf.broadcast = false``), sync alone carries the write: the
    sessions that carried it join its trace, client side and server side, and the apply on
    each node is a child of its sync session."""
    with short_tmp() as base:
        async with agent_processes(base, 3, otlp_receiver, perf={"broadcast": False}) as nodes:
            actors = [n["actor_id"] for n in nodes]
            await write(nodes[0]["api_addrs"][0], "INSERT INTO todos (id) VALUES (7)")

            def applied_everywhere(spans: list[ReceivedSpan]) -> bool:
                # each process exports on its own schedule: wait for every span checked below
                traced = [s for s in spans if s.trace_id == TRACE_ID]
                applies = [s for s in traced if s.name == "corrosion.apply"]
                serves = [s for s in traced if s.name == "corrosion.sync.serve"]
                sessions = {s.span_id for s in traced if s.name == "corrosion.sync"}
                return (
                    {s.instance for s in applies} >= set(actors[1:])
                    and serves
                    and any(s.name == "POST /v1/transactions" for s in traced)
                    and all(s.parent_id in sessions for s in applies)
                )

            await otlp_receiver.wait_for(applied_everywhere, what="B and C to apply by sync")

    spans = otlp_receiver.trace(TRACE_ID)
    txn = one(spans, "POST /v1/transactions")
    assert txn.events == [("commit", {"corrosion.peers": [], "corrosion.frames": 0})]
    sessions = {s.span_id: s for s in spans if s.name == "corrosion.sync"}
    for node in actors[1:]:
        apply = next(s for s in spans if s.name == "corrosion.apply" and s.instance == node)
        assert apply.attributes["corrosion.via"] == "sync"
        session = sessions[apply.parent_id]  # the session that carried it
        assert session.instance == node and is_descendant(session, txn, spans)
        assert session.attributes["corrosion.sync.role"] == "client"
        assert session.attributes["corrosion.sync.changes_received"] >= 1
        assert session.attributes["corrosion.peer"] == apply.attributes["corrosion.peer"]
    serve = next(s for s in spans if s.name == "corrosion.sync.serve")
    assert serve.attributes["corrosion.sync.changes_sent"] >= 1
    assert is_descendant(serve, txn, spans)


async def test_a_bad_otel_variable_stops_the_agent_at_start_up_in_one_line():
    with short_tmp() as base:
        cfg = write_config(base / "a.toml", node_mapping(base, "a"))
        env = {**os.environ, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:4317"
        cmd = [sys.executable, "-m", "corrosion", "-c", str(cfg), "agent"]
        ran = await anyio.run_process(cmd, check=False, env=env)
        assert ran.returncode == 1
        lines = ran.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines  # no traceback
        assert "cannot start: OTEL_EXPORTER_OTLP_PROTOCOL=grpc" in lines[0]
        assert "http/protobuf" in lines[0]  # the remedy
        assert not (base / "a" / "state.db").exists()  # nothing was created


@pytest.mark.parametrize("batch_size", [1, 1000], ids=["a-chunk-a-batch", "batches-of-1000"])
async def test_a_chunked_version_is_traced_on_every_chunk_and_applied_under_one_trace(
    tmp_path, batch_size
):
    """A transaction large enough to be cut into chunks: each chunk carries the context, and
    the receiver's apply spans (one per batch that held chunks of it; all but the last
    ``partial``) cover its seqs and changes exactly, under the transaction's span. With one
    chunk per batch the version is partly applied for a while on every run, not only when a
    loaded machine delays the broadcast's later chunks."""
    exporter = InMemorySpanExporter()
    handle = tracing.start_tracing(None, "corrosion-test", exporter=exporter)
    try:
        async with cluster(tmp_path, 2, perf={"apply_batch_size": batch_size}) as (a, b):
            with tracing.tracer().start_as_current_span("client") as client:
                commit = await a.execute_commit(
                    [
                        ("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", "x" * 300])
                        for i in range(200)
                    ]
                )
            assert commit is not None
            # held, not head: a version is b's head from its first chunk, buffered as partial
            await wait_for(
                lambda: b.store.bookie.holds(a.actor_id, commit.version),
                what="b to apply every chunk of the version",
            )
            handle.force_flush()
    finally:
        handle.shutdown()
    spans = exporter.get_finished_spans()
    txn = next(s for s in spans if s.name == "corrosion.transaction")
    assert txn.parent.span_id == client.get_span_context().span_id
    applies = [s for s in spans if s.name == "corrosion.apply"]
    # chunks come by broadcast, or (a loaded machine delays the broadcast past a sync) by a
    # sync session, whose span is then the transaction's child and the apply span's parent
    syncs = {
        s.context.span_id
        for s in spans
        if s.name == "corrosion.sync" and s.parent and s.parent.span_id == txn.context.span_id
    }
    assert applies and all(s.parent.span_id in {txn.context.span_id, *syncs} for s in applies)
    assert all(s.context.trace_id == txn.context.trace_id for s in applies)
    assert sum(s.attributes["corrosion.changes"] for s in applies) == len(commit.changes)
    ranges = [r for s in applies for r in s.attributes["corrosion.seqs"].split(",")]
    seqs = sorted(tuple(map(int, r.split(".."))) for r in ranges)
    assert len(seqs) > 1 and seqs[0][0] == 0 and seqs[-1][1] == commit.last_seq  # chunks...
    assert all(x[1] + 1 == y[0] for x, y in itertools.pairwise(seqs))  # ...tiling the version
    last = max(applies, key=lambda s: s.end_time)
    assert "corrosion.outcome" not in last.attributes  # applied
    assert all(s.attributes["corrosion.outcome"] == "partial" for s in applies if s is not last)
