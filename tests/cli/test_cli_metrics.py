"""``/metrics``: valid Prometheus text, corrosion-like names, values that follow the agent."""

from __future__ import annotations

import re

import anyio
import httpx
import pytest
from cli_helpers import cluster, gossip_of, node_mapping, short_tmp, write_schema
from support import wait_for

from corrosion import Agent, Config
from corrosion.surfaces.metrics import CORROSION_FAMILIES, collect, render
from orchestrator.metrics import FSM_FAMILIES

pytestmark = pytest.mark.anyio

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)\})? '
    r"(?P<value>-?[0-9.]+(?:e[+-]?[0-9]+)?|NaN|[+-]Inf)$"
)


def parse(text: str, types: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Strict enough to catch format mistakes: HELP and TYPE precede every family's samples; a
    histogram's samples are its ``_bucket``s (cumulative, up to ``+Inf``), ``_sum`` and
    ``_count``. Our counters end in ``_total``; corrosion's and superfly/fsm's (by their names)
    need not.
    ``types`` (when given) receives each family's type."""
    assert text.endswith("\n")
    families: dict[str, dict[str, float]] = {}
    types = {} if types is None else types
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram")
            assert name in helped
            types[name] = kind
            if kind == "counter" and name not in CORROSION_FAMILIES | FSM_FAMILIES:
                assert name.endswith("_total"), name
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name = m["name"]
            if name not in types:
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert types.get(base) == "histogram", f"sample before its TYPE: {line!r}"
            families.setdefault(name, {})[m["labels"] or ""] = float(m["value"])
    for name, kind in types.items():
        if kind == "histogram" and name + "_bucket" in families:  # none: no labelled series yet
            series: dict[str, list[tuple[str, float]]] = {}
            for labels, v in families[name + "_bucket"].items():
                le = re.search(r'(?:^|,)le="([^"]*)"', labels)
                assert le, f"{name}_bucket without le: {labels}"
                rest = (labels[: le.start()] + labels[le.end() :]).strip(",")
                series.setdefault(rest, []).append((le[1], v))
            for rest, buckets in series.items():
                counts = [v for _, v in buckets]
                assert counts == sorted(counts), f"{name}: buckets are not cumulative"
                assert buckets[-1] == ("+Inf", families[name + "_count"][rest]), name
    return families


async def scrape(addr: tuple[str, int], path: str = "/metrics") -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(f"http://{addr[0]}:{addr[1]}{path}")


def value(families, name, labels=""):
    return families[name][labels]


async def test_metrics_follow_the_agent():
    with short_tmp() as base:
        async with cluster(base, 2, telemetry={"prometheus": {"addr": "127.0.0.1:0"}}) as (a, b):
            resp = await scrape(a.metrics_addr)
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
            before = parse(resp.text)
            for name in (
                "corro_gossip_members",
                "corro_db_gaps_sum",
                "corro_agent_changes_in_queue",
                "corro_agent_versions_applied_total",
                "corro_agent_changes_applied_total",
                "corro_broadcast_sent_total",
                "corro_broadcast_relayed_total",
                "corro_sync_client_started_total",
                "corro_sync_requests_recv_total",
                "corro_peer_frames_malformed_total",
                "corro_peer_stream_errors_total",
                "corro_db_size_bytes",
                "corro_swim_packets_recv_total",
            ):
                assert name in before, name
            assert value(before, "corro_gossip_members") == 1
            assert value(before, "corro_gossip_member_states", 'state="alive"') == 1
            assert value(before, "corro_db_size_bytes") > 0

            await b.execute([f"INSERT INTO todos (id) VALUES ({i})" for i in range(1, 6)])
            await a.execute(["INSERT INTO todos (id) VALUES (100)"])

            async def applied() -> bool:
                fams = parse((await scrape(a.metrics_addr)).text)
                return value(fams, "corro_agent_versions_applied_total") >= 1

            await wait_for(applied, what="a's metrics to count b's version")
            after = parse((await scrape(a.metrics_addr)).text)
            assert value(after, "corro_agent_changes_applied_total") >= 5
            assert value(after, "corro_broadcast_sent_total") >= 1
            assert value(after, "corro_db_gaps_sum") == 0
            # counters never go down
            for name, samples in before.items():
                if name.endswith("_total"):
                    for labels, v in samples.items():
                        assert after[name].get(labels, 0) >= v, name

            # b answers for the sync rounds a starts, and the other way round
            async def synced() -> bool:
                fams = parse((await scrape(b.metrics_addr)).text)
                return value(fams, "corro_sync_requests_recv_total") >= 1

            await wait_for(synced, what="a sync round served by b")


async def test_metrics_server_handles_bad_requests():
    with short_tmp() as base:
        async with cluster(base, 1, telemetry={"prometheus": {"addr": "127.0.0.1:0"}}) as (a,):
            assert (await scrape(a.metrics_addr, "/nope")).status_code == 404
            assert (await scrape(a.metrics_addr, "/")).status_code == 200
            async with httpx.AsyncClient(timeout=30) as client:
                host, port = a.metrics_addr
                resp = await client.post(f"http://{host}:{port}/metrics", content=b"x")
                assert resp.status_code == 405
            for junk in (b"GARBAGE\r\n\r\n", b"\x00\xff" * 10_000, b""):
                stream = await anyio.connect_tcp(*a.metrics_addr)
                async with stream:
                    if junk:
                        await stream.send(junk)
                    await stream.send_eof()
                    reply = b""
                    with anyio.fail_after(30):
                        try:
                            while True:
                                reply += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            pass
                    assert reply == b"" or reply.startswith(b"HTTP/1.1 4")
            assert (await scrape(a.metrics_addr)).status_code == 200


def test_render_escapes_label_values():
    text = render(
        [
            ("x_total", "counter", "Help.", [({"reason": 'a"b\\c\nd'}, 3.0)]),
            ("g", "gauge", "Gauge.", [({}, 0.5), ({}, float("nan"))]),
        ]
    )
    assert 'x_total{reason="a\\"b\\\\c\\nd"} 3' in text
    assert "g 0.5\n" in text and "g NaN\n" in text
    parse(text)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_metrics_serve_on_trio():
    with short_tmp() as base:
        data = node_mapping(base, "t", api=None, telemetry={"prometheus": {"addr": "127.0.0.1:0"}})
        async with Agent(Config.from_mapping(data), serve_api=False) as agent:
            await agent.execute(["INSERT INTO todos (id) VALUES (1)"])
            fams = parse((await scrape(agent.metrics_addr)).text)
            assert value(fams, "corro_gossip_members") == 0
            assert value(fams, "corro_db_size_bytes") > 0


# corrosion's families that mean the same here, with their type in corrosion's exporter
# (crates/corro-*: counter!/gauge!/histogram! calls; dots become underscores)
CORROSION_NAMES = {
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


async def test_corrosion_names_after_traffic():
    """A subscription open on a, rows written on b that reach a by sync alone (no broadcast),
    a local write and a query on a: every corrosion family is there, with corrosion's type and
    values that follow the traffic."""
    assert CORROSION_FAMILIES == CORROSION_NAMES
    telemetry = {"prometheus": {"addr": "127.0.0.1:0"}}
    with short_tmp() as base:
        async with cluster(base, 2, telemetry=telemetry, perf={"broadcast": False}) as (a, b):
            host, port = a.api_addrs[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as http:
                sql = "SELECT id, title FROM todos"
                async with http.stream("POST", "/v1/subscriptions", json=sql) as sub:
                    assert sub.status_code == 200
                    sql_hash = sub.headers["corro-query-hash"]
                    await b.execute([f"INSERT INTO todos (id) VALUES ({i})" for i in range(1, 6)])
                    await a.execute(["INSERT INTO todos (id, title) VALUES (100, 'local')"])
                    assert (await http.post("/v1/queries", json=sql)).status_code == 200

                    async def synced() -> bool:
                        fams = parse((await scrape(a.metrics_addr)).text)
                        committed = fams.get("corro_changes_committed", {})
                        return committed.get('source="remote",table="todos"', 0) >= 5

                    await wait_for(synced, what="b's rows to reach a by sync")
                    types: dict[str, str] = {}
                    fams = parse((await scrape(a.metrics_addr)).text, types)
                    for name, kind in CORROSION_NAMES.items():
                        assert types.get(name) == kind, name
                    committed = fams["corro_changes_committed"]
                    local = committed['source="local",table="todos"']
                    assert local >= 1  # column changes: a row is one per column written
                    assert value(fams, "corro_db_table_rows_total", 'table="todos"') == 6
                    assert value(fams, "corro_gossip_cluster_size") == 2
                    assert value(fams, "corro_sync_changes_recv", 'traffic="sync"') >= 5
                    assert value(fams, "corro_agent_changes_commit_lag_seconds_count") >= 1
                    streams = 'protocol="http",source="subscriptions"'
                    assert value(fams, "corro_api_active_streams", streams) == 1
                    assert value(fams, "corro_api_queries_count") == 1
                    matched = f'sql_hash="{sql_hash}",table="todos"'
                    remote = committed['source="remote",table="todos"']
                    assert (
                        value(fams, "corro_subs_changes_matched_count", matched) == local + remote
                    )
            fams_b = parse((await scrape(b.metrics_addr)).text)
            assert value(fams_b, "corro_sync_changes_sent", 'traffic="sync"') >= 5

            async def stream_closed() -> bool:
                fams = parse((await scrape(a.metrics_addr)).text)
                return value(fams, "corro_api_active_streams", streams) == 0

            await wait_for(stream_closed, what="the closed subscription to leave the gauge")


async def test_flow_metrics_follow_replication():
    """Apply lag by origin, sync sessions' durations and sizes, the broadcast queues, and
    changesets refused or pending by reason."""
    prom = {"prometheus": {"addr": "127.0.0.1:0"}}
    with short_tmp() as base:
        extra = base / "extra.sql"  # a table only b has: a keeps b's versions that need it
        extra.write_text("CREATE TABLE IF NOT EXISTS notes (id INTEGER NOT NULL PRIMARY KEY);")
        async with Agent(Config.from_mapping(node_mapping(base, "a", telemetry=prom))) as a:
            schema = [str(write_schema(base)), str(extra)]
            cfg = node_mapping(base, "b", [gossip_of(a)], telemetry=prom,
                               db={"schema_paths": schema})  # fmt: skip
            async with Agent(Config.from_mapping(cfg)) as b:
                await wait_for(lambda: a.alive_members() == b.alive_members() == 1, what="join")
                types: dict[str, str] = {}
                fams = parse((await scrape(a.metrics_addr)).text, types)
                for name, kind in (
                    ("corro_agent_apply_lag_seconds", "histogram"),
                    ("corro_sync_duration_seconds", "histogram"),
                    ("corro_sync_session_changes", "histogram"),
                    ("corro_sync_session_bytes", "histogram"),
                    ("corro_broadcast_queue_depth", "gauge"),
                    ("corro_agent_changesets_refused_total", "counter"),
                    ("corro_agent_changesets_pending", "gauge"),
                ):
                    assert types[name] == kind, name
                refused = fams["corro_agent_changesets_refused_total"]
                assert set(refused) == {
                    f'reason="{r}"'
                    for r in ("malformed", "other_cluster", "apply_queue_full", "merge_failed")
                }
                assert set(fams["corro_agent_changesets_pending"]) == {
                    'reason="apply_queue"',
                    'reason="schema"',
                    'reason="gap"',
                }

                # b's writes reach a by broadcast; a's lag is recorded under b's actor id
                await b.execute([f"INSERT INTO todos (id) VALUES ({i})" for i in range(3)])
                await b.execute(["INSERT INTO todos (id) VALUES (3)"])
                # b's rounds for the version just committed are still to send
                now = parse(render(collect(b)))  # read at once: no await in between
                rounds = value(now, "corro_broadcast_queue_depth", 'queue="rounds"')
                assert rounds >= 1
                origin = f'origin="{b.actor_id.hex()}"'

                async def lagged() -> bool:
                    fams = parse((await scrape(a.metrics_addr)).text)
                    got = fams.get("corro_agent_apply_lag_seconds_count", {})
                    return got.get(origin) == 2

                await wait_for(lagged, what="a's lag for b's two versions")

                # while a is cut off, b's rounds run out; what b writes then comes by sync
                a.faults.isolated = True
                await b.execute([f"INSERT INTO todos (id) VALUES ({i})" for i in range(10, 15)])

                async def rounds_done() -> bool:
                    fams = parse((await scrape(b.metrics_addr)).text)
                    return value(fams, "corro_broadcast_queue_depth", 'queue="rounds"') == 0

                await wait_for(rounds_done, what="b's broadcast rounds to run out")
                a.faults.isolated = False

                async def synced() -> bool:
                    fams = parse((await scrape(a.metrics_addr)).text)
                    got = fams.get("corro_sync_session_changes_sum", {})
                    return got.get('role="client"', 0) >= 5

                await wait_for(synced, what="a to pull b's 5 changes by sync", timeout=120)
                fa = parse((await scrape(a.metrics_addr)).text)
                fb = parse((await scrape(b.metrics_addr)).text)
                sessions = fa["corro_sync_session_changes_count"]['role="client"']
                durations = fa["corro_sync_duration_seconds_count"]
                assert sum(v for k, v in durations.items() if 'role="client"' in k) == sessions
                assert fa["corro_sync_session_bytes_sum"]['role="client"'] > 0
                assert fb["corro_sync_session_changes_sum"]['role="server"'] >= 5
                assert fb["corro_sync_duration_seconds_count"]['outcome="ok",role="server"'] >= 1

                # a version for a table a lacks waits, counted under reason="schema"
                await b.execute(["INSERT INTO notes (id) VALUES (1)"])

                async def kept() -> bool:
                    fams = parse((await scrape(a.metrics_addr)).text)
                    return value(fams, "corro_agent_changesets_pending", 'reason="schema"') == 1

                await wait_for(kept, what="b's notes version kept by a")

                # a frame that is not one is refused as malformed
                before = value(fa, "corro_agent_changesets_refused_total", 'reason="malformed"')
                a.replicator.handle_frame(None, b"\x93not a frame", 0.0)
                fa = parse((await scrape(a.metrics_addr)).text)
                after = value(fa, "corro_agent_changesets_refused_total", 'reason="malformed"')
                assert after == before + 1
