"""Orchestrator numbers: machine create → started latency per driver, and step-log append rate.

* ``create_to_started_p50_ms_<driver>`` / ``create_to_started_p90_ms_<driver>`` — from
  ``create_machine`` to the machine being ``started`` (the create run's START, five logged
  steps, the driver's create and start), for fake, process and runc. Machines are created one
  after another; each is destroyed afterwards.
* ``started_to_visible_p90_ms`` — two corrosion agents gossiping on loopback; an orchestrator
  publishing through the first; from a machine being ``started`` on worker 1 to its row reading
  ``started`` in worker 2's replica (publish queue, local transaction, broadcast, apply).
* ``steplog_append_ratio`` — COMPLETE appends per second through ``MachineLog.append`` divided by
  single-row inserts per second into a plain SQLite table with the same durability (WAL,
  ``synchronous=FULL``, one transaction per row), measured in the same run.

``--quick`` finishes in under a minute; ``--json`` prints one JSON object per metric and line.
runc figures are left out (with a note on stderr) where runc, root or busybox-static is missing.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import anyio
import apsw
from _common import Report, parse_args

from orchestrator.drivers import FakeDriver, ProcessDriver, RuncDriver, runc_available
from orchestrator.service import Orchestrator
from orchestrator.steplog import EventKind, MachineLog, RunRecord

FLY_BASELINE = "Fly flaps create P90 < 5 s; target p90 < 100 ms locally with runc"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


async def create_to_started(kind: str, n: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        base = Path(tmp)
        if kind == "fake":
            driver = FakeDriver()
        elif kind == "process":
            driver = ProcessDriver(base / "instances")
        else:
            driver = RuncDriver(base / "instances")
        config = {
            "image": "busybox",
            "init": {"exec": ["sleep", "3600"]},
            "stop_config": {"timeout": "100ms"},
        }
        samples: list[float] = []
        async with Orchestrator(machines_path=base / "machines", driver=driver) as orch:
            # warm-up: first-use costs (image build, imports, thread pool) are not create latency
            warm = await orch.create_machine("bench", {"config": config})
            await orch.wait_machine("bench", warm["id"], state="started", timeout=60)
            ids = [warm["id"]]
            for _ in range(n):
                t0 = time.perf_counter()
                view = await orch.create_machine("bench", {"config": config})
                ok = await orch.wait_machine("bench", view["id"], state="started", timeout=60)
                elapsed = time.perf_counter() - t0
                if not ok:
                    raise RuntimeError(f"{kind}: machine {view['id']} did not start in 60 s")
                samples.append(elapsed * 1000)
                ids.append(view["id"])
            for mid in ids:
                await orch.destroy_machine("bench", mid, force=True)
            for mid in ids:
                await orch.wait_machine("bench", mid, state="destroyed", timeout=60)
            with anyio.fail_after(60):
                while orch.engine.list_runs():
                    await anyio.sleep(0.01)
        if kind != "fake":
            await driver.destroy_all()
        return samples


async def started_to_visible(n: int) -> list[float]:
    """Two agents on loopback; an orchestrator (fake driver) publishes through the first; time
    from a machine being started on worker 1 to its row reading 'started' on worker 2."""
    from corrosion import Agent, Config
    from corrosion.config import generate_key
    from orchestrator.publish import MACHINES_SCHEMA

    class AgentPublisher:
        def __init__(self, agent) -> None:
            self.agent = agent

        async def execute(self, statements):
            return await self.agent.execute(list(statements))

    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        base = Path(tmp)
        (base / "schema.sql").write_text(MACHINES_SCHEMA)
        key = generate_key()  # the two agents' shared gossip key

        def config(name: str, seeds: list[str]) -> Config:
            return Config.from_mapping(
                {
                    "db": {"path": str(base / name / "state.db"),
                           "schema_paths": [str(base / "schema.sql")]},
                    "gossip": {"addr": "127.0.0.1:0", "bootstrap": seeds, "preset": "local",
                               "encryption_keys": [key]},
                }
            )  # fmt: skip

        samples: list[float] = []
        async with Agent(config("w1", [])) as w1:
            host, port = w1.swim.address
            async with Agent(config("w2", [f"{host}:{port}"])) as w2:
                reader = apsw.Connection(str(w2.config.db.path))
                reader.execute("PRAGMA query_only = 1")
                with anyio.fail_after(60):
                    while w1.alive_members() < 1 or w2.alive_members() < 1:
                        await anyio.sleep(0.05)
                orch = Orchestrator(
                    machines_path=base / "machines",
                    driver=FakeDriver(),
                    worker="w1",
                    publisher=AgentPublisher(w1),
                )
                config_ = {"image": "busybox", "init": {"exec": ["sleep", "3600"]}}
                async with orch:
                    for i in range(n + 1):  # the first one warms up
                        mid = (await orch.create_machine("bench", {"config": config_}))["id"]
                        await orch.wait_machine("bench", mid, state="started", timeout=60)
                        t0 = time.perf_counter()
                        with anyio.fail_after(60):
                            while (
                                reader.execute(
                                    "SELECT 1 FROM machines WHERE id = ? AND state = 'started'",
                                    (mid,),
                                ).fetchall()
                                == []
                            ):
                                await anyio.sleep(0.002)
                        if i:
                            samples.append((time.perf_counter() - t0) * 1000)
                reader.close()
        return samples


def steplog_rates(n: int, rounds: int = 10) -> tuple[float, float]:
    """(step-log appends/s, plain inserts/s), same file system, same durability. The two are
    measured in alternating rounds so that a noisy disk weighs on both alike."""
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        log = MachineLog(Path(tmp) / "m.sqlite")
        record = RunRecord("run", "bench", ("s",), (), {}, 0.0)
        log.start_run(record)
        response = {"instance_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "address": "127.0.0.1"}
        text = json.dumps(response)
        conn = apsw.Connection(str(Path(tmp) / "plain.sqlite"))
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, step TEXT, payload TEXT, at REAL)")
        per_round = max(1, n // rounds)
        t_log = t_plain = 0.0
        for r in range(rounds):
            t0 = time.perf_counter()
            for i in range(per_round):
                log.append("run", EventKind.COMPLETE, step=f"s{i}", payload=response, at=float(i))
            t1 = time.perf_counter()
            for i in range(per_round):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO t (step, payload, at) VALUES (?, ?, ?)", (f"s{i}", text, r)
                )
                conn.execute("COMMIT")
            t2 = time.perf_counter()
            t_log += t1 - t0
            t_plain += t2 - t1
        log.close()
        conn.close()
        total = per_round * rounds
        return total / t_log, total / t_plain


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    report = Report(args.json)
    sizes = (
        {"fake": 100, "process": 20, "runc": 15, "steplog": 1000, "visible": 20}
        if args.quick
        else {"fake": 500, "process": 100, "runc": 60, "steplog": 5000, "visible": 100}
    )
    kinds = ["fake", "process", "runc"]
    missing = runc_available()
    if missing:
        kinds.remove("runc")
        print(f"note: runc figures skipped: {missing}", file=sys.stderr)
    for kind in kinds:
        samples = anyio.run(create_to_started, kind, sizes[kind])
        for q in (50, 90):
            report.metric(
                f"create_to_started_p{q}_ms_{kind}",
                percentile(samples, q),
                "ms",
                FLY_BASELINE,
                samples=len(samples),
            )
    samples = anyio.run(started_to_visible, sizes["visible"])
    report.metric(
        "started_to_visible_p90_ms",
        percentile(samples, 90),
        "ms",
        "target < 1 s (machine started on worker 1 → row visible in worker 2's replica)",
        samples=len(samples),
        p50=round(percentile(samples, 50), 3),
    )
    steplog, plain = steplog_rates(sizes["steplog"])
    durable = "WAL + synchronous=FULL, one commit per row"
    report.metric("steplog_appends_per_s", steplog, "1/s", durable)
    report.metric("plain_sqlite_inserts_per_s", plain, "1/s", durable)
    report.metric(
        "steplog_append_ratio", steplog / plain, "x", "plain sqlite insert, same durability"
    )


if __name__ == "__main__":
    main()
