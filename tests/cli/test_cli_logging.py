"""``corrosion agent`` as a process, as an operator meets it: every expected start-up failure is
one line on stderr naming the cause and the remedy (no traceback, exit code 1); ``log.level``,
``CORROSION_LOG`` and ``corrosion log set`` / ``log reset`` decide what is written; JSON lines
parse."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from cli_helpers import node_mapping, short_tmp, write_config, write_schema
from support import Proc, wait_for
from test_cli_process import corrosion_cmd

from corrosion import Agent, Config
from corrosion.surfaces.admin_client import admin_request

pytestmark = pytest.mark.anyio

ENV = {k: v for k, v in os.environ.items() if k != "CORROSION_LOG"} | {"PYTHONUNBUFFERED": "1"}


def held_port(kind: int) -> socket.socket:
    """A loopback port kept busy by the test."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def port_of(sock: socket.socket) -> str:
    return f"127.0.0.1:{sock.getsockname()[1]}"


async def start_failure(
    base: Path, data: dict[str, Any], *, env: dict[str, str] | None = None, prefix=()
) -> tuple[int, list[str]]:
    cfg = write_config(base / "agent.toml", data)
    result = await anyio.run_process(
        [*prefix, *corrosion_cmd(), "-c", str(cfg), "agent"],
        check=False,
        env=env or ENV,
    )
    return result.returncode, result.stderr.decode().splitlines()


def _api_int(base: Path, data: dict, stack: list) -> None:
    data["api"]["addr"] = 8080


def _schema_syntax(base: Path, data: dict, stack: list) -> None:
    write_schema(base, "CREATE TABLE todos (id INTEGER NOT NULL PRIMARY KEY, title TEXT")


def _schema_not_a_crr(base: Path, data: dict, stack: list) -> None:
    write_schema(base, "CREATE TABLE todos (id INTEGER NOT NULL PRIMARY KEY, title TEXT UNIQUE);")


def _bad_level(base: Path, data: dict, stack: list) -> None:
    data["log"] = {"level": "loud"}


def _bad_broadcast(base: Path, data: dict, stack: list) -> None:
    data["gossip"]["broadcast"] = "flood"


def _gossip_in_use(base: Path, data: dict, stack: list) -> None:
    stack.append(held_port(socket.SOCK_DGRAM))
    data["gossip"]["addr"] = port_of(stack[-1])


def _api_in_use(base: Path, data: dict, stack: list) -> None:
    stack.append(held_port(socket.SOCK_STREAM))
    data["api"]["addr"] = port_of(stack[-1])


def _api_host_unknown(base: Path, data: dict, stack: list) -> None:
    data["api"]["addr"] = "nosuchhost.invalid:28080"  # .invalid never resolves (RFC 2606)


def _gossip_host_unknown_port_0(base: Path, data: dict, stack: list) -> None:
    data["gossip"]["addr"] = "nosuchhost.invalid:0"


def _metrics_in_use(base: Path, data: dict, stack: list) -> None:
    stack.append(held_port(socket.SOCK_STREAM))
    data["telemetry"] = {"prometheus": {"addr": port_of(stack[-1])}}


def _pg_in_use(base: Path, data: dict, stack: list) -> None:
    stack.append(held_port(socket.SOCK_STREAM))
    data["api"]["pg"] = {"addr": port_of(stack[-1])}


def _pg_unknown_key(base: Path, data: dict, stack: list) -> None:
    data["api"]["pg"] = {"addr": "127.0.0.1:0", "adress": "127.0.0.1:0"}


CASES: dict[str, tuple[Callable[[Path, dict, list], None], list[str]]] = {
    "api.addr is an int": (_api_int, ["api.addr", "'host:port' string", "8080"]),
    "schema syntax": (
        _schema_syntax,
        [
            "error: schema (db.schema_paths): ",  # the config is fine: the schema is not
            "/schema/schema.sql: invalid schema statement (incomplete input)",
        ],
    ),
    "schema table CRRs cannot keep": (
        _schema_not_a_crr,  # found on the built table, not in the text: still names the file
        ["error: schema (db.schema_paths): ", "/schema/schema.sql: table 'todos' has unique index"],
    ),
    "log.level": (_bad_level, ["log.level", "unknown level 'loud'"]),
    "gossip.broadcast": (_bad_broadcast, ["gossip.broadcast", '"plumtree"', "'flood'"]),
    "gossip port in use": (_gossip_in_use, ["gossip.addr", "already in use", "another port"]),
    "api port in use": (_api_in_use, ["api.addr", "already in use", "another port"]),
    "api host unknown": (
        _api_host_unknown,
        ["api.addr", "nosuchhost.invalid:28080", "cannot resolve", "IP address"],
    ),
    "gossip host unknown, port 0": (
        _gossip_host_unknown_port_0,
        ["gossip.addr", "nosuchhost.invalid:0", "cannot resolve"],
    ),
    "metrics port in use": (
        _metrics_in_use,
        ["telemetry.prometheus.addr", "already in use", "another port"],
    ),
    "pg port in use": (_pg_in_use, ["api.pg.addr", "already in use", "another port"]),
    "pg unknown key": (_pg_unknown_key, ["api.pg.adress", "unknown configuration key"]),
}


def assert_one_line(code: int, lines: list[str], *expected: str) -> None:
    assert code == 1, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for text in expected:
        assert text in lines[0], lines


@pytest.mark.parametrize("case", list(CASES))
async def test_config_and_port_failures_are_one_line(case):
    prepare, expected = CASES[case]
    with short_tmp() as base:
        data = node_mapping(base, "a")
        held: list[socket.socket] = []
        try:
            prepare(base, data, held)
            code, lines = await start_failure(base, data)
        finally:
            for sock in held:
                sock.close()
        assert_one_line(code, lines, *expected)
        # refused before the database (or its lock file) was made
        assert not list((base / "a").glob("state.db*"))


async def test_invalid_environment_level_is_one_line():
    with short_tmp() as base:
        code, lines = await start_failure(
            base, node_mapping(base, "a"), env={**ENV, "CORROSION_LOG": "info,corrosion=chatty"}
        )
        assert_one_line(code, lines, "CORROSION_LOG", "unknown level 'chatty'")


async def test_failures_beside_a_running_agent_are_one_line():
    """The database locked by another agent, its admin socket, a schema the database refuses."""
    with short_tmp() as base:
        running = node_mapping(base, "a")
        async with Agent(Config.from_mapping(running)):
            # the same database, other ports and socket
            code, lines = await start_failure(
                base, {**running, "admin": {"path": str(base / "other.sock")}}
            )
            assert_one_line(code, lines, str(base / "a" / "state.db"), "in use", "stop that agent")
            # another database, the running agent's admin socket
            code, lines = await start_failure(
                base, {**node_mapping(base, "b"), "admin": running["admin"]}
            )
            assert_one_line(code, lines, "admin.path", "another agent is listening", "stop that")
        # a schema that would lose data (a new primary key) is refused, and nothing changes
        write_schema(
            base,
            "CREATE TABLE todos (id INTEGER NOT NULL, title TEXT NOT NULL DEFAULT '', "
            "done INTEGER DEFAULT 0, data BLOB, PRIMARY KEY (id, title));",
        )
        code, lines = await start_failure(base, running)
        assert_one_line(
            code,
            lines,
            "schema (db.schema_paths)",
            "primary key of table 'todos' would change",
            "`corrosion agent --allow-destructive`",
        )
        assert "allow_destructive" not in lines[0]


async def test_permission_denied_on_the_database_directory_is_one_line():
    prefix: list[str] = []
    if os.geteuid() == 0:  # root ignores file modes unless it gives up CAP_DAC_OVERRIDE
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    with short_tmp() as base:
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        data = node_mapping(base, "a", db={"path": str(locked / "state.db")})
        try:
            code, lines = await start_failure(base, data, prefix=prefix)
        finally:
            locked.chmod(0o755)
        assert_one_line(code, lines, "permission denied", str(locked), "db.path")


# -- levels ------------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict]:
    """Every line of the agent's stderr, each of which must be a JSON object."""
    out = [json.loads(line) for line in text.splitlines()]
    for rec in out:
        assert {"ts", "level", "target", "msg"} <= set(rec), rec
    return out


async def admin(path: str, cmd: str, **args: Any) -> Any:
    return await anyio.to_thread.run_sync(lambda: admin_request(path, cmd, **args))


async def test_log_level_from_config_then_log_set_and_reset_at_run_time():
    with short_tmp() as base:
        data = node_mapping(base, "a", log={"format": "json", "level": "warning"})
        cfg = write_config(base / "a.toml", data)
        sock = data["admin"]["path"]
        proc = Proc([sys.executable, "-m", "corrosion", "-c", str(cfg), "agent"], base, ENV)
        try:

            async def answers() -> bool:
                assert proc.p.poll() is None, proc.stderr()
                try:
                    return await admin(sock, "ping") == "pong"
                except OSError:
                    return False

            await wait_for(answers, what="the agent's admin socket")
            assert json_lines(proc.stderr()) == []  # log.level = "warning": no INFO lines

            async def cli(*args: str) -> str:
                result = await anyio.run_process(
                    [*corrosion_cmd(), "-c", str(cfg), *args], check=False, env=ENV
                )
                assert result.returncode == 0, result.stderr
                return result.stdout.decode()

            def debug_admin_lines() -> list[dict]:
                return [
                    r
                    for r in json_lines(proc.stderr())
                    if r["level"] == "DEBUG" and r["target"] == "corrosion.admin"
                ]

            assert await cli("log", "set", "debug") == "log filter: debug\n"
            await cli("cluster", "members")
            assert any("cluster members" in r["msg"] for r in debug_admin_lines())
            [changed] = [r for r in json_lines(proc.stderr()) if r["level"] == "INFO"]
            assert changed["msg"] == "log level filter set to 'debug' (admin socket)"

            assert await cli("log", "reset") == "log filter: warning\n"
            before = len(debug_admin_lines())
            await cli("cluster", "members")
            assert len(debug_admin_lines()) == before  # warning again: no DEBUG lines

            result = await anyio.run_process(
                [*corrosion_cmd(), "-c", str(cfg), "log", "set", "loud"], check=False, env=ENV
            )
            assert result.returncode == 1
            assert b"unknown level 'loud'" in result.stderr
        finally:
            proc.kill()
        json_lines(proc.stderr())  # every line, to the end, is JSON


async def test_environment_overrides_log_level():
    with short_tmp() as base:
        data = node_mapping(base, "a", log={"level": "error", "format": "plaintext"})
        cfg = write_config(base / "a.toml", data)
        args = [sys.executable, "-m", "corrosion", "-c", str(cfg), "agent"]
        proc = Proc(args, base, env={**ENV, "CORROSION_LOG": "info"})
        try:

            def started() -> bool:
                assert proc.p.poll() is None, proc.stderr()
                return " INFO corrosion.agent: agent started " in proc.stderr()

            await wait_for(started, what="the INFO start-up line that log.level alone hides")
        finally:
            proc.kill()
