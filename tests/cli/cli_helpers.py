"""Helpers for the CLI tests: short temp dirs (Unix socket paths are limited to 107 bytes),
agent configs as TOML files and mappings, real agents on loopback, waiting on conditions with
generous deadlines (the machines are shared and noisy), running the CLI in a worker thread so the
agent keeps serving on the event loop."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
from support import Proc, wait_for
from typer.testing import CliRunner

from corrosion import Agent, Config
from corrosion.ops.cli import app

# a gossip key, as every agent needs one (or gossip.plaintext = true)
TEST_KEY = "Y29ycm9zaW9uIHRlc3Qga2V5OiAzMiBieXRlcyAhISE="

SCHEMA = """
CREATE TABLE IF NOT EXISTS todos (
    id INTEGER NOT NULL PRIMARY KEY, title TEXT NOT NULL DEFAULT '', done INTEGER DEFAULT 0,
    data BLOB
);
"""


@contextlib.contextmanager
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="corro-cli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_schema(base: Path, sql: str = SCHEMA) -> Path:
    path = base / "schema" / "schema.sql"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sql)
    return path


def node_mapping(base: Path, name: str, seeds: list[str] | None = None, **sections: Any) -> dict:
    """An agent's config as a mapping: API, admin socket and gossip on free loopback ports."""
    data: dict[str, Any] = {
        "db": {"path": str(base / name / "state.db"), "schema_paths": [str(write_schema(base))]},
        "api": {"addr": "127.0.0.1:0"},
        "gossip": {
            "addr": "127.0.0.1:0",
            "bootstrap": seeds or [],
            "preset": "local",
            "encryption_keys": [TEST_KEY],
        },
        "perf": {"min_sync_backoff": 0.2, "max_sync_backoff": 1.0},
        "admin": {"path": str(base / f"{name}.sock")},
    }
    for section, values in sections.items():
        if values is None:
            data.pop(section, None)
        else:
            data.setdefault(section, {}).update(values)
    return data


def to_toml(data: dict[str, Any]) -> str:
    """Two-level tables only (enough for agent configs); JSON values are valid TOML values."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{prefix}.{json.dumps(k)}", v)

    for section, values in data.items():
        table(json.dumps(section), values)
    return "\n".join(lines) + "\n"


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(data))
    return path


def api_of(agent: Agent) -> str:
    host, port = agent.api_addrs[0]
    return f"{host}:{port}"


def gossip_of(agent: Agent) -> str:
    host, port = agent.swim.address
    return f"{host}:{port}"


async def rows(agent: Agent, sql: str, params: Any = ()) -> list[tuple]:
    return [r async for r in agent.query(sql, params)]


def json_logs(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def agent_started(proc: Proc) -> dict:
    """The JSON "agent started" record of an agent process, once it has logged it."""
    started: dict = {}

    def is_up() -> bool:
        assert proc.p.poll() is None, proc.stderr()
        for rec in json_logs(proc.stderr()):
            if rec["msg"] == "agent started":
                started.update(rec)
                return True
        return False

    await wait_for(is_up, what="the agent process to start")
    return started


async def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run the CLI (typer's CliRunner) in a worker thread, with ``env`` added to the
    environment; returns the click Result."""
    runner = CliRunner()
    return await anyio.to_thread.run_sync(
        lambda: runner.invoke(app, list(args), catch_exceptions=False, env=env)
    )


@contextlib.asynccontextmanager
async def cluster(base: Path, n: int, **sections: Any) -> AsyncIterator[list[Agent]]:
    """``n`` agents joined through the first, all seeing each other."""
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            Agent(Config.from_mapping(node_mapping(base, "n0", **sections)))
        )
        agents = [first]
        for i in range(1, n):
            cfg = Config.from_mapping(node_mapping(base, f"n{i}", [gossip_of(first)], **sections))
            agents.append(await stack.enter_async_context(Agent(cfg)))
        await wait_for(
            lambda: all(a.alive_members() == n - 1 for a in agents), what="membership to settle"
        )
        yield agents
