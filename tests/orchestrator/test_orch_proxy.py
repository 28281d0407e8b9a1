"""The proxy-like consumer: two workers, each with its own orchestrator and its own replica of
the machines table (kept in sync by merging CRR changes both ways — gossip's stand-in until the
agent lands), and a proxy reading worker 2's replica. A real process started on worker 1 gets
the traffic sent to worker 2's proxy; stopping or cordoning it takes it out of rotation."""

from __future__ import annotations

import sys

import anyio
import httpx
import pytest
from orch_helpers import CrrPublisher
from support import free_port, wait_for

import crdt
from orchestrator.drivers import ProcessDriver
from orchestrator.engine import Backoff
from orchestrator.proxy import Proxy, SqliteReplica
from orchestrator.publish import MACHINES_SCHEMA, MACHINES_TABLE
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def replica(path):
    conn = crdt.connect(str(path), wal=True)
    conn.execute(MACHINES_SCHEMA)
    crdt.as_crr(conn, MACHINES_TABLE)
    return conn


async def test_machine_on_worker1_serves_through_proxy_on_worker2(tmp_path):
    r1, r2 = replica(tmp_path / "w1.db"), replica(tmp_path / "w2.db")
    seen = {"1to2": 0, "2to1": 0}

    async def gossip() -> None:  # both directions, every 20 ms
        while True:
            for src, dst, key in ((r1, r2, "1to2"), (r2, r1, "2to1")):
                changes = crdt.changes_since(src, seen[key], exclude_site=crdt.site_id(dst))
                if changes:
                    crdt.merge(dst, changes)
                    seen[key] = max(c[5] for c in changes)
            await anyio.sleep(0.02)

    port = free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello from worker 1\n")
    config = {
        "image": "busybox",
        "init": {"exec": [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                          "--directory", str(www)]},
        "services": [{"protocol": "tcp", "internal_port": port}],
    }  # fmt: skip

    def orch(name, conn) -> Orchestrator:
        return Orchestrator(
            machines_path=tmp_path / name / "machines",
            driver=ProcessDriver(tmp_path / name / "instances"),
            worker=name,
            publisher=CrrPublisher(conn),
            backoff=Backoff(initial=0.01, maximum=0.1),
        )

    reader = SqliteReplica(tmp_path / "w2.db")
    proxy = Proxy(reader, domain="example.test", retry_delay=0.05, connect_attempts=20)
    transport = httpx.ASGITransport(app=proxy)
    try:
        async with (
            anyio.create_task_group() as tg,
            orch("w1", r1) as w1,
            orch("w2", r2),
            httpx.AsyncClient(transport=transport, base_url="http://web.example.test") as client,
        ):
            tg.start_soon(gossip)
            r = await client.get("/hello.txt")
            assert r.status_code == 503 and "web" in r.json()["error"]

            mid = (await w1.create_machine("web", {"config": config}))["id"]
            assert await w1.wait_machine("web", mid, state="started", timeout=30)

            async def served() -> httpx.Response | None:
                r = await client.get("/hello.txt")
                return r if r.status_code == 200 else None

            async def proxied_ok() -> httpx.Response:
                return await wait_for(served, 30, "the proxy to answer 200")

            async def unavailable() -> bool:
                return (await client.get("/hello.txt")).status_code == 503

            r = await proxied_ok()
            assert r.text == "hello from worker 1\n"
            assert r.headers["fly-machine-id"] == mid and r.headers["fly-worker"] == "w1"
            pinned = await client.get("/hello.txt", headers={"fly-force-instance-id": mid})
            assert pinned.status_code == 200
            other = await client.get("/hello.txt", headers={"host": "nope.example.test"})
            assert other.status_code == 503

            await w1.cordon_machine("web", mid)
            await wait_for(unavailable, 30, "the proxy to answer 503")
            await w1.uncordon_machine("web", mid)
            await proxied_ok()

            await w1.stop_machine("web", mid)
            assert await w1.wait_machine("web", mid, state="stopped", timeout=30)
            await wait_for(unavailable, 30, "the proxy to answer 503")
            await w1.destroy_machine("web", mid)
            assert await w1.wait_machine("web", mid, state="destroyed", timeout=30)
            tg.cancel_scope.cancel()
    finally:
        reader.close()
        for name in ("w1", "w2"):
            await ProcessDriver(tmp_path / name / "instances").destroy_all()


def test_routing_rules(tmp_path):
    import apsw

    from orchestrator.publish import upsert_statement

    conn = apsw.Connection(str(tmp_path / "r.db"))
    conn.execute("PRAGMA journal_mode=WAL")
    reader = SqliteReplica(tmp_path / "r.db")
    assert reader.backends("web") == []  # no table yet: nothing to route to
    conn.execute(MACHINES_SCHEMA)

    def row(mid, **kw):
        svc = '[{"protocol":"tcp","internal_port":8080}]'
        base = {"id": mid, "app": "web", "worker": "w", "region": "", "state": "started",
                "instance_id": "", "address": "127.0.0.1", "cordoned": 0, "checks": "[]",
                "services": svc, "updated_at": 0}  # fmt: skip
        base.update(kw)
        sql, params = upsert_statement(base)
        conn.execute(sql, params)

    row("a")
    row("b", state="stopped")
    row("c", cordoned=1)
    row("d", checks='[{"name":"http","status":"critical"}]')
    row("e", services="[]")
    row("f", address="fdaa::3")
    row("g", app="api")
    ids = [b.machine_id for b in reader.backends("web")]
    assert ids == ["a", "f"]
    assert reader.backends("web")[1].url == "http://[fdaa::3]:8080"
    proxy = Proxy(reader, domain="example.test", default_app=None)
    assert proxy.app_for("web.example.test:443") == "web" and proxy.app_for("other.org") is None
    assert [b.machine_id for b in proxy.pick("web")] == ["a", "f"]
    assert [b.machine_id for b in proxy.pick("web")] == ["f", "a"]  # round-robin
    assert [b.machine_id for b in proxy.pick("web", "f")] == ["f"]
    row("a", state="stopped")  # another connection commits: the cache follows
    assert [b.machine_id for b in reader.backends("web")] == ["f"]
    reader.close()
    conn.close()
