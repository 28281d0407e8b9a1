"""The gateway without namespaces: placement and list filters as functions, and routing over
real workers (fake driver, real HTTP servers on loopback) publishing into one replica file; a
create through it is one trace."""

from __future__ import annotations

import contextlib
import json
import logging
import time

import anyio
import apsw
import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode
from orch_helpers import CrrPublisher
from support import wait_for

from corrosion.surfaces.asgi_server import serve_asgi
from orchestrator.api import create_app
from orchestrator.clock import ManualClock
from orchestrator.config import ConfigError, OrchestratorConfig
from orchestrator.drivers import FakeDriver
from orchestrator.gateway import Gateway, GatewayReplica, list_filter, matches, place
from orchestrator.publish import MACHINES_SCHEMA
from orchestrator.service import Orchestrator
from orchestrator.workers import Announcer, WorkerInfo, api_url_for, worker_routes

TOKEN = "gw-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CONFIG = {"image": "busybox", "init": {"exec": ["sleep", "1000"]}}
NOW = 1_700_000_000_000


def w(id_, region="ams", capacity=4, *, age=0.0, **kw) -> WorkerInfo:
    return WorkerInfo(id_, region, f"http://{id_}:1", capacity, heartbeat=NOW - int(age * 1000),
                      **kw)  # fmt: skip


def test_place_by_region_live_and_free_capacity():
    workers = [w("a", capacity=4), w("b", capacity=4), w("c", "ord", capacity=8),
               w("dead", capacity=100, age=60), w("drain", capacity=100, draining=True),
               w("cord", capacity=100, cordoned=True)]  # fmt: skip
    used = {"a": 3, "b": 1, "c": 8}
    assert [x.id for x in place(workers, used, region="ams", now_ms=NOW)] == ["b", "a"]
    assert [x.id for x in place(workers, used, region=None, now_ms=NOW)] == ["b", "a"]
    assert place(workers, used, region="ord", now_ms=NOW) == []  # c is full
    assert place(workers, {"a": 4, "b": 4}, region="ams", now_ms=NOW) == []
    assert [x.id for x in place(workers, {}, region=None, now_ms=NOW)] == ["c", "a", "b"]


class ListedWorkers:
    """The one replica read the liveness log needs: the workers' rows."""

    def __init__(self, workers: list[WorkerInfo]) -> None:
        self.rows = workers

    def workers(self) -> list[WorkerInfo]:
        return self.rows


def test_a_worker_going_silent_and_coming_back_is_logged_once_each_way(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="orchestrator.gateway")
    replica = ListedWorkers([w("a"), w("b")])
    gateway = Gateway(replica)  # type: ignore[arg-type]
    gateway._live_workers(NOW)
    assert "live" not in caplog.text  # live workers seen live: nothing to say
    replica.rows = [w("a"), w("b", age=12.5)]
    gateway._live_workers(NOW)
    gateway._live_workers(NOW + 1000)
    silent = [r for r in caplog.records if "is not live" in r.getMessage()]
    assert len(silent) == 1 and silent[0].levelno == logging.WARNING
    assert "worker b is not live (last heartbeat 12.5 s ago, limit 10 s)" in caplog.text
    replica.rows = [w("a"), w("b")]
    gateway._live_workers(NOW)
    gateway._live_workers(NOW)
    assert [r.getMessage() for r in caplog.records].count("worker b is live again") == 1


def test_list_filters():
    filters, problem = list_filter({"region": "ams", "state": "started,stopped",
                                    "metadata.role": "db"})  # fmt: skip
    assert problem is None
    row = {"state": "started", "region": "ams", "metadata": '{"role":"db"}'}
    assert matches(row, filters)
    assert not matches({**row, "region": "ord"}, filters)
    assert not matches({**row, "state": "created"}, filters)
    assert not matches({**row, "metadata": '{"role":"web"}'}, filters)
    assert not matches({**row, "state": "destroyed"}, list_filter({})[0])
    assert matches({**row, "state": "destroyed"}, list_filter({"include_deleted": "true"})[0])
    assert list_filter({"colour": "red"})[1] == "unknown query parameter(s) colour"
    assert "include_deleted" in str(list_filter({"include_deleted": "maybe"})[1])


class HeldPublisher(CrrPublisher):
    """Publishes into the replica only while ``open`` is set: replication that lags."""

    def __init__(self, conn) -> None:
        super().__init__(conn)
        self.open = anyio.Event()
        self.open.set()

    async def execute(self, statements):
        await self.open.wait()
        await super().execute(statements)


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def cluster(tmp_path, regions=("ams", "ord")):
    """Workers w1.. (one per region, fake driver, Machines API on loopback behind TOKEN, with
    the worker's own cordon routes), publishing their machines and workers rows into
    replica.db; a gateway over it. Yields (client, orchs, publishers, gateway, announcers)."""
    path = tmp_path / "replica.db"
    setup = apsw.Connection(str(path))
    setup.execute("PRAGMA journal_mode = wal")
    setup.execute(MACHINES_SCHEMA)
    setup.close()
    conns, publishers, orchs, announcers = [], [], {}, {}
    async with contextlib.AsyncExitStack() as stack:
        tg = await stack.enter_async_context(anyio.create_task_group())
        for i, region in enumerate(regions, start=1):
            conn = apsw.Connection(str(path))
            conn.set_busy_timeout(5000)
            conns.append(conn)
            pub = HeldPublisher(conn)
            publishers.append(pub)
            name = f"w{i}"
            driver = FakeDriver(images={"busybox"})
            orch = Orchestrator(machines_path=tmp_path / name, driver=driver, worker=name,
                                region=region, publisher=pub)  # fmt: skip
            await stack.enter_async_context(orch)
            orchs[name] = orch
            app = create_app(orch, token=TOKEN, manage=False)
            server = await serve_asgi(app, tg, "127.0.0.1", 0)
            stack.callback(server.close)
            info = WorkerInfo(name, region, f"http://127.0.0.1:{server.address[1]}", 10)
            announcer = announcers[name] = Announcer(
                pub, info, clock=orch.clock, cordon_path=tmp_path / name / "cordon.json"
            )
            app.router.routes.extend(worker_routes(announcer))
            await announcer.beat()
        replica = GatewayReplica(path)
        stack.callback(replica.close)
        gateway = Gateway(replica, token=TOKEN, replication_wait=10.0)
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                              base_url="http://gw", headers=AUTH, timeout=30)
        )  # fmt: skip
        async with gateway._lifespan(gateway.app):
            yield client, orchs, publishers, gateway, announcers
        tg.cancel_scope.cancel()
    for conn in conns:
        conn.close()


async def test_create_routes_lists_and_authenticates(tmp_path):
    async with cluster(tmp_path) as (client, orchs, _, _, _):
        r = await client.post("/v1/apps/web/machines", json={"config": CONFIG, "region": "ord"})
        assert r.status_code == 200, r.text
        assert r.headers["fly-worker"] == "w2"
        mid = r.json()["id"]
        assert orchs["w2"].get_machine("web", mid)["region"] == "ord"

        # placement without a region: both have 10 slots, w2 now uses one: w1 is freer
        r = await client.post("/v1/apps/web/machines", json={"config": CONFIG})
        assert r.headers["fly-worker"] == "w1"
        other = r.json()["id"]

        # per-machine calls reach the owner
        r = await client.get(f"/v1/apps/web/machines/{mid}/wait", params={"state": "started"})
        assert r.status_code == 200 and r.headers["fly-worker"] == "w2", r.text
        r = await client.post(f"/v1/apps/web/machines/{mid}/metadata/role", json={"value": "db"})
        assert r.status_code == 204 and r.headers["fly-worker"] == "w2"
        r = await client.get(f"/v1/apps/web/machines/{other}/wait", params={"state": "started"})
        assert r.status_code == 200 and r.headers["fly-worker"] == "w1", r.text
        r = await client.post(f"/v1/apps/web/machines/{other}/stop")
        assert r.status_code == 200 and r.headers["fly-worker"] == "w1", r.text
        r = await client.get(f"/v1/apps/web/machines/{other}/wait", params={"state": "stopped"})
        assert r.status_code == 200, r.text
        r = await client.get(f"/v1/apps/web/machines/{other}")
        assert r.headers["fly-worker"] == "w1" and r.json()["state"] == "stopped"
        assert r.json()["events"]  # the owner's full document, not the replica's summary

        # list from the replica, across workers, with filters
        async def listed(**params):
            r = await client.get("/v1/apps/web/machines", params=params)
            assert r.status_code == 200, r.text
            return sorted(m["id"] for m in r.json())

        async def settled():
            return await listed(state="stopped") == [other] and (
                await listed(**{"metadata.role": "db"}) == [mid]
            )

        await wait_for(settled, what="the replica to show the stop and the metadata")
        assert await listed() == sorted([mid, other])
        assert await listed(region="ord") == [mid]
        assert await listed(region="ams", state="started") == []
        r = await client.get("/v1/apps/web/machines", params={"colour": "red"})
        assert r.status_code == 400

        r = await client.get("/v1/workers")
        assert {x["id"]: (x["live"], x["used"]) for x in r.json()} == {
            "w1": (True, 1), "w2": (True, 1),
        }  # fmt: skip

        # the bearer token is checked here and forwarded to the worker
        r = await client.get("/v1/apps/web/machines", headers={"authorization": "Bearer no"})
        assert r.status_code == 401
        r = await client.get(f"/v1/apps/web/machines/{mid}", headers={"authorization": ""})
        assert r.status_code == 401
        r = await client.post("/v1/apps/web/machines", json={"config": CONFIG, "region": "syd"})
        assert r.status_code == 503 and "region syd" in r.json()["error"]
        r = await client.post("/v1/apps/web/machines", json={"config": {"image": 3}})
        assert r.status_code == 400  # the worker's answer, not retried elsewhere


async def test_create_retries_another_worker_when_one_is_down(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="orchestrator.gateway")
    async with cluster(tmp_path, regions=("ams",)) as (client, orchs, publishers, gateway, _):
        replica = gateway.replica
        with socketless_port() as port:  # nothing listens there: connection refused
            dead = WorkerInfo("w0", "ams", f"http://127.0.0.1:{port}", 100)
            await Announcer(publishers[0], dead, clock=orchs["w1"].clock).beat()
            now = int(time.time() * 1000)
            order = place(replica.workers(), replica.used(), region="ams", now_ms=now)
            assert [x.id for x in order] == ["w0", "w1"]
            r = await client.post("/v1/apps/web/machines", json={"config": CONFIG})
            assert r.status_code == 200, r.text
            assert r.headers["fly-worker"] == "w1"
            assert "create in app web: worker w0 unreachable (ConnectError)" in caplog.text

            # a machine of the unreachable worker: GET answers from the replica, the rest 503
            row = {"id": "m0", "app": "web", "worker": "w0", "region": "ams", "state": "started",
                   "metadata": '{"a":"b"}', "updated_at": NOW}  # fmt: skip
            cols = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            insert = f"INSERT INTO machines ({cols}) VALUES ({marks})"
            await publishers[0].execute([[insert, list(row.values())]])
            r = await client.get("/v1/apps/web/machines/m0")
            assert r.status_code == 200 and "unreachable" in r.headers["warning"]
            assert r.json()["config"]["metadata"] == {"a": "b"} and r.json()["worker"] == "w0"
            r = await client.post("/v1/apps/web/machines/m0/stop")
            assert r.status_code == 503 and "w0" in r.json()["error"]


async def test_a_cordoned_worker_takes_no_new_machines_and_stays_cordoned(tmp_path):
    async with cluster(tmp_path, regions=("ams", "ams")) as (client, _, _, _, announcers):

        async def workers() -> dict[str, bool]:
            return {x["id"]: x["cordoned"] for x in (await client.get("/v1/workers")).json()}

        async def shows(want: dict[str, bool]) -> bool:
            return await workers() == want

        r = await client.post("/v1/apps/web/machines", json={"config": CONFIG})
        assert r.status_code == 200 and r.headers["fly-worker"] == "w1", r.text
        kept = r.json()["id"]

        r = await client.post("/v1/workers/w2/cordon")
        assert r.status_code == 200 and r.headers["fly-worker"] == "w2", r.text
        assert r.json()["cordoned"] is True and r.json()["id"] == "w2"
        await wait_for(lambda: shows({"w1": False, "w2": True}), what="w2 cordoned in the replica")
        for _ in range(3):  # w2 is the freer worker, but cordoned: everything goes to w1
            r = await client.post("/v1/apps/web/machines", json={"config": CONFIG})
            assert r.status_code == 200 and r.headers["fly-worker"] == "w1", r.text

        # the flag survives a restart of the worker: a new announcer reads it back
        assert json.loads((tmp_path / "w2" / "cordon.json").read_text()) == {"cordoned": True}
        again = Announcer(announcers["w2"].publisher, announcers["w2"].info, clock=ManualClock(),
                          cordon_path=tmp_path / "w2" / "cordon.json")  # fmt: skip
        assert again.info.cordoned
        # machines on a cordoned worker keep answering: cordoning only stops placement
        r = await client.post("/v1/workers/w1/cordon")
        assert r.status_code == 200, r.text
        r = await client.get(f"/v1/apps/web/machines/{kept}")
        assert r.status_code == 200 and r.headers["fly-worker"] == "w1"
        await wait_for(lambda: shows({"w1": True, "w2": True}), what="both cordoned")
        r = await client.post("/v1/apps/web/machines", json={"config": CONFIG})
        assert r.status_code == 503, r.text

        r = await client.post("/v1/workers/w2/uncordon")
        assert r.status_code == 200 and r.json()["cordoned"] is False, r.text
        await wait_for(lambda: shows({"w1": True, "w2": False}), what="w2 uncordoned")
        r = await client.post("/v1/apps/web/machines", json={"config": CONFIG})
        assert r.status_code == 200 and r.headers["fly-worker"] == "w2", r.text

        r = await client.post("/v1/workers/w2/drain")
        assert r.status_code == 404 and "cordon or uncordon" in r.json()["error"]
        r = await client.post("/v1/workers/w9/cordon")
        assert r.status_code == 404 and "w9" in r.json()["error"]
        r = await client.post("/v1/workers/w2/cordon", headers={"authorization": "Bearer no"})
        assert r.status_code == 401
        assert not announcers["w2"].info.cordoned


def test_an_unreadable_cordon_file_starts_the_worker_cordoned(tmp_path, caplog):
    path = tmp_path / "cordon.json"
    path.write_text("{not json")
    info = WorkerInfo("w1", "ams", "http://w1:4001", 8)
    with caplog.at_level(logging.ERROR, logger="orchestrator.workers"):
        announcer = Announcer(None, info, clock=ManualClock(), cordon_path=path)
    assert announcer.info.cordoned
    assert "cannot read the cordon flag" in caplog.text and "starting cordoned" in caplog.text
    assert not Announcer(
        None, info, clock=ManualClock(), cordon_path=tmp_path / "none"
    ).info.cordoned


async def test_announcer_heartbeats_and_drains(tmp_path):
    conn = apsw.Connection(str(tmp_path / "r.db"))
    conn.execute(MACHINES_SCHEMA)
    clock = ManualClock(1_700_000_000.0)
    info = WorkerInfo("w1", "ams", "http://w1:4001", 8)
    announcer = Announcer(CrrPublisher(conn), info, clock=clock, interval=2.0)
    replica = GatewayReplica(tmp_path / "r.db")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(announcer.run)
            await wait_for(lambda: announcer.beats == 1, what="the first beat")
            assert replica.workers()[0].heartbeat == 1_700_000_000_000
            clock.advance(2.0)
            await wait_for(lambda: announcer.beats == 2, what="the second beat")
            assert replica.workers()[0].heartbeat == 1_700_000_002_000
            tg.cancel_scope.cancel()
        await announcer.drain()
        (row,) = replica.workers()
        assert row.draining and place([row], {}, region=None, now_ms=row.heartbeat) == []
    finally:
        replica.close()
        conn.close()


def test_worker_config_keys(tmp_path):
    base = {"machines_path": str(tmp_path)}
    cfg = OrchestratorConfig.from_mapping({**base, "api_url": "http://h:1/", "capacity": 3})
    assert (cfg.api_url, cfg.capacity) == ("http://h:1", 3)
    for bad, text in [({"capacity": -1}, "capacity"), ({"capacity": True}, "capacity"),
                      ({"api_url": "h:1"}, "api_url")]:  # fmt: skip
        with pytest.raises(ConfigError, match=text):
            OrchestratorConfig.from_mapping({**base, **bad})
    assert api_url_for([("10.0.0.2", 4001)]) == "http://10.0.0.2:4001"
    assert api_url_for([("::1", 4001)]) == "http://[::1]:4001"


async def test_call_waits_for_replication_instead_of_404(tmp_path):
    async with cluster(tmp_path, regions=("ams",)) as (client, orchs, publishers, gateway, _):
        publishers[0].open = anyio.Event()  # held: the replica lags behind the worker
        created = await orchs["w1"].create_machine("web", {"config": CONFIG})
        answers = []

        async def get() -> None:
            answers.append(await client.get(f"/v1/apps/web/machines/{created['id']}"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            await anyio.sleep(0.3)
            assert answers == []  # still waiting, not a 404
            publishers[0].open.set()
        assert answers[0].status_code == 200 and answers[0].headers["fly-worker"] == "w1"
        gateway.replication_wait = 0.5
        r = await client.get("/v1/apps/web/machines/no-such-machine")
        assert r.status_code == 404


@contextlib.contextmanager
def socketless_port():
    """A loopback port that refuses connections (bound, never listening)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


async def test_a_create_through_the_gateway_is_one_trace(tmp_path, spans):
    """The gateway's span continues the caller's traceparent; each forward (the refused one
    too) is a CLIENT span, and the worker that took the create continues the one it received
    down to the create run's steps."""
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with cluster(tmp_path, regions=("ams",)) as (client, orchs, publishers, _, _):
        with socketless_port() as port:
            dead = WorkerInfo("w0", "ams", f"http://127.0.0.1:{port}", 100)
            await Announcer(publishers[0], dead, clock=orchs["w1"].clock).beat()
            r = await client.post("/v1/apps/web/machines", json={"config": CONFIG},
                                  headers={"traceparent": caller})  # fmt: skip
            assert r.status_code == 200 and r.headers["fly-worker"] == "w1", r.text

        def run_span():
            return [s for s in spans.get_finished_spans() if s.name == "machine.create"]

        await wait_for(run_span, what="the create run's span")
    finished = [
        s for s in spans.get_finished_spans() if s.context.trace_id == int(caller[3:35], 16)
    ]
    by_id = {s.context.span_id: s for s in finished}

    def parent(span):
        return by_id.get(span.parent.span_id) if span.parent is not None else None

    gateway = next(s for s in finished if s.kind is SpanKind.SERVER and parent(s) is None)
    assert gateway.name == "POST /v1/apps/{app}/machines"
    assert gateway.parent.span_id == int(caller[36:52], 16)
    forwards = sorted((s for s in finished if s.kind is SpanKind.CLIENT),
                      key=lambda s: s.start_time)  # fmt: skip
    assert [(s.attributes["orchestrator.worker"], s.status.status_code) for s in forwards] == [
        ("w0", StatusCode.ERROR), ("w1", StatusCode.UNSET),
    ]  # fmt: skip
    assert all(parent(s) is gateway for s in forwards)
    worker = next(s for s in finished if s.kind is SpanKind.SERVER and s is not gateway)
    assert parent(worker) is forwards[1]
    (run,) = run_span()
    assert parent(parent(run)) is worker  # through the run's accept span
    assert [parent(s) for s in finished if s.name.startswith("machine.create.prepare")] == [run]


def test_a_bad_otel_variable_stops_the_gateway_in_one_line(tmp_path, monkeypatch, capsys):
    from orchestrator.__main__ import main

    (tmp_path / "replica.db").touch()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "sometimes")
    args = ["gateway", "--replica", str(tmp_path / "replica.db"), "--listen", "127.0.0.1:0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: OTEL_TRACES_SAMPLER=sometimes: unknown sampler")
    assert len(err.splitlines()) == 1
