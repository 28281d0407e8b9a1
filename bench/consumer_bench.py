"""Consumer benchmarks: a fly-proxy-like subscription, each figure beside a baseline measured in
the same run.

The subscription: every started machine joined with its service (one row per machine, 10k
machines; ``--quick``: 2k), its keys projected so a changed machine is an ``update``:

    SELECT m.id, m.app, m.region, m.ip, s.id, s.protocol, s.port
    FROM machines m JOIN services s ON s.machine_id = m.id WHERE m.state = 'started'

* ``sub_incremental_ratio``: the cost of bringing the subscription up to date after one changed
  machine (the rows of that machine's key: restricted query, diff, the subscription's file,
  the event) ÷ the same with the full re-run of the query and its diff, on the same database,
  median wall-clock time of many changes (``cpu_ratio``: the same in CPU time of all threads,
  which a loaded machine's scheduling delays do not inflate). Target ≤ 0.05.
* ``sub_event_p99_ms``: from a client's ``POST /v1/transactions`` changing one machine to the
  ``change`` line on its ``/v1/subscriptions`` stream, p99, a real agent on loopback (the client
  in a process of its own, one change at a time). Beside it, the same with the full re-run
  (``full_rerun_p99_ms``). Target < 50 ms.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
from _common import Report, parse_args

from corrosion import Agent, Config
from corrosion.core.store import Store
from corrosion.runtime.reads import Reads
from corrosion.runtime.subscriptions import Subscriptions

SCHEMA = """
CREATE TABLE IF NOT EXISTS machines (
    id TEXT NOT NULL PRIMARY KEY, app TEXT, state TEXT, region TEXT, ip TEXT, version INTEGER
);
CREATE TABLE IF NOT EXISTS services (
    id INTEGER NOT NULL PRIMARY KEY, machine_id TEXT, protocol TEXT, port INTEGER
);
CREATE INDEX IF NOT EXISTS services_machine ON services (machine_id);
"""
QUERY = (
    "SELECT m.id, m.app, m.region, m.ip, s.id, s.protocol, s.port "
    "FROM machines m JOIN services s ON s.machine_id = m.id WHERE m.state = 'started'"
)
CHANGE = "UPDATE machines SET version = version + 1, ip = ? WHERE id = ?"
KEY = "YmVuY2g6IG9uZSBmaXhlZCBrZXksIGFsbCBub2RlcyE="  # gossip key (32 bytes), one node
REGIONS = ["ams", "iad", "sjc", "syd", "fra", "nrt"]


def machine_rows(n: int) -> list[list[Any]]:
    """``INSERT`` statements for ``n`` machines (19 of 20 started) and their services."""
    statements: list[list[Any]] = []
    for i in range(n):
        state = "stopped" if i % 20 == 19 else "started"
        statements.append(
            [
                "INSERT INTO machines (id, app, state, region, ip, version) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                [f"m{i:06d}", f"app{i % 500}", state, REGIONS[i % 6], f"fdaa::{i:x}"],
            ]
        )
        statements.append(
            [
                "INSERT INTO services (id, machine_id, protocol, port) VALUES (?, ?, ?, ?)",
                [i, f"m{i:06d}", "tcp", 8000 + i % 1000],
            ]
        )
    return statements


def changed(n: int, i: int) -> list[Any]:
    """The ``i``-th change: one started machine gets a new address."""
    machine = (i * 7919) % n
    if machine % 20 == 19:
        machine -= 1
    return [CHANGE, [f"fdaa::{i:x}:{machine:x}", f"m{machine:06d}"]]


async def incremental_ratio(
    base: Path, machines: int, changes: int
) -> tuple[dict[bool, float], dict[bool, float], int]:
    """Median seconds per change, wall-clock and CPU (all threads), by path (True:
    incremental); and the rows of the result."""
    store = Store(base / "state.db")
    store.apply_schema(SCHEMA)
    rows = machine_rows(machines)
    for i in range(0, len(rows), 5000):
        _, commit = store.execute_local([(sql, p) for sql, p in rows[i : i + 5000]], i + 1)
        store.install(commit)
    reads = Reads(base / "state.db")
    timing: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    managers = {
        incremental: Subscriptions(
            reads.connection,
            reads.release,
            directory=base / f"subs-{incremental}",
            incremental=incremental,
        )
        for incremental in (True, False)
    }
    try:
        subs = {}
        for incremental, manager in managers.items():
            await manager.restore()  # takes the directory
            subs[incremental], _ = await manager.get_or_create(QUERY, ())
            assert (subs[incremental].plan is not None) == incremental
        size = len(subs[True].rows)
        for i in range(changes):
            sql, params = changed(machines, i)
            _, commit = store.execute_local([(sql, params)], 100_000 + i)
            store.install(commit)
            assert commit is not None
            for incremental, manager in managers.items():
                sub = subs[incremental]
                before = sub.change_id
                t, c = time.perf_counter(), time.process_time()
                manager.notify(commit.changes)
                await manager.evaluate(sub)
                timing[incremental].append(time.perf_counter() - t)
                cpu[incremental].append(time.process_time() - c)
                assert sub.change_id == before + 1, "one update per change"
        assert subs[True].rows == subs[False].rows
    finally:
        for manager in managers.values():
            manager.close()
        reads.close()
        store.close()
    wall = {path: statistics.median(t) for path, t in timing.items()}
    return wall, {path: statistics.median(t) for path, t in cpu.items()}, size


CLIENT = """
import httpx, json, sys, time
url, sql, n, changes = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
latencies = []
with httpx.Client(base_url=url, timeout=60) as writer, httpx.Client(base_url=url, timeout=60) as c:
    with c.stream("POST", "/v1/subscriptions", json=sql) as r:
        lines = r.iter_lines()
        for line in lines:
            if "eoq" in json.loads(line):
                break
        for change in changes[:n]:
            t = time.perf_counter()
            writer.post("/v1/transactions", json=[change]).raise_for_status()
            msg = json.loads(next(lines))
            latencies.append(time.perf_counter() - t)
            assert msg["change"][0] == "update", msg
print(json.dumps(latencies))
"""


def agent_config(base: Path) -> Config:
    schema = base / "schema.sql"
    schema.write_text(SCHEMA)
    return Config.from_mapping(
        {
            "db": {"path": str(base / "agent" / "state.db"), "schema_paths": [str(schema)]},
            "gossip": {"addr": "127.0.0.1:0", "encryption_keys": [KEY], "preset": "local"},
            "api": {"addr": "127.0.0.1:0"},
        }
    )


async def event_latencies(base: Path, machines: int, changes: int) -> dict[bool, list[float]]:
    """Change-to-event seconds through the HTTP API, incremental and full re-run."""
    out: dict[bool, list[float]] = {}
    async with Agent(agent_config(base)) as agent:
        rows = machine_rows(machines)
        for i in range(0, len(rows), 5000):
            await agent.execute(rows[i : i + 5000])
        host, port = agent.api_addrs[0]
        for incremental in (True, False):
            agent.subscriptions.incremental = incremental
            # another spelling of the query: its own subscription, made with this setting
            sql = QUERY if incremental else QUERY.replace("SELECT", "select", 1)
            todo = [changed(machines, i + 1000 * incremental) for i in range(changes)]
            ran = await anyio.run_process(
                [
                    sys.executable,
                    "-c",
                    CLIENT,
                    f"http://{host}:{port}",
                    sql,
                    str(changes),
                    json.dumps(todo),
                ],
                check=False,
            )
            if ran.returncode != 0:
                raise RuntimeError(ran.stderr.decode()[-2000:])
            out[incremental] = json.loads(ran.stdout)
        subs = list(agent.subscriptions.by_id.values())
        assert sorted(s.plan is not None for s in subs) == [False, True], "one of each kind"
    return out


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def main(args: Any, report: Report) -> None:
    machines = 2_000 if args.quick else 10_000
    with tempfile.TemporaryDirectory(prefix="consumer-") as tmp:
        wall, cpu, size = await incremental_ratio(Path(tmp), machines, 50 if args.quick else 200)
    report.metric(
        "sub_incremental_ratio",
        wall[True] / wall[False],
        "x",
        "full re-run and diff of the same query",
        machines=machines,
        rows=size,
        incremental_ms=round(wall[True] * 1000, 3),
        full_rerun_ms=round(wall[False] * 1000, 3),
        cpu_ratio=round(cpu[True] / cpu[False], 4),
    )
    with tempfile.TemporaryDirectory(prefix="consumer-") as tmp:
        latencies = await event_latencies(Path(tmp), machines, 100 if args.quick else 300)
    report.metric(
        "sub_event_p99_ms",
        p99(latencies[True]) * 1000,
        "ms",
        "the same with the full re-run",
        machines=machines,
        p50_ms=round(statistics.median(latencies[True]) * 1000, 2),
        full_rerun_p99_ms=round(p99(latencies[False]) * 1000, 2),
        full_rerun_p50_ms=round(statistics.median(latencies[False]) * 1000, 2),
    )


if __name__ == "__main__":
    args = parse_args(__doc__.split("\n")[0])
    anyio.run(main, args, Report(args.json))
