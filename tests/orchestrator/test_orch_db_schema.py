"""Per-machine databases at fleet scale: each machine's step log records its schema, which is
published with the machine; an upgrade migrates the logs lazily on a write and in the background
at a bounded rate; a database whose migration fails is left as it was, reported, and still
answers reads."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import anyio
import apsw
import httpx
import pytest
from agent_helpers import agent_config, rows, seed_addr
from support import start_machine, wait_for

from corrosion import Agent
from corrosion.runtime.extensions import load_extensions
from orchestrator.api import create_app
from orchestrator.drivers import FakeDriver
from orchestrator.engine import Backoff
from orchestrator.publish import MACHINES_SCHEMA, MemoryPublisher
from orchestrator.service import Orchestrator
from orchestrator.steplog import MachineLog, migrate_file
from orchestrator.steplog_schema import (
    SCHEMA_SQL,
    SCHEMA_VERSION,
    MigrationFailedError,
    SchemaTarget,
)

pytestmark = pytest.mark.anyio
FAST = Backoff(initial=0.001, maximum=0.01)
CONFIG = {"image": "busybox", "init": {"cmd": ["sleep", "600"]}}

# the next release's schema, rehearsed: a new table and a new constraint on existing data
NEXT = SchemaTarget(
    SCHEMA_VERSION + 1,
    SCHEMA_SQL
    + "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);\n"
    + "CREATE UNIQUE INDEX history_run_id ON history (run_id);\n",
)


def orch(tmp_path: Path, publisher=None, driver=None, **kw) -> Orchestrator:
    return Orchestrator(
        machines_path=tmp_path / "machines",
        driver=driver if driver is not None else FakeDriver(),
        publisher=publisher,
        worker="w1",
        backoff=FAST,
        **kw,
    )


async def make_machines(tmp_path: Path, n: int, driver: FakeDriver) -> list[str]:
    """``n`` started machines, their logs on this release's schema; the service stopped (the
    machines keep running in ``driver``, as they would across a worker's upgrade)."""
    async with orch(tmp_path, driver=driver) as o:
        mids = [(await o.create_machine("app", {"config": CONFIG}))["id"] for _ in range(n)]
        for mid in mids:
            assert await o.wait_machine("app", mid, state="started", timeout=30)
        await wait_for(lambda: not any(o.engine.busy(m) for m in mids), 30, "runs to finish")
    return mids


def file_schema(tmp_path: Path, mid: str) -> tuple[int, list]:
    """The database's user_version and its schema, read straight from the file."""
    conn = apsw.Connection(str(tmp_path / "machines" / f"{mid}.sqlite"))
    try:
        version = conn.execute("PRAGMA user_version").fetchall()[0][0]
        sql = conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
        return version, sql
    finally:
        conn.close()


def published(pub: MemoryPublisher) -> dict[str, tuple]:
    return {
        mid: (r["schema_version"], r["schema_state"], r["schema_hash"])
        for mid, r in pub.rows().items()
    }


async def test_a_new_machine_records_and_publishes_its_schema(tmp_path):
    pub = MemoryPublisher()
    async with orch(tmp_path, pub) as o:
        view = await o.create_machine("app", {"config": CONFIG})
        mid = view["id"]
        assert view["db_schema"]["version"] == SCHEMA_VERSION
        assert view["db_schema"]["state"] == "current"
        (listed,) = o.list_machines("app")
        assert listed["db_schema"] == o.get_machine("app", mid)["db_schema"] == view["db_schema"]
        hash_ = view["db_schema"]["hash"]
        await wait_for(
            lambda: published(pub).get(mid) == (SCHEMA_VERSION, "current", hash_), 30, "the row"
        )
    conn = apsw.Connection(str(tmp_path / "machines" / f"{mid}.sqlite"))
    assert conn.execute("SELECT version, hash FROM schema_meta").fetchall() == [
        (SCHEMA_VERSION, hash_)
    ]
    conn.close()


async def test_an_old_database_migrates_lazily_on_its_first_write(tmp_path):
    driver = FakeDriver()
    a, b = await make_machines(tmp_path, 2, driver)
    pub = MemoryPublisher()
    async with orch(tmp_path, pub, driver, schema_target=NEXT, migration_rate=0) as o:
        # opened and served as they are: reads work on the old schema
        for mid in (a, b):
            schema = o.get_machine("app", mid)["db_schema"]
            assert (schema["version"], schema["state"]) == (SCHEMA_VERSION, "pending")
        assert await o.machine_events("app", a)
        await wait_for(lambda: len(published(pub)) == 2, 30, "both rows")
        assert {v[:2] for v in published(pub).values()} == {(SCHEMA_VERSION, "pending")}

        await o.set_metadata("app", a, "role", "db")  # a write: migrates a's database first

        assert o.get_machine("app", a)["db_schema"] == {
            "version": NEXT.version, "hash": NEXT.hash, "state": "current", "error": "",
        }  # fmt: skip
        assert o.get_machine("app", b)["db_schema"]["state"] == "pending"  # untouched
        assert o.get_metadata("app", a) == {"role": "db"}
        await wait_for(
            lambda: published(pub)[a] == (NEXT.version, "current", NEXT.hash), 30, "a's new row"
        )
        assert published(pub)[b][:2] == (SCHEMA_VERSION, "pending")
    version, sql = file_schema(tmp_path, a)
    assert version == NEXT.version and "history_run_id" in {name for name, _ in sql}
    assert file_schema(tmp_path, b)[0] == SCHEMA_VERSION


async def test_background_migration_reaches_every_machine_at_a_bounded_rate(tmp_path):
    driver = FakeDriver()
    mids = await make_machines(tmp_path, 5, driver)
    pub = MemoryPublisher()
    rate = 4.0
    began = anyio.current_time()
    async with orch(tmp_path, pub, driver, schema_target=NEXT, migration_rate=rate) as o:
        # the API answers while the migrator works
        assert len(o.list_machines("app")) == 5

        def all_current() -> bool:
            return all(o.get_machine("app", m)["db_schema"]["state"] == "current" for m in mids)

        await wait_for(all_current, 60, "every database migrated")
        took = anyio.current_time() - began
        assert o.migrations is not None and o.migrations.migrated == 5
        await wait_for(
            lambda: set(published(pub).values()) == {(NEXT.version, "current", NEXT.hash)},
            30,
            "every row on the new version",
        )
        families = {name: samples for name, _, _, samples in o.metrics.families(o)}
        assert ({"version": str(NEXT.version), "state": "current"}, 5.0) in families[
            "orch_machine_db_schema"
        ]
    # a bound, not a speed: 5 migrations at 4/s cannot all be done before 4 intervals passed
    assert took >= 4 / rate
    assert all(file_schema(tmp_path, m)[0] == NEXT.version for m in mids)


async def test_a_failed_migration_leaves_the_database_as_it_was_and_the_machine_answering(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="orchestrator")
    driver = FakeDriver()
    good, bad = await make_machines(tmp_path, 2, driver)
    # data the next schema's new unique index rejects
    conn = apsw.Connection(str(tmp_path / "machines" / f"{bad}.sqlite"))
    for seq in (1001, 1002):
        conn.execute(
            "INSERT INTO history (seq, run_id, action, steps, finalizers, status, created_at, "
            "request, events) VALUES (?, 'dup', 'x', '[]', '[]', 'succeeded', 1, '{}', '[]')",
            (seq,),
        )
    conn.close()
    before = file_schema(tmp_path, bad)
    pub = MemoryPublisher()
    async with orch(tmp_path, pub, driver, schema_target=NEXT, migration_rate=100) as o:
        assert o.migrations is not None
        await o.migrations.background_done.wait()
        assert o.get_machine("app", good)["db_schema"]["state"] == "current"
        schema = o.get_machine("app", bad)["db_schema"]
        assert schema["state"] == "migration_failed" and schema["version"] == SCHEMA_VERSION
        assert "UNIQUE constraint failed: history.run_id" in schema["error"]
        # reported: one ERROR line, the metric, the published row
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and bad in r.message]
        assert len(errors) == 1 and "left as it was" in errors[0].message
        families = {name: samples for name, _, _, samples in o.metrics.families(o)}
        assert ({"result": "failed"}, 1.0) in families["orch_machine_db_migrations_total"]
        await wait_for(
            lambda: pub.rows().get(bad, {}).get("schema_state") == "migration_failed", 30, "row"
        )
        assert "UNIQUE" in pub.rows()[bad]["schema_error"]
        # reads still work; a write is refused with a clear error and changes nothing
        assert {m["id"] for m in o.list_machines("app")} == {good, bad}
        assert o.get_machine("app", bad)["state"] == "started"
        assert await o.machine_events("app", bad)
        with pytest.raises(MigrationFailedError, match="UNIQUE constraint failed") as e:
            await o.set_metadata("app", bad, "role", "db")
        assert e.value.status == 503
        with pytest.raises(MigrationFailedError):
            await o.stop_machine("app", bad)
        assert o.get_metadata("app", bad) == {} and o.get_machine("app", bad)["state"] == "started"
        # the same through the Machines API
        transport = httpx.ASGITransport(app=create_app(o, manage=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://orch") as api:
            got = await api.get(f"/v1/apps/app/machines/{bad}")
            assert got.status_code == 200
            assert got.json()["db_schema"]["state"] == "migration_failed"
            refused = await api.post(f"/v1/apps/app/machines/{bad}/stop")
            assert refused.status_code == 503
            assert "could not be migrated" in refused.json()["error"]
            assert (await api.get(f"/v1/apps/app/machines/{bad}/events")).status_code == 200
        await o.set_metadata("app", good, "role", "db")  # the others are unaffected
    assert file_schema(tmp_path, bad) == before


async def test_a_damaged_database_is_reported_and_the_worker_still_starts(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    driver = FakeDriver()
    (good,) = await make_machines(tmp_path, 1, driver)
    damaged = tmp_path / "machines" / "d8e2a4c6b1f3e5.sqlite"
    damaged.write_bytes(b"not a database " * 512)
    async with orch(tmp_path, driver=driver, schema_target=NEXT) as o:
        assert o.migrations is not None
        await o.migrations.background_done.wait()
        assert [m["id"] for m in o.list_machines("app")] == [good]
        assert o.get_machine("app", good)["db_schema"]["state"] == "current"
        status = o.migrations.status(damaged.stem)
        assert status is not None and status.state == "migration_failed"
        assert "NotADBError" in status.error
        assert any(r.levelno == logging.ERROR and damaged.stem in r.message for r in caplog.records)
    assert damaged.read_bytes() == b"not a database " * 512


async def test_the_published_schema_version_is_visible_on_another_nodes_replica(tmp_path):
    """Real agents: a worker publishes its machines' schema versions; another node's replica
    answers the fleet query."""
    cfg = agent_config(
        tmp_path,
        "w1",
        orchestrator={"machines_path": str(tmp_path / "machines"), "driver": "fake"},
    )
    (tmp_path / "machines.sql").write_text(MACHINES_SCHEMA)
    async with Agent(cfg, extensions=load_extensions(cfg)) as w1:
        base = agent_config(tmp_path, "w2", [seed_addr(w1)], with_api=False)
        other = dataclasses.replace(
            base,
            db=dataclasses.replace(
                base.db, schema_paths=(*base.db.schema_paths, tmp_path / "machines.sql")
            ),
        )
        async with Agent(other) as w2:
            mids = [await start_machine(w1.api_addrs[0]) for _ in range(2)]
            host, port = w1.api_addrs[0]
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=30) as api:
                got = (await api.get(f"/v1/apps/web/machines/{mids[0]}")).json()
            assert got["db_schema"]["version"] == SCHEMA_VERSION

            async def fleet() -> bool:
                return await rows(
                    w2, "SELECT schema_version, schema_state, count(*) FROM machines GROUP BY 1, 2"
                ) == [(SCHEMA_VERSION, "current", 2)]

            await wait_for(fleet, what="the fleet query on the other node's replica")


def test_two_logs_of_one_file_migrate_it_once(tmp_path):
    """The background sweep (another process) migrates a file an API call's log already opened
    on the older schema: that log's next write re-checks under the write lock and just writes."""
    path = tmp_path / "m.sqlite"
    old = MachineLog(path)
    old.write_doc({"id": "m"}, at=1.0)
    old.close()
    api_log = MachineLog(path, target=NEXT)
    assert api_log.read_doc() == {"id": "m"}
    assert api_log.status is not None and api_log.status.state == "pending"
    assert migrate_file(str(path), NEXT).state == "current"
    api_log.write_doc({"id": "m", "n": 2}, at=2.0)
    assert api_log.status is not None and api_log.status.state == "current"
    assert api_log.read_doc() == {"id": "m", "n": 2}
    api_log.close()
    conn = apsw.Connection(str(path))
    assert conn.execute("SELECT version, hash FROM schema_meta").fetchall() == [
        (NEXT.version, NEXT.hash)
    ]
    conn.close()
