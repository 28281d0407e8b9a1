"""Helpers for agent tests: configs in temp dirs, clusters of real agents on loopback, waiting on
conditions with generous deadlines (the machines are shared and noisy)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from support import wait_for

from corrosion import Agent, Config
from corrosion.core.store import ApplyResult, LocalCommit, StatementResult, Store

# Every test cluster runs as a user's must: with a gossip key (corrosion refuses to start without
# one unless gossip.plaintext = true). Tests of plaintext pass {"plaintext": True,
# "encryption_keys": []}.
TEST_KEY = "Y29ycm9zaW9uIHRlc3Qga2V5OiAzMiBieXRlcyAhISE="
SECURE_GOSSIP = {"encryption_keys": [TEST_KEY]}

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT NOT NULL PRIMARY KEY, v ANY, n INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS items (id INTEGER NOT NULL PRIMARY KEY, body TEXT, owner TEXT);
"""


def write_schema(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "schema.sql"
    path.write_text(SCHEMA)
    return path


def agent_config(
    base: Path,
    name: str,
    seeds: list[str] | None = None,
    *,
    with_api: bool = True,
    **sections: dict[str, Any],
) -> Config:
    schema = write_schema(base / "schema")
    data: dict[str, Any] = {
        "db": {"path": str(base / name / "state.db"), "schema_paths": [str(schema)]},
        "gossip": {
            "addr": "127.0.0.1:0",
            "bootstrap": seeds or [],
            "preset": "local",
            **SECURE_GOSSIP,
        },
        "perf": {"min_sync_backoff": 0.2, "max_sync_backoff": 1.0},
    }
    if with_api:
        data["api"] = {"addr": "127.0.0.1:0"}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_mapping(data)


def seed_addr(agent: Agent) -> str:
    host, port = agent.swim.address
    return f"{host}:{port}"


@contextlib.asynccontextmanager
async def cluster(
    base: Path, n: int, *, with_api: bool = True, **sections: dict[str, Any]
) -> AsyncIterator[list[Agent]]:
    """``n`` agents joined through the first, all seeing each other."""
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            Agent(agent_config(base, "n0", with_api=with_api, **sections))
        )
        agents = [first]
        for i in range(1, n):
            cfg = agent_config(base, f"n{i}", [seed_addr(first)], with_api=with_api, **sections)
            agents.append(await stack.enter_async_context(Agent(cfg)))
        await wait_for(
            lambda: all(a.alive_members() == n - 1 for a in agents), what="membership to settle"
        )
        yield agents


async def rows(agent: Agent, sql: str, params: Any = ()) -> list[tuple]:
    return [r async for r in agent.query(sql, params)]


def apply_now(store: Store, items: Sequence[Any]) -> ApplyResult:
    """``Store.apply`` and install its bookkeeping, as the agent's loop does after the worker's
    transaction (for tests that drive a store alone)."""
    result = store.apply(items)
    store.install(result)
    return result


def commit_now(
    store: Store, statements: Sequence[Any], ts: int
) -> tuple[list[StatementResult], LocalCommit | None]:
    """``Store.execute_local`` and install its bookkeeping (see ``apply_now``)."""
    results, commit = store.execute_local(statements, ts)
    store.install(commit)
    return results, commit
