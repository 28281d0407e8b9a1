"""Migrating a worker's per-machine databases to a new schema, with the Machines API under load.

One worker with N machines whose step logs are on this release's schema (copies of one real
machine's database, each with its own id) starts a release whose schema adds a table and a
unique index (``SchemaTarget(SCHEMA_VERSION + 1, ...)``), with the background migrator off. A
client in another process calls ``GET /v1/apps/bench/machines/<id>`` over HTTP every
``--interval-ms`` and records each latency: first for ``--baseline-s`` with no migration running
(the baseline), then while the background migrator (``orchestrator.migrations``) migrates all N
databases at up to ``--rate`` per second. Figures:

* ``fleet_migration_total_s`` — from starting the migrator to the last database migrated;
* ``fleet_migration_per_db_ms`` — wall time per database (total / N) and the time one migration
  step takes (thread hand-off included);
* ``fleet_migration_start_s`` — the worker's start with N databases to migrate (they are opened
  and read, not migrated);
* ``api_latency_*_ms`` — p50, p99, p99.9 and max of the client's calls, without (for
  ``--baseline-s``) and during the migration, and ``api_worst_pause_ratio`` = max during / max
  without (same run; the migration lasts longer, so its max is over more calls).

``--quick``: 1,000 machines; default 10,000. ``--json``: one JSON object per metric.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import anyio
import apsw
from _common import Report, parse_args

from corrosion.surfaces.asgi_server import serve_asgi
from orchestrator.api import create_app
from orchestrator.drivers import FakeDriver
from orchestrator.service import Orchestrator
from orchestrator.steplog_schema import SCHEMA_SQL, SCHEMA_VERSION, SchemaTarget

APP = "bench"
NEXT = SchemaTarget(
    SCHEMA_VERSION + 1,
    SCHEMA_SQL
    + "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);\n"
    + "CREATE UNIQUE INDEX history_run_id ON history (run_id);\n",
)

# the client: GET one of the machines every interval until the stop file appears (after its
# first answer it creates the ready file); prints the latencies (ms) as one JSON list
CLIENT = r"""
import json, os, sys, time, httpx
url, ids, interval, stop = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3]), sys.argv[4]
out = []
with httpx.Client(base_url=url, timeout=60) as c:
    assert c.get(f"/v1/apps/bench/machines/{ids[0]}").status_code == 200
    open(stop + ".ready", "w").close()
    i = 0
    while not os.path.exists(stop):
        t0 = time.perf_counter()
        r = c.get(f"/v1/apps/bench/machines/{ids[i % len(ids)]}")
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
        i += 1
        time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
print(json.dumps(out))
"""


async def template(base: Path) -> tuple[Path, dict]:
    """One real machine's database (created through the service, not launched) and its doc."""
    async with Orchestrator(machines_path=base / "template", driver=FakeDriver()) as orch:
        view = await orch.create_machine(APP, {"config": {"image": "busybox"}, "skip_launch": True})
        mid = view["id"]
        assert await orch.wait_machine(APP, mid, state="created", timeout=60)
        with anyio.fail_after(60):
            while orch.engine is not None and orch.engine.busy(mid):
                await anyio.sleep(0.01)
        doc = orch.doc(mid)
    path = base / "template" / f"{mid}.sqlite"
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path, dict(doc)


def populate(dest: Path, template_path: Path, doc: dict, n: int) -> list[str]:
    """``n`` copies of the template database, each rewritten to its own machine id."""
    dest.mkdir(parents=True)
    ids = [f"m{i:07d}" for i in range(n)]
    for mid in ids:
        path = dest / f"{mid}.sqlite"
        shutil.copyfile(template_path, path)
        conn = apsw.Connection(str(path))
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("UPDATE machine SET doc = ?", (json.dumps({**doc, "id": mid}),))
        conn.close()
    return ids


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=1000, method="inclusive") if len(ordered) > 1 else [0] * 999
    return {"p50": statistics.median(ordered), "p99": q[989], "p999": q[998], "max": ordered[-1],
            "n": len(ordered)}  # fmt: skip


class Client:
    """The API client process; ``stop()`` returns its latencies."""

    def __init__(self, url: str, ids: list[str], interval_ms: float, workdir: Path) -> None:
        self.stop_file = workdir / f"stop-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, ",".join(ids), str(interval_ms / 1000),
             str(self.stop_file)],
            stdout=subprocess.PIPE,
        )  # fmt: skip

    async def ready(self) -> None:
        """Wait until the client has imported, connected and had a first answer."""
        ready = Path(f"{self.stop_file}.ready")
        with anyio.fail_after(120):
            while not ready.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the API client failed (exit {self.proc.returncode})")
                await anyio.sleep(0.05)

    async def stop(self) -> list[float]:
        self.stop_file.touch()
        out, _ = await anyio.to_thread.run_sync(self.proc.communicate)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the API client failed (exit {self.proc.returncode})")
        return [float(x) for x in json.loads(out)]


async def run(args) -> None:
    report = Report(args.json)
    n = 1000 if args.quick else args.machines
    if args.quick:
        args.baseline_s = min(args.baseline_s, 5.0)
    with tempfile.TemporaryDirectory(prefix="fleet-migration-bench-") as tmp:
        base = Path(tmp)
        tpl, doc = await template(base)
        t0 = time.perf_counter()
        ids = populate(base / "machines", tpl, doc, n)
        report.info(f"{n} machine databases at schema {SCHEMA_VERSION} made in "
                    f"{time.perf_counter() - t0:.1f} s; migrating to {NEXT.version}")  # fmt: skip
        orch = Orchestrator(
            machines_path=base / "machines",
            driver=FakeDriver(),
            schema_target=NEXT,
            migration_rate=0,  # started by hand below, after the baseline
        )
        t0 = time.perf_counter()
        async with orch, anyio.create_task_group() as tg:
            started_s = time.perf_counter() - t0
            mig = orch.migrations
            assert mig is not None and len(orch.store.pending_migrations()) == n
            server = await serve_asgi(create_app(orch, manage=False), tg, "127.0.0.1", 0)
            host, port = server.address
            url = f"http://{host}:{port}"
            sample = ids[:: max(1, n // 50)]

            client = Client(url, sample, args.interval_ms, base)
            await client.ready()
            await anyio.sleep(args.baseline_s)
            baseline = await client.stop()

            client = Client(url, sample, args.interval_ms, base)
            await client.ready()  # the client is calling before the migration begins
            mig.rate = args.rate
            t0 = time.perf_counter()
            await mig.run()
            total_s = time.perf_counter() - t0
            during = await client.stop()
            left = orch.store.pending_migrations()
            server.close()
            tg.cancel_scope.cancel()
        if left or mig.migrated != n:
            raise RuntimeError(f"{len(left)} databases not migrated ({mig.migrated} of {n})")

    b, d = stats(baseline), stats(during)
    report.metric("fleet_migration_total_s", total_s, "s", f"{n} databases at <= {args.rate:g}/s",
                  machines=n, floor_s=round(n / args.rate, 2))  # fmt: skip
    report.metric("fleet_migration_per_db_ms", total_s * 1000 / n, "ms", "wall time / databases",
                  step_ms=round(mig.step_seconds * 1000 / n, 3))  # fmt: skip
    report.metric("fleet_migration_start_s", started_s, "s", f"start with {n} databases pending")
    for name, s in (("baseline", b), ("during", d)):
        for q in ("p50", "p99", "p999", "max"):
            report.metric(f"api_latency_{name}_{q}_ms", s[q], "ms",
                          "GET machine, no migration" if name == "baseline"
                          else "GET machine, during the migration", calls=s["n"])  # fmt: skip
    report.metric("api_worst_pause_ratio", d["max"] / b["max"], "x", "max during / max baseline",
                  p99_ratio=round(d["p99"] / b["p99"], 2))  # fmt: skip


def extra(p) -> None:
    p.add_argument("--machines", type=int, default=10_000, help="machine databases (default)")
    p.add_argument("--rate", type=float, default=500.0, help="background migrations per second")
    p.add_argument("--interval-ms", type=float, default=5.0, help="API client's call interval")
    p.add_argument("--baseline-s", type=float, default=20.0, help="baseline measuring time")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra)
    anyio.run(run, args)


if __name__ == "__main__":
    main()
