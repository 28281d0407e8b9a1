"""Agent benchmarks, each beside a baseline measured in the same run.

* ``spread_p50_s_10``, ``spread_p99_s_10``, ``spread_p99_s_50``: a write on one node until it is
  applied on every other node, real agents on loopback (one process, one event loop, LAN-like
  "local" SWIM preset), many writes from random nodes. corrosion reports p99 ~1 s on 800+ WAN
  nodes; the target here is p99 < 1 s at 50 nodes.
* ``agent_apply_ratio``: changes/s applied through the agent's apply path (decode, bookkeeping,
  one transaction per batch) ÷ ``crdt.merge`` of the same changes alone.
* ``query_ratio``: rows/s streamed by ``/v1/queries`` (HTTP, NDJSON) ÷ a direct SQLite read of
  the same query.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
import anyio.abc
import apsw
from _common import Report, parse_args

import crdt
from corrosion import Agent, Config
from corrosion.changeset import decode_frame, encode
from corrosion.ranges import RangeSet
from corrosion.store import Store

SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER DEFAULT 0);"


BENCH_KEY = "YmVuY2g6IG9uZSBmaXhlZCBrZXksIGFsbCBub2RlcyE="  # 32 bytes, shared by the nodes


def config(base: Path, name: str, seeds: list[str], api: bool = False) -> Config:
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
        },
        "perf": {"min_sync_backoff": 1.0, "max_sync_backoff": 15.0},
    }
    if api:
        data["api"] = {"addr": "127.0.0.1:0"}
    return Config.from_mapping(data)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def spread(n: int, writes: int, workers: int | None = None) -> list[float]:
    """Seconds from commit until every other node applied it, per write.

    Node 0 (the writer) runs here; the other n - 1 agents run in ``workers`` processes (by
    default one each, as agents are deployed: many agents in one process would share one GIL
    and one event loop). Apply times are wall-clock times recorded in each process (one
    machine: one clock)."""
    workers = workers or n - 1
    base = Path(tempfile.mkdtemp(prefix=f"spread{n}-"))
    writer = Agent(config(base, "n0", []))
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


def apply_ratio(versions: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="apply-") as tmp:
        return _apply_ratio(Path(tmp), versions)


def _apply_ratio(base: Path, versions: int) -> tuple[float, float]:
    src = Store(base / "src.db")
    src.apply_schema(SCHEMA)
    for i in range(versions):
        src.execute_local(
            [
                ("INSERT INTO kv (k, v, n) VALUES (?, ?, ?)", (f"k{i}-{j}", "x" * 20, j))
                for j in range(10)
            ],
            ts=i,
        )
    items = list(src.serve(src.actor_id, RangeSet([(1, versions)]), max_versions=versions))
    frames = [encode(x) for x in items]
    changes = [c for x in items for c in x.changes]

    dst = crdt.connect(str(base / "plain.db"), wal=True)
    dst.execute("PRAGMA synchronous = NORMAL")
    dst.execute(SCHEMA)
    dst.execute("SELECT crsql_as_crr('kv')")
    t = time.perf_counter()
    crdt.merge(dst, changes)
    plain = len(changes) / (time.perf_counter() - t)

    store = Store(base / "agent.db")
    store.apply_schema(SCHEMA)
    t = time.perf_counter()
    decoded = [decode_frame(f)[1] for f in frames]
    for i in range(0, len(decoded), 1000):
        store.apply(decoded[i : i + 1000])
    agent = len(changes) / (time.perf_counter() - t)
    for closable in (src, dst, store):
        closable.close()
    return agent, plain


async def query_ratio(rows: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="query-") as tmp:
        return await _query_ratio(Path(tmp), rows)


async def _query_ratio(base: Path, rows: int) -> tuple[float, float]:
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
        t = time.perf_counter()
        direct = len(conn.execute(sql).fetchall()) / (time.perf_counter() - t)
        conn.close()
        host, port = agent.api_addrs[0]
        # the client runs in its own process, so its parsing does not slow the server down
        client = (
            "import httpx, json, sys, time\n"
            "t = time.perf_counter(); n = 0\n"
            "with httpx.stream('POST', sys.argv[1], json=sys.argv[2], timeout=120) as r:\n"
            "    for chunk in r.iter_bytes():\n"
            "        n += chunk.count(b'\\n')\n"
            "print(json.dumps([n - 2, time.perf_counter() - t]))\n"  # columns and eoq lines
        )
        out = await anyio.run_process(
            [sys.executable, "-c", client, f"http://{host}:{port}/v1/queries", sql]
        )
        got, elapsed = json.loads(out.stdout)
        assert got == rows, got
        return got / elapsed, direct


async def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    report = Report(args.json)
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
    agent_rate, plain_rate = apply_ratio(300 if args.quick else 2000)
    report.metric(
        "agent_apply_ratio",
        agent_rate / plain_rate,
        "x",
        "crdt.merge alone",
        agent_changes_per_s=round(agent_rate),
        merge_changes_per_s=round(plain_rate),
    )
    http, direct = await query_ratio(20_000 if args.quick else 100_000)
    report.metric(
        "query_ratio",
        http / direct,
        "x",
        "direct SQLite read (apsw)",
        http_rows_per_s=round(http),
        direct_rows_per_s=round(direct),
    )


if __name__ == "__main__":
    anyio.run(main)
