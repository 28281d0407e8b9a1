"""``/metrics``: valid Prometheus text, corrosion-like names, values that follow the agent."""

from __future__ import annotations

import re

import anyio
import httpx
import pytest
from cli_helpers import cluster, node_mapping, short_tmp
from support import wait_for

from corrosion import Agent, Config
from corrosion.surfaces.metrics import render

pytestmark = pytest.mark.anyio

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)\})? (?P<value>-?[0-9.e+]+|NaN|[+-]Inf)$'
)


def parse(text: str) -> dict[str, dict[str, float]]:
    """Strict enough to catch format mistakes: HELP and TYPE precede every family's samples."""
    assert text.endswith("\n")
    families: dict[str, dict[str, float]] = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge")
            assert name in helped
            types[name] = kind
            if kind == "counter":
                assert name.endswith("_total"), name
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert m["name"] in types, f"sample before its TYPE: {line!r}"
            families.setdefault(m["name"], {})[m["labels"] or ""] = float(m["value"])
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
