"""Health checks: ``config.checks`` validated at create and update; the scheduler on virtual time
(FakeDriver, ManualClock, a scripted probe): nothing before the grace period, one probe per
interval, the timeout, results written only when they change and published with the machine,
state changes logged, the checks stopped with the machine and resumed by a restarted service.
End to end with the process driver: real HTTP servers whose /health fails on demand, real probes,
the rows replicated to a proxy served over real HTTP that stops and resumes routing; the proxy
ignores informational checks and names the machines it holds back."""

from __future__ import annotations

import json
import logging
import ssl
import sys

import anyio
import anyio.lowlevel
import apsw
import httpx
import pytest
from anyio.streams.tls import TLSStream
from orch_helpers import CrrPublisher
from support import free_port, self_signed_cert, wait_for

import crdt
from corrosion.surfaces.asgi_server import serve_asgi
from orchestrator import machine as m
from orchestrator.checks import CRITICAL, PASSING, WARNING, CheckSpec, NetworkProbe, specs
from orchestrator.clock import ManualClock
from orchestrator.drivers import FakeDriver, ProcessDriver
from orchestrator.engine import Backoff
from orchestrator.errors import InvalidRequestError
from orchestrator.proxy import Proxy, SqliteReplica
from orchestrator.publish import (
    MACHINES_SCHEMA,
    MACHINES_TABLE,
    MemoryPublisher,
    upsert_statement,
)
from orchestrator.service import Orchestrator

pytestmark = pytest.mark.anyio
FAST = Backoff(initial=0.001, maximum=0.01)
SERVICES = [{"protocol": "tcp", "internal_port": 8080}]


def cfg(checks, **over):
    return {"image": "busybox", "init": {"cmd": ["sleep", "600"]}, "services": SERVICES,
            "checks": checks, **over}  # fmt: skip


# --- validation ---------------------------------------------------------------------------------


def test_checks_are_normalized_with_fly_defaults():
    checks = m.validate_config(cfg({
        "alive": {"type": "tcp", "interval": "10s", "timeout": "1s", "grace_period": "1m"},
        "health": {"type": "http", "port": 8081, "path": "/health", "method": "get",
                   "kind": "informational", "headers": [{"name": "X-Probe", "values": ["1"]}]},
    }))["checks"]  # fmt: skip
    assert checks["alive"] == {"type": "tcp", "port": 8080, "interval": 10.0, "timeout": 1.0,
                               "grace_period": 60.0, "kind": "readiness"}  # fmt: skip
    assert checks["health"] == {
        "type": "http", "port": 8081, "interval": 15.0, "timeout": 2.0, "grace_period": 0.0,
        "kind": "informational", "method": "GET", "path": "/health", "protocol": "http",
        "tls_skip_verify": False, "headers": [{"name": "X-Probe", "values": ["1"]}],
    }  # fmt: skip
    assert m.validate_config(cfg(None))["checks"] is None  # absent is fine
    # normalized configs validate to themselves (a client may send back what GET shows)
    assert m.validate_config(cfg(checks))["checks"] == checks


@pytest.mark.parametrize(
    ("checks", "message"),
    [
        ([], r"config\.checks: expected an object"),
        ({"bad name": {"type": "tcp"}}, r"config\.checks: invalid check name 'bad name'"),
        ({"c": "tcp"}, r"config\.checks\.c: expected an object"),
        ({"c": {"type": "udp"}}, r"config\.checks\.c\.type: required, one of tcp, http"),
        ({"c": {}}, r"config\.checks\.c\.type: required"),
        ({"c": {"type": "tcp", "port": 0}}, r"config\.checks\.c\.port: expected an integer"),
        ({"c": {"type": "tcp", "port": "80"}}, r"config\.checks\.c\.port: expected an integer"),
        ({"c": {"type": "tcp", "interval": "10x"}}, r"config\.checks\.c\.interval: invalid"),
        ({"c": {"type": "tcp", "interval": "0s"}}, r"config\.checks\.c\.interval: at least"),
        ({"c": {"type": "tcp", "timeout": 0}}, r"config\.checks\.c\.timeout: must be more"),
        ({"c": {"type": "tcp", "grace_period": -1}}, r"config\.checks\.c\.grace_period: "),
        ({"c": {"type": "tcp", "grace_period": True}}, r"config\.checks\.c\.grace_period: "),
        ({"c": {"type": "tcp", "path": "/"}}, r"config\.checks\.c\.path: only for http checks"),
        ({"c": {"type": "tcp", "kind": "liveness"}}, r"config\.checks\.c\.kind: one of"),
        ({"c": {"type": "tcp", "intervall": "1s"}}, r"config\.checks\.c: unknown field"),
        ({"c": {"type": "http", "path": "health"}}, r"config\.checks\.c\.path: expected a path"),
        ({"c": {"type": "http", "method": "BREW"}}, r"config\.checks\.c\.method: one of"),
        ({"c": {"type": "http", "protocol": "h2"}}, r"config\.checks\.c\.protocol: one of"),
        ({"c": {"type": "http", "tls_skip_verify": "yes"}}, r"c\.tls_skip_verify: expected"),
        ({"c": {"type": "http", "headers": {"a": "b"}}}, r"config\.checks\.c\.headers: expected"),
        ({"c": {"type": "http", "headers": [{"name": "a b", "values": []}]}},
         r"config\.checks\.c\.headers\[0\]\.name: invalid header name"),
        ({"c": {"type": "http", "headers": [{"name": "a", "values": ["x\r\ny"]}]}},
         r"config\.checks\.c\.headers\[0\]\.values: expected a list of strings"),
    ],
)  # fmt: skip
def test_bad_checks_are_refused_naming_the_field(checks, message):
    with pytest.raises(InvalidRequestError, match=message):
        m.validate_config(cfg(checks))


def test_a_check_without_port_needs_a_service():
    with pytest.raises(InvalidRequestError, match=r"config\.checks\.c\.port: required"):
        m.validate_config(cfg({"c": {"type": "tcp"}}, services=[]))


def test_service_checks_are_normalized_named_as_fly_names_them_and_always_readiness():
    services = [
        {"protocol": "tcp", "internal_port": 8080,
         "checks": [{"type": "http", "path": "/up", "interval": "1s"}]},
        {"protocol": "tcp", "internal_port": 9000},
        {"protocol": "tcp", "internal_port": 9100, "checks": [{"type": "tcp", "port": 9101}]},
    ]  # fmt: skip
    config = m.validate_config(cfg(None, services=services))
    assert config["services"][0]["checks"] == [{
        "type": "http", "port": 8080, "interval": 1.0, "timeout": 2.0, "grace_period": 0.0,
        "method": "GET", "path": "/up", "protocol": "http", "tls_skip_verify": False,
        "headers": [],
    }]  # fmt: skip
    assert "checks" not in config["services"][1]
    assert m.validate_config(config) == config  # what GET shows validates to itself
    got = [(s.name, s.type, s.port, s.kind) for s in specs(config)]
    assert got == [("servicecheck-00-http-8080", "http", 8080, "readiness"),
                   ("servicecheck-01-tcp-9101", "tcp", 9101, "readiness")]  # fmt: skip
    top = m.validate_config(cfg({"z": {"type": "tcp", "kind": "informational"}}, services=services))
    assert specs(top)[0].name == "z"  # top-level first, then the service checks


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ({"internal_port": 80, "checks": {"type": "tcp"}},
         r"config\.services\[0\]\.checks: expected a list"),
        ({"internal_port": 80, "checks": [{"type": "udp"}]},
         r"config\.services\[0\]\.checks\[0\]\.type: required, one of tcp, http"),
        ({"internal_port": 80, "checks": [{"type": "tcp", "kind": "informational"}]},
         r"config\.services\[0\]\.checks\[0\]\.kind: service checks always steer routing"),
        ({"checks": [{"type": "tcp"}]},
         r"config\.services\[0\]\.checks\[0\]\.port: required \(config\.services\[0\] has no"),
        ({"internal_port": 80, "checks": [{"type": "tcp", "path": "/"}]},
         r"config\.services\[0\]\.checks\[0\]\.path: only for http checks"),
        ({"internal_port": 80, "checks": [{"type": "tcp"}] * 33},
         r"config\.services: at most 32 service checks"),
    ],
)  # fmt: skip
def test_bad_service_checks_are_refused_naming_the_field(service, message):
    with pytest.raises(InvalidRequestError, match=message):
        m.validate_config(cfg(None, services=[service]))


async def test_bad_checks_change_nothing_at_create_and_update(tmp_path):
    pub = MemoryPublisher()
    async with orch(tmp_path, FakeDriver(), pub) as o:
        with pytest.raises(InvalidRequestError, match=r"config\.checks\.c\.timeout"):
            await o.create_machine("app", {"config": cfg({"c": {"type": "tcp", "timeout": "x"}})})
        assert o.machine_ids() == []
        good = cfg({"c": {"type": "tcp"}})
        mid = (await o.create_machine("app", {"config": good}))["id"]
        await settle(o, mid, "started")
        before = o.get_machine("app", mid)
        with pytest.raises(InvalidRequestError, match=r"config\.checks\.c\.type"):
            await o.update_machine("app", mid, {"config": cfg({"c": {"type": "icmp"}})})
        after = o.get_machine("app", mid)
        assert after["config"] == before["config"] and after["instance_id"] == before["instance_id"]
        assert o.engine.list_runs(mid) == []


# --- the scheduler on virtual time --------------------------------------------------------------


def orch(tmp_path, driver, publisher=None, **kw) -> Orchestrator:
    return Orchestrator(machines_path=tmp_path / "machines", driver=driver, publisher=publisher,
                        worker="w1", backoff=FAST, **kw)  # fmt: skip


async def settle(o: Orchestrator, mid: str, state: str) -> None:
    assert await o.wait_machine("app", mid, state=state, timeout=30), o.doc(mid)["state"]
    await wait_for(lambda: not o.engine.busy(mid), 30, f"{mid}'s runs", interval=0.002)


class ScriptedProbe:
    """Answers what the test says, records when (on the virtual clock) each check ran; "hang"
    never answers (the runner's timeout must end it)."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, str, str]] = []
        self.answers: dict[str, tuple[str, str] | str] = {}

    async def __call__(self, host: str, spec: CheckSpec) -> tuple[str, str]:
        self.calls.append((self.clock.now(), spec.name, host))
        answer = self.answers.get(spec.name, (PASSING, "ok"))
        if answer == "hang":
            await anyio.sleep_forever()
        assert isinstance(answer, tuple)
        return answer


def statuses(o: Orchestrator, mid: str) -> list[tuple[str, str, str]]:
    return [(c["name"], c["status"], c["output"]) for c in o.get_machine("app", mid)["checks"]]


def row_checks(pub: MemoryPublisher, mid: str) -> list[dict]:
    return json.loads(pub.rows().get(mid, {}).get("checks", "[]"))


async def advance_to(clock: ManualClock, when: float) -> None:
    """Move virtual time to ``when`` once something sleeps until then (a task is waiting)."""
    await wait_for(lambda: clock.next_deadline() == when, 30, f"a sleeper until {when}")
    clock.advance(when - clock.now())


async def test_grace_interval_timeout_results_published_and_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator")
    clock = ManualClock()
    probe = ScriptedProbe(clock)
    pub = MemoryPublisher()
    checks = {"alive": {"type": "tcp", "interval": "10s", "timeout": "2s", "grace_period": "30s"}}
    async with orch(tmp_path, FakeDriver(), pub, clock=clock, probe=probe) as o:
        mid = (await o.create_machine("app", {"config": cfg(checks)}))["id"]
        await settle(o, mid, "started")
        t0 = clock.now()
        address = o.doc(mid)["private_ip"]
        # during the grace period: "warning", and the only thing sleeping is the grace period
        waiting = [("alive", WARNING, "waiting for the grace period (30s)")]
        await wait_for(lambda: statuses(o, mid) == waiting, 30, "the warning")
        await wait_for(lambda: clock.next_deadline() == t0 + 30, 30, "the grace period's sleep")
        clock.advance(29.999)
        await anyio.lowlevel.checkpoint()
        assert probe.calls == [] and clock.next_deadline() == t0 + 30
        assert [c["status"] for c in row_checks(pub, mid)] in ([], [WARNING])

        clock.advance(0.001)  # the grace period is over: the first probe, at the machine's address
        await wait_for(lambda: statuses(o, mid) == [("alive", PASSING, "ok")], 30, "passing")
        assert probe.calls == [(t0 + 30, "alive", address)]
        await wait_for(lambda: [c["status"] for c in row_checks(pub, mid)] == [PASSING])
        row = row_checks(pub, mid)[0]
        assert row["name"] == "alive" and row["kind"] == "readiness" and row["updated_at"]
        changed_at = o.get_machine("app", mid)["checks"][0]["updated_at"]
        written = o.doc(mid)["updated_at"]

        await advance_to(clock, t0 + 40)  # one interval later, the same answer: no write
        await wait_for(lambda: len(probe.calls) == 2, 30, "the second probe")
        await advance_to(clock, t0 + 50)
        await wait_for(lambda: len(probe.calls) == 3, 30, "the third probe")
        assert [c[0] for c in probe.calls] == [t0 + 30, t0 + 40, t0 + 50]
        assert o.doc(mid)["updated_at"] == written
        assert o.get_machine("app", mid)["checks"][0]["updated_at"] == changed_at

        probe.answers["alive"] = "hang"  # the next probe never answers: the timeout ends it
        await advance_to(clock, t0 + 60)
        await wait_for(lambda: len(probe.calls) == 4, 30, "the hanging probe")
        assert statuses(o, mid)[0][1] == PASSING
        await advance_to(clock, t0 + 62)
        timed_out = [("alive", CRITICAL, "timed out after 2s")]
        await wait_for(lambda: statuses(o, mid) == timed_out, 30, "critical")
        await wait_for(lambda: [c["status"] for c in row_checks(pub, mid)] == [CRITICAL])
        assert o.get_machine("app", mid)["checks"][0]["updated_at"] == m.iso(t0 + 62)

        probe.answers["alive"] = (PASSING, "ok")
        await advance_to(clock, t0 + 70)  # the interval counts from the start of the last probe
        await wait_for(lambda: statuses(o, mid) == [("alive", PASSING, "ok")], 30, "passing")

        await o.stop_machine("app", mid)
        await settle(o, mid, "stopped")
        await wait_for(lambda: o.get_machine("app", mid)["checks"] == [], 30, "cleared checks")
        await wait_for(lambda: row_checks(pub, mid) == [], 30, "cleared row")
        assert not o.health.running(mid)
        calls = len(probe.calls)
        clock.advance(1000)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert len(probe.calls) == calls  # stopped with the machine

    changes = [
        (r.getMessage(), r.fields["status"])
        for r in caplog.records
        if r.name == "orchestrator.health"
    ]
    assert changes == [
        (f"check alive of machine {mid}: warning -> passing (ok)", PASSING),
        (f"check alive of machine {mid}: passing -> critical (timed out after 2s)", CRITICAL),
        (f"check alive of machine {mid}: critical -> passing (ok)", PASSING),
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "orchestrator.health")


async def test_checks_restart_with_a_new_boot_and_resume_after_a_service_restart(tmp_path):
    clock = ManualClock()
    probe = ScriptedProbe(clock)
    driver = FakeDriver()  # survives the service restart, as machines survive flyd
    checks = {"alive": {"type": "tcp", "interval": "5s", "grace_period": "1s"},
              "ready": {"type": "http", "path": "/ready", "interval": "5s"}}  # fmt: skip
    probe.answers["ready"] = (CRITICAL, "HTTP GET /ready: 503")
    async with orch(tmp_path, driver, clock=clock, probe=probe) as o:
        mid = (await o.create_machine("app", {"config": cfg(checks)}))["id"]
        await settle(o, mid, "started")
        t0 = clock.now()
        await wait_for(lambda: len(probe.calls) == 1, 30, "ready's first probe (no grace)")
        await advance_to(clock, t0 + 1)
        want = [("alive", PASSING, "ok"), ("ready", CRITICAL, "HTTP GET /ready: 503")]
        await wait_for(lambda: statuses(o, mid) == want, 30, "both results")

        # a restart is a new boot: results start again from "warning", grace applies again
        await o.restart_machine("app", mid)
        await settle(o, mid, "started")
        t1 = clock.now()
        await wait_for(lambda: statuses(o, mid)[0][1] == WARNING, 30, "alive waiting again")
        await advance_to(clock, t1 + 1)
        await wait_for(lambda: statuses(o, mid) == want, 30, "both results again")
        before = o.get_machine("app", mid)["checks"]
    calls = len(probe.calls)

    async with orch(tmp_path, driver, clock=clock, probe=probe) as o:
        # re-read from disk: the same boot keeps its results (no return to "warning") and runs on
        assert o.get_machine("app", mid)["checks"] == before
        await wait_for(lambda: o.health.running(mid), 30, "the checks to resume")
        probe.answers["ready"] = (PASSING, "HTTP GET /ready: 200 OK")
        await wait_for(lambda: len(probe.calls) >= calls + 2, 30, "probes after the restart")
        want = [("alive", PASSING, "ok"), ("ready", PASSING, "HTTP GET /ready: 200 OK")]
        await wait_for(lambda: statuses(o, mid) == want, 30, "ready passing")
        await o.destroy_machine("app", mid, force=True)
        await wait_for(lambda: not o.health.running(mid), 30, "the checks to stop on destroy")


# --- end to end: process driver, real probes, a proxy over real HTTP ----------------------------


def replica(path):
    conn = crdt.connect(str(path), wal=True)
    conn.execute(MACHINES_SCHEMA)
    crdt.as_crr(conn, MACHINES_TABLE)
    return conn


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("level", ["top-level", "service"])
async def test_failing_check_takes_a_machine_out_of_the_proxy_and_back(tmp_path, level):
    """The same journey with the HTTP check declared at the top level or on the service."""
    conn = replica(tmp_path / "replica.db")
    reader = SqliteReplica(tmp_path / "replica.db")
    proxy = Proxy(reader, domain="example.test", retry_delay=0.05, connect_attempts=3)
    driver = ProcessDriver(tmp_path / "instances")
    sites, mids, ports, names = {}, [], {}, {}

    def machine_config(name: str) -> dict:
        port = ports[name] = free_port()
        www = sites[name] = tmp_path / name
        www.mkdir()
        (www / "health").write_text("ok\n")
        (www / "who.txt").write_text(f"{name}\n")
        health = {"type": "http", "path": "/health", "interval": "200ms", "timeout": "5s",
                  "headers": [{"name": "X-Probe", "values": ["1"]}]}  # fmt: skip
        service = {"protocol": "tcp", "internal_port": port}
        checks = {"alive": {"type": "tcp", "interval": "200ms", "timeout": "5s"}}
        if level == "service":
            service["checks"] = [health]
        else:
            checks["health"] = health
        return {
            "image": "python",
            "init": {"exec": [sys.executable, "-m", "http.server", str(port), "--bind",
                              "127.0.0.1", "--directory", str(www)]},
            "services": [service],
            "checks": checks,
        }  # fmt: skip

    def published(mid: str) -> dict[str, str]:
        """The published statuses, with the HTTP check under the name "health" either way."""
        rows = conn.execute(f"SELECT checks FROM {MACHINES_TABLE} WHERE id = ?", (mid,))
        statuses = {c["name"]: c["status"] for row in rows for c in json.loads(row[0])}
        service_name = f"servicecheck-00-http-{ports[names[mid]]}"
        if service_name in statuses:
            statuses["health"] = statuses.pop(service_name)
        return statuses

    try:
        async with (
            anyio.create_task_group() as tg,
            Orchestrator(machines_path=tmp_path / "machines", driver=driver, worker="w1",
                         publisher=CrrPublisher(conn), backoff=FAST) as o,
        ):  # fmt: skip
            front = await serve_asgi(proxy, tg, "127.0.0.1", 0, lifespan=True)
            url = f"http://127.0.0.1:{front.address[1]}/who.txt"
            client = httpx.AsyncClient(timeout=30, headers={"host": "web.example.test"})
            for name in ("a", "b"):
                view = await o.create_machine("web", {"name": name, "config": machine_config(name)})
                mids.append(view["id"])
                names[view["id"]] = name
            a, b = mids
            health = "health" if level == "top-level" else f"servicecheck-00-http-{ports['a']}"
            both_pass = {"alive": PASSING, "health": PASSING}
            for mid in mids:
                assert await o.wait_machine("web", mid, state="started", timeout=60)
                await wait_for(lambda mid=mid: published(mid) == both_pass, 60, "passing rows")
            got = o.get_machine("web", a)["checks"]
            assert [(c["name"], c["status"]) for c in got] == [
                ("alive", PASSING),
                (health, PASSING),
            ]
            port = o.get_machine("web", a)["config"]["services"][0]["internal_port"]
            assert got[1]["output"] == f"HTTP GET http://127.0.0.1:{port}/health: 200 OK"

            async def served_by() -> set[str]:
                seen = set()
                for _ in range(6):
                    r = await client.get(url)
                    assert r.status_code == 200, r.text
                    assert r.text == {a: "a\n", b: "b\n"}[r.headers["fly-machine-id"]]
                    seen.add(r.headers["fly-machine-id"])
                return seen

            assert await served_by() == {a, b}

            (sites["a"] / "health").unlink()  # a's /health now answers 404
            await wait_for(lambda: published(a)["health"] == CRITICAL, 60, "a critical")
            check = o.get_machine("web", a)["checks"][1]
            assert check["status"] == CRITICAL and ": 404 " in check["output"]
            assert published(a)["alive"] == PASSING  # the port still accepts
            assert await served_by() == {b}

            (sites["b"] / "health").unlink()
            await wait_for(lambda: published(b)["health"] == CRITICAL, 60, "b critical")
            r = await client.get(url)
            assert r.status_code == 503
            error = r.json()["error"]
            assert "no reachable started machine for app web" in error
            b_health = health.replace(str(ports["a"]), str(ports["b"]))
            assert f"{a} ({health})" in error and f"{b} ({b_health})" in error

            for name in ("a", "b"):
                (sites[name] / "health").write_text("ok\n")
            for mid in mids:
                await wait_for(lambda mid=mid: published(mid) == both_pass, 60, "passing again")
            assert await served_by() == {a, b}

            await o.stop_machine("web", a)
            assert await o.wait_machine("web", a, state="stopped", timeout=60)
            await wait_for(lambda: o.get_machine("web", a)["checks"] == [], 60, "cleared")
            await wait_for(lambda: published(a) == {}, 60, "the cleared row")
            assert not o.health.running(a) and o.health.running(b)
            assert await served_by() == {b}
            await client.aclose()
            front.close()
            tg.cancel_scope.cancel()
    finally:
        reader.close()
        conn.close()
        await driver.destroy_all()


def test_the_proxy_skips_critical_readiness_checks_only(tmp_path):
    conn = apsw.Connection(str(tmp_path / "replica.db"))
    conn.execute(MACHINES_SCHEMA)
    checks = {
        "m1": [{"name": "up", "status": PASSING, "kind": "readiness"}],
        "m2": [{"name": "up", "status": CRITICAL, "kind": "readiness"},
               {"name": "disk", "status": CRITICAL, "kind": "readiness"}],
        "m3": [{"name": "stats", "status": CRITICAL, "kind": "informational"}],
        "m4": [{"name": "up", "status": CRITICAL}],  # a row without kind: readiness
        "m5": [{"name": "up", "status": WARNING, "kind": "readiness"}],  # not run yet
    }  # fmt: skip
    for mid, results in checks.items():
        conn.execute(*upsert_statement({
            "id": mid, "app": "web", "worker": "w1", "region": "", "state": "started",
            "instance_id": "", "address": "127.0.0.1", "cordoned": 0,
            "checks": json.dumps(results), "services": '[{"protocol":"tcp","internal_port":1}]',
            "updated_at": 0,
        }))  # fmt: skip
    reader = SqliteReplica(tmp_path / "replica.db")
    try:
        assert [b.machine_id for b in reader.backends("web")] == ["m1", "m3", "m5"]
        assert [(b.machine_id, b.failing) for b in reader.failing("web")] == [
            ("m2", ("up", "disk")), ("m4", ("up",)),
        ]  # fmt: skip
    finally:
        reader.close()
        conn.close()


async def test_network_probe_over_tcp_http_and_https(tmp_path):
    """The real probes against a real server: a TCP port, HTTP with headers, HTTPS with and
    without certificate verification, and a closed port."""
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    requests: list[bytes] = []

    async def answer(stream) -> None:
        async with stream:
            data = b""
            with anyio.fail_after(30):
                while b"\r\n\r\n" not in data:
                    try:
                        data += await stream.receive()
                    except anyio.EndOfStream:
                        return  # a TCP check: connected, then closed
            requests.append(data)
            status = b"200 OK" if data.startswith(b"GET /health ") else b"503 Service Unavailable"
            await stream.send(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")  # fmt: skip

    async def answer_tls(stream) -> None:
        try:
            tls = await TLSStream.wrap(
                stream, server_side=True, ssl_context=context, standard_compatible=False
            )
        except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream):
            return  # a client that refused the certificate
        await answer(tls)

    def spec(**kw) -> CheckSpec:
        kw.setdefault("type", "http")
        return CheckSpec(name="c", interval=1.0, timeout=5.0, grace_period=0.0, **kw)

    probe = NetworkProbe()
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as plain,
        await anyio.create_tcp_listener(local_host="127.0.0.1") as secure,
        anyio.create_task_group() as tg,
    ):
        port, tls_port = (
            lst.extra(anyio.abc.SocketAttribute.local_port) for lst in (plain, secure)
        )
        tg.start_soon(plain.serve, answer)
        tg.start_soon(secure.serve, answer_tls)
        try:
            assert await probe("127.0.0.1", spec(type="tcp", port=port)) == (
                PASSING, f"TCP connect 127.0.0.1:{port}: success")  # fmt: skip
            status, output = await probe("127.0.0.1", spec(type="tcp", port=free_port()))
            assert status == CRITICAL and output.startswith("TCP connect 127.0.0.1:")
            got = await probe(
                "127.0.0.1",
                spec(port=port, path="/health", headers=(("X-Probe", "1"), ("X-Probe", "2"))),
            )
            assert got == (PASSING, f"HTTP GET http://127.0.0.1:{port}/health: 200 OK")
            assert b"\r\nx-probe: 1\r\nx-probe: 2\r\n" in requests[-1].lower()
            got = await probe("127.0.0.1", spec(port=port, path="/other", method="HEAD"))
            assert got == (CRITICAL, f"HTTP HEAD http://127.0.0.1:{port}/other: 503 "
                                     "Service Unavailable")  # fmt: skip
            https = spec(port=tls_port, path="/health", protocol="https", tls_skip_verify=True)
            assert await probe("127.0.0.1", https) == (
                PASSING, f"HTTP GET https://127.0.0.1:{tls_port}/health: 200 OK")  # fmt: skip
            status, output = await probe("127.0.0.1", spec(port=tls_port, protocol="https"))
            assert status == CRITICAL and "CERTIFICATE_VERIFY_FAILED" in output, output
        finally:
            await probe.aclose()
            tg.cancel_scope.cancel()
