"""Agent benchmarks, each beside a baseline measured in the same run.

* ``spread_p50_s_10``, ``spread_p99_s_10``, ``spread_p99_s_50``: a write on one node until it is
  applied on every other node, real agents on loopback (one process, one event loop, LAN-like
  "local" SWIM preset), many writes from random nodes. corrosion reports p99 ~1 s on 800+ WAN
  nodes; the target here is p99 < 1 s at 50 nodes. ``spread_p50_s_50_plumtree``,
  ``spread_p99_s_50_plumtree``: the same with ``gossip.broadcast = "plumtree"`` (``--quick``:
  10 nodes); ``--spread-only`` measures just these.
* ``agent_apply_ratio``: changes/s applied through the agent's apply path (decode, bookkeeping,
  one transaction per batch) ÷ ``crdt.merge`` of the same changes alone (medians of 3 rounds;
  ``cpu_ratio``: the same from CPU times, steadier on a shared machine). Target >= 0.85.
* ``query_ratio``: rows/s streamed by ``/v1/queries`` (HTTP, NDJSON, read by a client process
  of its own) ÷ a direct SQLite read of the same query; on the default event loop and, as
  ``_uvloop`` and ``_trio``, on the others installed; with the CPU per row of the agent's
  process and of the direct read. Target >= 0.5.
* ``api_keepalive_queries_per_s``, ``api_keepalive_txns_per_s``: sequential point queries and
  single-row transactions from one kept-alive httpx connection (a client process of its own),
  each beside the same work done in-process (``agent.query`` / ``agent.execute``) in the same
  run, as a ratio; on the default event loop (plain asyncio, as ``pip install .`` gets), on
  uvloop (``_uvloop``) and on trio with hypercorn (``_trio``) where installed. Targets: 2,000
  queries/s and 1,000 transactions/s.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
import anyio.abc
import apsw
from _common import Report, parse_args

import crdt
from corrosion import Agent, Config
from corrosion.core.changeset import decode_frame, encode
from corrosion.core.ranges import RangeSet
from corrosion.core.store import Store

SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER DEFAULT 0);"


BENCH_KEY = "YmVuY2g6IG9uZSBmaXhlZCBrZXksIGFsbCBub2RlcyE="  # 32 bytes, shared by the nodes


def config(
    base: Path, name: str, seeds: list[str], api: bool = False, broadcast: str = "fanout"
) -> Config:
    schema = base / "schema.sql"
    if not schema.exists():  # written once, atomically: worker processes read it concurrently
        tmp = base / f"schema.sql.{os.getpid()}"
        tmp.write_text(SCHEMA)
        os.replace(tmp, schema)
    data = {
        "db": {"path": str(base / name / "state.db"), "schema_paths": [str(schema)]},
        # keyed, as every real cluster is (the nonce handshake and AES-GCM are in the figures)
        "gossip": {
            "addr": "127.0.0.1:0",
            "bootstrap": seeds,
            "preset": "lan",
            "encryption_keys": [BENCH_KEY],
            "broadcast": broadcast,
        },
        "perf": {"min_sync_backoff": 1.0, "max_sync_backoff": 15.0},
    }
    if api:
        data["api"] = {"addr": "127.0.0.1:0"}
    return Config.from_mapping(data)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def spread(
    n: int, writes: int, workers: int | None = None, broadcast: str = "fanout"
) -> list[float]:
    """Seconds from commit until every other node applied it, per write.

    Node 0 (the writer) runs here; the other n - 1 agents run in ``workers`` processes (by
    default one each, as agents are deployed: many agents in one process would share one GIL
    and one event loop). Apply times are wall-clock times recorded in each process (one
    machine: one clock)."""
    workers = workers or n - 1
    base = Path(tempfile.mkdtemp(prefix=f"spread{n}-"))
    writer = Agent(config(base, "n0", [], broadcast=broadcast))
    procs: list[anyio.abc.Process] = []
    await writer.start()
    try:
        seed = "{}:{}".format(*writer.swim.address)
        per = (n - 1 + workers - 1) // workers
        first = 1
        while first < n:
            count = min(per, n - first)
            procs.append(
                await anyio.open_process(
                    [
                        sys.executable,
                        str(Path(__file__).resolve().parent / "_agent_workers.py"),
                        str(base),
                        str(first),
                        str(count),
                        seed,
                        str(n),
                        broadcast,
                    ],
                    # never read: a full pipe would block a worker that logs
                    stderr=open(base / f"worker{first}.log", "wb"),  # noqa: SIM115
                )
            )
            first += count
        for p in procs:
            line = b""
            with anyio.fail_after(180):
                while not line.endswith(b"ready\n"):
                    line += await p.stdout.receive(1)
        with anyio.fail_after(60):
            while writer.alive_members() != n - 1:
                await anyio.sleep(0.1)
        commits = []
        rnd = random.Random(1)
        warmup = 3  # peer streams open lazily: the first writes also pay for TCP connects
        for i in range(warmup + writes):
            t0 = time.time()
            commit = await writer.execute_commit(
                [
                    [
                        "INSERT INTO kv (k, v) VALUES (?, ?) "
                        "ON CONFLICT DO UPDATE SET v = excluded.v",
                        [f"k{rnd.randrange(50)}", f"v{i}"],
                    ]
                ]
            )
            if i >= warmup:
                commits.append((commit.version, t0))
            await anyio.sleep(0.5)  # spread latency, not saturation throughput
        await anyio.sleep(20)  # let stragglers (repaired by digests or sync) arrive
        applied: dict[str, list[float]] = {}
        for p in procs:
            await p.stdin.aclose()
            data = b""
            with anyio.fail_after(120):
                while not data.endswith(b"}\n"):  # the JSON line; the agents then shut down
                    data += await p.stdout.receive()
            applied.update(
                {
                    k: applied.get(k, []) + v
                    for k, v in json.loads(data.decode().splitlines()[-1]).items()
                }
            )
        actor = writer.actor_id.hex()
        samples = []
        for version, t0 in commits:
            times = applied.get(f"{actor}:{version}", [])
            samples.append(max(times) - t0 if len(times) == n - 1 else float("inf"))
        return samples
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
            await p.wait()
        await writer.aclose()
        shutil.rmtree(base, ignore_errors=True)


def apply_ratio(versions: int, rounds: int = 3) -> tuple[float, float, float]:
    """Changes/s of the agent's apply path and of ``crdt.merge`` alone, the medians of
    ``rounds`` rounds, each into fresh databases (the machine is shared: one round is noisy);
    and the median ratio of their CPU times (merge's ÷ the agent's), which other processes on
    the machine disturb less."""
    with tempfile.TemporaryDirectory(prefix="apply-") as tmp:
        return _apply_ratio(Path(tmp), versions, rounds)


def _apply_ratio(base: Path, versions: int, rounds: int) -> tuple[float, float, float]:
    src = Store(base / "src.db")
    src.apply_schema(SCHEMA)
    for i in range(versions):
        _, commit = src.execute_local(
            [
                ("INSERT INTO kv (k, v, n) VALUES (?, ?, ?)", (f"k{i}-{j}", "x" * 20, j))
                for j in range(10)
            ],
            ts=i,
        )
        src.install(commit)  # booked before the next transaction numbers its version
    items = list(src.serve(src.actor_id, RangeSet([(1, versions)]), max_versions=versions))
    src.close()
    frames = [encode(x) for x in items]
    changes = [c for x in items for c in x.changes]
    # The setup's objects (tens of thousands of Changes, all alive) would make the collector's
    # first full pass land inside the first timed round, on whichever side allocates outside a
    # pause (the agent's decoding: crdt.merge pauses it): collect them here, untimed.
    gc.collect()
    agent_rates, plain_rates, cpu_ratios = [], [], []
    for r in range(rounds):
        dst = crdt.connect(str(base / f"plain{r}.db"), wal=True)
        dst.execute("PRAGMA synchronous = NORMAL")
        dst.execute(SCHEMA)
        dst.execute("SELECT crsql_as_crr('kv')")
        t, cpu = time.perf_counter(), time.process_time()
        crdt.merge(dst, changes)
        plain_rates.append(len(changes) / (time.perf_counter() - t))
        plain_cpu = time.process_time() - cpu
        dst.close()

        store = Store(base / f"agent{r}.db")
        store.apply_schema(SCHEMA)
        t, cpu = time.perf_counter(), time.process_time()
        decoded = [decode_frame(f)[1] for f in frames]
        for i in range(0, len(decoded), 1000):
            store.install(store.apply(decoded[i : i + 1000]))
        agent_rates.append(len(changes) / (time.perf_counter() - t))
        cpu_ratios.append(plain_cpu / (time.process_time() - cpu))
        store.close()
    return (
        statistics.median(agent_rates),
        statistics.median(plain_rates),
        statistics.median(cpu_ratios),
    )


async def query_ratio(rows: int, rounds: int = 3) -> tuple[float, float, float, float]:
    """Rows/s of ``/v1/queries`` and of a direct read of the same query, the medians of
    ``rounds`` reads each; and the CPU seconds per row of the agent's process (every thread)
    while it answers, and of the direct read."""
    with tempfile.TemporaryDirectory(prefix="query-") as tmp:
        return await _query_ratio(Path(tmp), rows, rounds)


# The client runs in its own process, so its parsing does not slow the server down. The timer
# starts after ``httpx.Client()`` is made: making one builds an SSL context (~0.1 s, as long as
# streaming 100k rows), which is no part of the query.
QUERY_CLIENT = """
import httpx, json, sys, time
url, sql, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = []
with httpx.Client(timeout=120) as client:
    for _ in range(rounds):
        t = time.perf_counter(); n = 0
        with client.stream("POST", url, json=sql) as r:
            for chunk in r.iter_bytes():
                n += chunk.count(b"\\n")
        out.append([n - 2, time.perf_counter() - t])  # less the columns and eoq lines
print(json.dumps(out))
"""


async def _query_ratio(base: Path, rows: int, rounds: int) -> tuple[float, float, float, float]:
    async with Agent(config(base, "q", [], api=True)) as agent:
        for i in range(0, rows, 5000):
            await agent.execute(
                [
                    [
                        "INSERT INTO kv (k, v, n) VALUES (?, ?, ?)",
                        [f"k{j:07d}", "value-" + str(j), j],
                    ]
                    for j in range(i, min(rows, i + 5000))
                ]
            )
        sql = "SELECT k, v, n FROM kv"
        conn = apsw.Connection(str(agent.config.db.path), flags=apsw.SQLITE_OPEN_READONLY)
        direct = []
        cpu = time.process_time()
        for _ in range(rounds):
            t = time.perf_counter()
            direct.append(len(conn.execute(sql).fetchall()) / (time.perf_counter() - t))
        direct_cpu = (time.process_time() - cpu) / (rows * rounds)
        conn.close()
        host, port = agent.api_addrs[0]
        cpu = time.process_time()
        out = await anyio.run_process(
            [
                sys.executable,
                "-c",
                QUERY_CLIENT,
                f"http://{host}:{port}/v1/queries",
                sql,
                str(rounds),
            ]
        )
        server_cpu = (time.process_time() - cpu) / (rows * rounds)
        http = []
        for got, elapsed in json.loads(out.stdout):
            assert got == rows, got
            http.append(got / elapsed)
        return statistics.median(http), statistics.median(direct), server_cpu, direct_cpu


# One kept-alive connection (httpx.Client keeps it in its pool), requests one after another.
KEEPALIVE_CLIENT = """
import httpx, json, sys, time
url, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
upsert = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT DO UPDATE SET v = excluded.v"
with httpx.Client(base_url=url, timeout=60) as client:
    def one(i):
        if kind == "queries":
            r = client.post("/v1/queries", json=["SELECT v FROM kv WHERE k = ?", [f"k{i % 1000}"]])
            assert r.status_code == 200 and b'"row"' in r.content, r.text
        else:
            r = client.post("/v1/transactions", json=[[upsert, [f"t{i % 1000}", str(i)]]])
            assert r.status_code == 200, r.text
    for i in range(50):  # warm-up: the connection, the read pool, the statement cache
        one(i)
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        one(i)
    print(json.dumps([n / (time.perf_counter() - t), (time.process_time() - cpu) / n]))
"""


async def keepalive(n: int) -> dict[str, tuple[float, float, float, float]]:
    """Per kind: requests/s over one kept-alive HTTP connection, the same in-process, and the
    CPU seconds per request of the server (this process, every thread) and of the client.

    Sequential requests wait on each other, so on a loaded machine the rates mostly measure
    how soon the scheduler runs each side again; the CPU times do not depend on that."""
    with tempfile.TemporaryDirectory(prefix="keepalive-") as tmp:
        async with Agent(config(Path(tmp), "k", [], api=True)) as agent:
            await agent.execute(
                [["INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", f"v{i}"]] for i in range(1000)]
            )
            host, port = agent.api_addrs[0]
            out: dict[str, tuple[float, float, float, float]] = {}
            for kind in ("queries", "txns"):
                cpu = time.process_time()
                ran = await anyio.run_process(
                    [sys.executable, "-c", KEEPALIVE_CLIENT, f"http://{host}:{port}", kind, str(n)]
                )
                server_cpu = (time.process_time() - cpu) / (n + 50)  # with the warm-up
                http, client_cpu = json.loads(ran.stdout)
                t = time.perf_counter()
                for i in range(n):
                    if kind == "queries":
                        got = [r async for r in agent.query(
                            "SELECT v FROM kv WHERE k = ?", [f"k{i % 1000}"]
                        )]  # fmt: skip
                        assert got, i
                    else:
                        await agent.execute(
                            [[
                                "INSERT INTO kv (k, v) VALUES (?, ?) "
                                "ON CONFLICT DO UPDATE SET v = excluded.v",
                                [f"t{i % 1000}", str(i)],
                            ]]
                        )  # fmt: skip
                out[kind] = (http, n / (time.perf_counter() - t), server_cpu, client_cpu)
            return out


class _FixedResponse(asyncio.Protocol):
    """Answers every request with one fixed query response, parsing only the framing: no
    server here can be faster, so a client's rate against it is that client's own ceiling."""

    BODY = b'{"columns":["v"]}\n{"row":[1,["v1"]]}\n{"eoq":{"time":0.0}}\n'
    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )

    def connection_made(self, transport: Any) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self.transport.write(self.RESPONSE)


async def client_ceiling(n: int) -> float:
    """Point queries/s of the keep-alive client against ``_FixedResponse`` (asyncio)."""
    server = await asyncio.get_running_loop().create_server(_FixedResponse, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        ran = await anyio.run_process(
            [sys.executable, "-c", KEEPALIVE_CLIENT, f"http://127.0.0.1:{port}", "queries", str(n)]
        )
    return json.loads(ran.stdout)[0]


def event_loops() -> list[tuple[str, str, dict[str, Any]]]:
    """``(metric suffix, anyio backend, backend options)`` of each event loop the agent can run
    on here: plain asyncio (as ``pip install .`` gets), uvloop and trio (with hypercorn)."""
    loops: list[tuple[str, str, dict[str, Any]]] = [("", "asyncio", {"use_uvloop": False})]
    if importlib.util.find_spec("uvloop"):
        loops.append(("_uvloop", "asyncio", {"use_uvloop": True}))
    if importlib.util.find_spec("trio") and importlib.util.find_spec("hypercorn"):
        loops.append(("_trio", "trio", {}))
    return loops


def keepalive_report(report: Report, n: int) -> None:
    ceiling = anyio.run(client_ceiling, n)
    report.metric(
        "api_keepalive_client_ceiling_per_s",
        ceiling,
        "req/s",
        "none: the same client against a fixed-response server (no framework, no database)",
    )
    for suffix, backend, options in event_loops():
        rates = anyio.run(keepalive, n, backend=backend, backend_options=options)
        for kind, target, call in (
            ("queries", 2000, "agent.query"),
            ("txns", 1000, "agent.execute"),
        ):
            http, in_process, server_cpu, client_cpu = rates[kind]
            report.metric(
                f"api_keepalive_{kind}_per_s{suffix}",
                http,
                "req/s",
                f"target >= {target}/s; in-process {call}",
                loop=suffix.lstrip("_") or "asyncio",
                in_process_per_s=round(in_process),
                ratio=round(http / in_process, 3),
                server_cpu_us=round(server_cpu * 1e6),
                client_cpu_us=round(client_cpu * 1e6),
            )


async def spread_report(args: Any, report: Report) -> None:
    writes = 30 if args.quick else 100
    s10 = await spread(10, writes)
    report.metric(
        "spread_p50_s_10", statistics.median(s10), "s", "none (absolute latency)", writes=writes
    )
    report.metric("spread_p99_s_10", percentile(s10, 99), "s", "corrosion p99 ~1 s (800 nodes)")
    if not args.quick:
        s50 = await spread(50, writes)
        report.metric("spread_p50_s_50", statistics.median(s50), "s", "none (absolute latency)")
        report.metric("spread_p99_s_50", percentile(s50, 99), "s", "target < 1 s")
    p50 = await spread(10 if args.quick else 50, writes, broadcast="plumtree")
    size = 10 if args.quick else 50
    report.metric(
        f"spread_p50_s_{size}_plumtree", statistics.median(p50), "s", "none (absolute latency)"
    )
    report.metric(
        f"spread_p99_s_{size}_plumtree",
        percentile(p50, 99),
        "s",
        "gossip.broadcast = plumtree; target < 1 s, within 1.5x of fan-out's",
    )


def throughput_report(args: Any, report: Report) -> None:
    agent_rate, plain_rate, cpu_ratio = apply_ratio(300 if args.quick else 2000)
    report.metric(
        "agent_apply_ratio",
        agent_rate / plain_rate,
        "x",
        "target >= 0.85; crdt.merge alone",
        agent_changes_per_s=round(agent_rate),
        merge_changes_per_s=round(plain_rate),
        cpu_ratio=round(cpu_ratio, 3),
    )
    for suffix, backend, options in event_loops():
        http, direct, server_cpu, direct_cpu = anyio.run(
            query_ratio,
            20_000 if args.quick else 100_000,
            backend=backend,
            backend_options=options,
        )
        report.metric(
            f"query_ratio{suffix}",
            http / direct,
            "x",
            "target >= 0.5; direct SQLite read (apsw)",
            loop=suffix.lstrip("_") or "asyncio",
            http_rows_per_s=round(http),
            direct_rows_per_s=round(direct),
            server_cpu_us_per_row=round(server_cpu * 1e6, 3),
            direct_cpu_us_per_row=round(direct_cpu * 1e6, 3),
        )


def _options(p: Any) -> None:
    p.add_argument(
        "--keepalive-only", action="store_true", help="only the keep-alive HTTP request rates"
    )
    p.add_argument(
        "--spread-only", action="store_true", help="only the spread latencies (both modes)"
    )
    p.add_argument(
        "--throughput-only",
        action="store_true",
        help="only agent_apply_ratio and query_ratio (on each event loop)",
    )


if __name__ == "__main__":
    args = parse_args(__doc__.split("\n")[0], _options)
    report = Report(args.json)
    if not (args.keepalive_only or args.throughput_only):
        anyio.run(spread_report, args, report)
    if not (args.keepalive_only or args.spread_only):
        throughput_report(args, report)
    if not (args.throughput_only or args.spread_only):
        keepalive_report(report, 500 if args.quick else 3000)
