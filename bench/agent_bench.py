"""Agent benchmarks, each beside a baseline measured in the same run.

* ``spread_p50_s_10``, ``spread_p99_s_10``, ``spread_p99_s_50``: a write on one node until it is
  applied on every other node, real agents on loopback (one process, one event loop, LAN-like
  "local" SWIM preset), many writes from random nodes. corrosion reports p99 ~1 s on 800+ WAN
  nodes; the target here is p99 < 1 s at 50 nodes. ``spread_p50_s_50_plumtree``,
  ``spread_p99_s_50_plumtree``: the same with ``gossip.broadcast = "plumtree"`` (``--quick``:
  10 nodes); ``--spread-only`` measures just these.
* ``agent_apply_ratio``: the agent's real apply path ÷ ``crdt.merge`` of the same changes alone,
  by CPU time (merge's ÷ the agent's: other processes on a shared machine disturb it less than
  the rates), medians of 5 alternating rounds into fresh databases; the rates and their ratio
  (``wall_ratio``) beside it. The path: 2,000 versions of 10 rows (40k changes) as broadcast
  frames, fed to a running agent's broadcast receive loop (``PeerStreams``: ``Replicator.
  handle_frame`` and its duplicate check, queueing, relaying) from memory, as a peer's stream
  delivers them but without the socket, then the apply loop (batches applied in a worker
  thread, installed on the event loop) until every version is applied. ``store_cpu_ratio``:
  the store alone (``decode_frame``, ``Store.apply`` and ``install`` per 1,000 versions), to
  show what is the store's and what the agent's. Target >= 0.85.
* ``query_ratio``: rows/s streamed by ``/v1/queries`` (HTTP, NDJSON, read by a client process
  of its own) ÷ a direct SQLite read of the same query (100k rows), each round's own ratio,
  medians of 5 alternating rounds; ``cpu_ratio``: the direct read's CPU ÷ the agent process's
  (every thread) while it answers; on the default event loop and, as ``_uvloop`` and
  ``_trio``, on the others installed. Target >= 0.5.
* ``api_keepalive_queries_per_s``, ``api_keepalive_txns_per_s``: sequential point queries and
  single-row transactions from one kept-alive httpx connection (a client process of its own),
  each beside the same work done in-process (``agent.query`` / ``agent.execute``) in the same
  run, as a ratio; on the default event loop (plain asyncio, as ``pip install .`` gets), on
  uvloop (``_uvloop``) and on trio with hypercorn (``_trio``) where installed. Targets: 2,000
  queries/s and 1,000 transactions/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
import anyio.abc
import anyio.lowlevel
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


class FrameFeed:
    """A peer's broadcast stream served from memory (``FrameStream.receive`` without the socket):
    the frames in order, yielding to the event loop every ``burst`` frames, as a socket read
    that returns that many frames' bytes at once does (~100 of these 400-byte frames fit the
    64 KiB a read returns)."""

    def __init__(self, frames: list[bytes], burst: int = 100) -> None:
        self.frames, self.burst, self.at = frames, burst, 0

    async def receive(self) -> bytes:
        at = self.at
        if at >= len(self.frames):
            raise anyio.EndOfStream  # the peer closed the stream: the receive loop ends
        self.at = at + 1
        if at % self.burst == 0:
            await anyio.lowlevel.checkpoint()
        return self.frames[at]


def apply_ratio(versions: int, rounds: int = 5) -> dict[str, float]:
    """The agent's apply path and ``crdt.merge`` alone on the same changes, in alternating
    rounds, each into fresh databases (the machine is shared: one round is noisy). Returns the
    medians over the rounds of: each side's changes/s, and the ratios (merge's ÷ the agent's)
    of their CPU times and of their wall times; and the same ratios for the store alone
    (``decode_frame`` and ``Store.apply``/``install`` per 1,000 versions, no agent around it)."""
    with tempfile.TemporaryDirectory(prefix="apply-") as tmp:
        return _apply_ratio(Path(tmp), versions, rounds)


def _merge_round(base: Path, changes: list[Any]) -> tuple[float, float]:
    dst = crdt.connect(str(base / "plain.db"), wal=True)
    dst.execute("PRAGMA synchronous = NORMAL")
    dst.execute(SCHEMA)
    dst.execute("SELECT crsql_as_crr('kv')")
    gc.collect()
    t, cpu = time.perf_counter(), time.process_time()
    crdt.merge(dst, changes)
    took = time.perf_counter() - t, time.process_time() - cpu
    dst.close()
    return took


def _store_round(base: Path, frames: list[bytes]) -> tuple[float, float]:
    store = Store(base / "store.db")
    store.apply_schema(SCHEMA)
    gc.collect()
    t, cpu = time.perf_counter(), time.process_time()
    decoded = [decode_frame(f)[1] for f in frames]
    for i in range(0, len(decoded), 1000):
        store.install(store.apply(decoded[i : i + 1000]))
    took = time.perf_counter() - t, time.process_time() - cpu
    store.close()
    return took


async def _agent_round(base: Path, frames: list[bytes], sender: bytes) -> tuple[float, float]:
    """A fresh agent receives ``frames`` on a broadcast stream of ``sender``'s: the stream's
    receive loop (``PeerStreams``, ``Replicator.handle_frame``), the apply loop (batches applied
    in a worker thread, installed on the event loop), until every version is applied. CPU time
    is every thread's (the worker's too), and the agent's own background work is in it."""
    async with Agent(config(base, "agent", [])) as agent:
        assert agent.peers is not None
        target = agent.events.applied_versions + len(frames)
        gc.collect()
        t, cpu = time.perf_counter(), time.process_time()
        with contextlib.suppress(anyio.EndOfStream):
            feed: Any = FrameFeed(frames)  # what the receive loop reads of a FrameStream
            await agent.peers._receive_broadcasts(feed, "bench", sender)
        while agent.events.applied_versions < target:
            await agent.wait_applied()
        return time.perf_counter() - t, time.process_time() - cpu


def _apply_ratio(base: Path, versions: int, rounds: int) -> dict[str, float]:
    src = Store(base / "src.db")
    src.apply_schema(SCHEMA)
    ts = int(time.time() * 1000) << 16  # an HLC timestamp of now: the agent's clock accepts it
    for i in range(versions):
        _, commit = src.execute_local(
            [
                ("INSERT INTO kv (k, v, n) VALUES (?, ?, ?)", (f"k{i}-{j}", "x" * 20, j))
                for j in range(10)
            ],
            ts=ts + i,
        )
        src.install(commit)  # booked before the next transaction numbers its version
    items = list(src.serve(src.actor_id, RangeSet([(1, versions)]), max_versions=versions))
    sender = src.actor_id
    src.close()
    frames = [encode(x) for x in items]
    changes = [c for x in items for c in x.changes]
    # The setup's objects (tens of thousands of Changes, all alive) would make the collector's
    # first full pass land inside the first timed round: each round collects first, untimed.
    sides: dict[str, list[tuple[float, float]]] = {"merge": [], "store": [], "agent": []}
    for r in range(rounds):
        order = ("merge", "store", "agent") if r % 2 == 0 else ("agent", "store", "merge")
        for side in order:
            where = base / f"{side}{r}"
            where.mkdir()
            if side == "merge":
                sides[side].append(_merge_round(where, changes))
            elif side == "store":
                sides[side].append(_store_round(where, frames))
            else:
                sides[side].append(anyio.run(_agent_round, where, frames, sender))
            shutil.rmtree(where, ignore_errors=True)

    def ratio(side: str, i: int) -> float:
        return statistics.median(
            m[i] / x[i] for m, x in zip(sides["merge"], sides[side], strict=True)
        )

    n = len(changes)
    return {
        "agent_changes_per_s": n / statistics.median(x[0] for x in sides["agent"]),
        "merge_changes_per_s": n / statistics.median(x[0] for x in sides["merge"]),
        "cpu_ratio": ratio("agent", 1),
        "wall_ratio": ratio("agent", 0),
        "store_cpu_ratio": ratio("store", 1),
        "store_wall_ratio": ratio("store", 0),
        "agent_cpu_ms": statistics.median(x[1] for x in sides["agent"]) * 1e3,
        "merge_cpu_ms": statistics.median(x[1] for x in sides["merge"]) * 1e3,
    }


async def query_ratio(rows: int, rounds: int = 5) -> dict[str, float]:
    """``/v1/queries`` and a direct read of the same query, in alternating rounds; the medians
    over the rounds of: each side's rows/s, the ratio of the rates (HTTP's ÷ the direct
    read's: each round's own), and of the CPU seconds (the direct read's ÷ the agent process's,
    every thread of it, while it answers); and each side's CPU per row."""
    with tempfile.TemporaryDirectory(prefix="query-") as tmp:
        return await _query_ratio(Path(tmp), rows, rounds)


# The client runs in its own process, so its parsing does not slow the server down. It makes
# its ``httpx.Client`` first (that builds an SSL context, ~0.1 s, as long as streaming 100k
# rows: no part of the query), says ``ready``, then reads one query per line it is sent and
# answers each with ``[rows, seconds]``.
QUERY_CLIENT = """
import httpx, json, sys, time
url, sql = sys.argv[1], sys.argv[2]
with httpx.Client(timeout=120) as client:
    print("ready", flush=True)
    for _ in sys.stdin:
        t = time.perf_counter(); n = 0
        with client.stream("POST", url, json=sql) as r:
            for chunk in r.iter_bytes():
                n += chunk.count(b"\\n")
        print(json.dumps([n - 2, time.perf_counter() - t]), flush=True)  # less columns, eoq
"""


async def _line(stream: Any) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        line += await stream.receive(1)
    return line


async def _query_ratio(base: Path, rows: int, rounds: int) -> dict[str, float]:
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
        host, port = agent.api_addrs[0]
        direct: list[tuple[float, float]] = []  # (seconds, CPU seconds) per round
        http: list[tuple[float, float]] = []
        async with await anyio.open_process(
            [sys.executable, "-c", QUERY_CLIENT, f"http://{host}:{port}/v1/queries", sql]
        ) as client:
            with anyio.fail_after(60):
                assert await _line(client.stdout) == b"ready\n"
            for r in range(-1, rounds):  # -1: a warm-up of both sides (first use of the memory)
                gc.collect()
                t, cpu = time.perf_counter(), time.process_time()
                assert len(conn.execute(sql).fetchall()) == rows
                direct.append((time.perf_counter() - t, time.process_time() - cpu))
                gc.collect()
                cpu = time.process_time()
                await client.stdin.send(b"go\n")
                with anyio.fail_after(120):
                    got, elapsed = json.loads(await _line(client.stdout))
                http.append((elapsed, time.process_time() - cpu))
                assert got == rows, got
                if r < 0:
                    direct.clear()
                    http.clear()
            await client.stdin.aclose()
        conn.close()
        med = statistics.median
        return {
            "http_rows_per_s": rows / med(x[0] for x in http),
            "direct_rows_per_s": rows / med(x[0] for x in direct),
            "ratio": med(d[0] / h[0] for d, h in zip(direct, http, strict=True)),
            "cpu_ratio": med(d[1] / h[1] for d, h in zip(direct, http, strict=True)),
            "server_cpu_per_row": med(x[1] for x in http) / rows,
            "direct_cpu_per_row": med(x[1] for x in direct) / rows,
        }


def query_ratio_in_process(rows: int, backend: str, options: dict[str, Any]) -> dict[str, float]:
    """``query_ratio`` in a fresh process: what ran before in this one (the apply rounds' agents)
    leaves the allocator in a state that makes the direct read's memory cheaper to get than in
    a process that only queries, and moved the ratio by 0.1 from run to run."""
    code = (
        "import anyio, json, sys; sys.path.insert(0, sys.argv[1]); import agent_bench; "
        "print(json.dumps(anyio.run(agent_bench.query_ratio, int(sys.argv[2]), "
        "backend=sys.argv[3], backend_options=json.loads(sys.argv[4]))))"
    )
    here = str(Path(__file__).resolve().parent)
    ran = subprocess.run(
        [sys.executable, "-c", code, here, str(rows), backend, json.dumps(options)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(ran.stdout.splitlines()[-1])


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
    got = apply_ratio(300 if args.quick else 2000)
    report.metric(
        "agent_apply_ratio",
        got["cpu_ratio"],
        "x",
        "target >= 0.85 (CPU); crdt.merge alone",
        load=round(os.getloadavg()[0], 2),
        wall_ratio=round(got["wall_ratio"], 3),
        agent_changes_per_s=round(got["agent_changes_per_s"]),
        merge_changes_per_s=round(got["merge_changes_per_s"]),
        agent_cpu_ms=round(got["agent_cpu_ms"], 1),
        merge_cpu_ms=round(got["merge_cpu_ms"], 1),
        store_cpu_ratio=round(got["store_cpu_ratio"], 3),
        store_wall_ratio=round(got["store_wall_ratio"], 3),
    )
    for suffix, backend, options in event_loops():
        got = query_ratio_in_process(20_000 if args.quick else 100_000, backend, options)
        report.metric(
            f"query_ratio{suffix}",
            got["ratio"],
            "x",
            "target >= 0.5; direct SQLite read (apsw)",
            loop=suffix.lstrip("_") or "asyncio",
            load=round(os.getloadavg()[0], 2),
            cpu_ratio=round(got["cpu_ratio"], 3),
            http_rows_per_s=round(got["http_rows_per_s"]),
            direct_rows_per_s=round(got["direct_rows_per_s"]),
            server_cpu_us_per_row=round(got["server_cpu_per_row"] * 1e6, 3),
            direct_cpu_us_per_row=round(got["direct_cpu_per_row"] * 1e6, 3),
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
